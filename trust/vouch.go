package trust

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"strings"

	"airadm.dev/airadm/bundle"
)

// ErrUntrusted means the bundle is intact but not the one that was vouched
// for: another build, or a file altered outside the manifest's reach.
var ErrUntrusted = errors.New("the bundle is not the one that was built")

// ErrUnauthenticated means nothing vouches for the bundle and the caller
// asked for authentication.
var ErrUnauthenticated = errors.New("nothing vouches for the bundle")

// Vouch is what authenticates one bundle. The zero value vouches for
// nothing: the bundle is then checked for integrity only.
type Vouch struct {
	// ManifestDigest is the manifest digest the bundle must have.
	ManifestDigest string
	// FileSHA256 is the hex sha256 every byte of the file must have.
	FileSHA256 string
	// From says where these came from, for messages: "--manifest-digest"
	// or the SHA256SUMS path.
	From string
	// Why explains, when nothing vouches, what was looked at and why it
	// does not vouch for this file.
	Why string
}

// Authenticated reports whether anything vouches for the bundle.
func (v Vouch) Authenticated() bool { return v.ManifestDigest != "" || v.FileSHA256 != "" }

// Describe says what authenticates the bundle, in a phrase.
func (v Vouch) Describe() string {
	if !v.Authenticated() {
		return "not authenticated: " + v.Why
	}
	var what []string
	if v.FileSHA256 != "" {
		what = append(what, "file sha256")
	}
	if v.ManifestDigest != "" {
		what = append(what, "manifest digest")
	}
	return fmt.Sprintf("authenticated by %s (%s)", v.From, strings.Join(what, " and "))
}

// ParseDigest accepts a manifest digest as "sha256:<hex>" or bare hex and
// returns it in the first form.
func ParseDigest(s string) (string, error) {
	hexPart := strings.TrimPrefix(s, "sha256:")
	if len(hexPart) != 64 {
		return "", fmt.Errorf("reading digest %q: want sha256:<64 hex digits> or 64 hex digits", s)
	}
	if _, err := hex.DecodeString(hexPart); err != nil {
		return "", fmt.Errorf("reading digest %q: want sha256:<64 hex digits> or 64 hex digits", s)
	}
	return "sha256:" + strings.ToLower(hexPart), nil
}

// Find works out what vouches for the bundle at path: the digest given on
// the command line (flag, may be empty), else SHA256SUMS beside the bundle.
// An unreadable SHA256SUMS, other than a missing one, is an error.
func Find(path, flag string) (Vouch, error) {
	if flag != "" {
		d, err := ParseDigest(flag)
		if err != nil {
			return Vouch{}, err
		}
		return Vouch{ManifestDigest: d, From: "--manifest-digest"}, nil
	}
	sumsPath := filepath.Join(filepath.Dir(path), SumsFile)
	sums, err := ReadSums(sumsPath)
	if errors.Is(err, fs.ErrNotExist) {
		return Vouch{Why: fmt.Sprintf("no %s beside the bundle and no --manifest-digest", SumsFile)}, nil
	}
	if err != nil {
		return Vouch{}, err
	}
	name := filepath.Base(path)
	s, ok := sums[name]
	if !ok {
		listed := sums.Names()
		if len(listed) == 0 {
			return Vouch{Why: fmt.Sprintf("%s lists no files", sumsPath)}, nil
		}
		return Vouch{Why: fmt.Sprintf("%s has no line for %s (it lists %s); a renamed bundle must keep its built name", sumsPath, name, strings.Join(listed, ", "))}, nil
	}
	return Vouch{ManifestDigest: s.Manifest, FileSHA256: s.File, From: sumsPath}, nil
}

// Verify reads the whole bundle through the verifying reader, hashing every
// byte in the same pass, and checks the result against v: the manifest
// digest and, where v has it, the whole file's sha256. Errors from the
// reader keep their types (*bundle.EntryError for a damaged bundle); a
// bundle that is intact but not the vouched-for one wraps ErrUntrusted.
func Verify(r io.Reader, v Vouch, visit bundle.Visitor) (*bundle.Manifest, string, error) {
	whole := sha256.New()
	m, digest, err := bundle.Read(io.TeeReader(r, whole), visit)
	if err != nil {
		return nil, "", err
	}
	if v.ManifestDigest != "" && v.ManifestDigest != digest {
		return nil, "", fmt.Errorf("manifest digest %s is not %s from %s: %w", digest, v.ManifestDigest, v.From, ErrUntrusted)
	}
	if v.FileSHA256 != "" {
		// The reader stops at the end of the archive; anything after it
		// still counts, as it does for sha256sum.
		if _, err := io.Copy(whole, r); err != nil {
			return nil, "", fmt.Errorf("reading to the end: %w", err)
		}
		if got := hex.EncodeToString(whole.Sum(nil)); got != v.FileSHA256 {
			return nil, "", fmt.Errorf("file sha256 %s is not %s from %s (the file was altered outside its entries, or is another build): %w", got, v.FileSHA256, v.From, ErrUntrusted)
		}
	}
	return m, digest, nil
}
