package trust

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
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
	// SignedBy names the key whose valid signature covers SHA256SUMS, if
	// any; SignerTrusted says whether that key is one the caller trusts.
	SignedBy      string
	SignerTrusted bool
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
	out := fmt.Sprintf("authenticated by %s (%s)", v.From, strings.Join(what, " and "))
	switch {
	case v.SignerTrusted:
		out += ", signed by trusted key " + v.SignedBy
	case v.SignedBy != "":
		out += ", signed by " + v.SignedBy + " (no key is trusted, so the signature vouches for nothing more: pass --trust-key)"
	}
	return out
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
// the command line (flag, may be empty), else SHA256SUMS beside the bundle,
// checked against SHA256SUMS.sig when there is one. An unreadable
// SHA256SUMS, other than a missing one, is an error.
//
// With keys, only a SHA256SUMS signed by one of them vouches: a missing,
// damaged or untrusted signature, or a signed SHA256SUMS without a line for
// the bundle, is an error wrapping ErrSignature, never "unauthenticated".
// Without keys a signature is still checked against the key it names, so a
// damaged one is refused too. The digest given on the command line needs no
// signature: the operator typed it.
func Find(path, flag string, keys Keyring) (Vouch, error) {
	if flag != "" {
		d, err := ParseDigest(flag)
		if err != nil {
			return Vouch{}, err
		}
		return Vouch{ManifestDigest: d, From: "--manifest-digest"}, nil
	}
	sumsPath := filepath.Join(filepath.Dir(path), SumsFile)
	sigPath := sumsPath + ".sig"
	raw, err := os.ReadFile(sumsPath)
	if errors.Is(err, fs.ErrNotExist) {
		if len(keys) > 0 {
			return Vouch{}, fmt.Errorf("authenticating %s: no %s beside it, so nothing signed vouches for it, and %d signing keys are trusted: %w", path, SumsFile, len(keys), ErrSignature)
		}
		return Vouch{Why: fmt.Sprintf("no %s beside the bundle and no --manifest-digest", SumsFile)}, nil
	}
	if err != nil {
		return Vouch{}, fmt.Errorf("reading %s: %w", sumsPath, err)
	}
	var v Vouch
	sig, err := os.ReadFile(sigPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if len(keys) > 0 {
			return Vouch{}, fmt.Errorf("authenticating %s: %s is not signed (no %s beside it) and %d signing keys are trusted: %w", path, sumsPath, SigFile, len(keys), ErrSignature)
		}
	case err != nil:
		return Vouch{}, fmt.Errorf("reading %s: %w", sigPath, err)
	default:
		by, err := CheckSignature(raw, sig, keys)
		if err != nil {
			return Vouch{}, fmt.Errorf("authenticating %s: %w", path, err)
		}
		v.SignedBy, v.SignerTrusted = by, len(keys) > 0
	}
	sums := ParseSums(string(raw))
	name := filepath.Base(path)
	s, ok := sums[name]
	if !ok {
		listed := sums.Names()
		if len(listed) == 0 {
			v.Why = fmt.Sprintf("%s lists no files", sumsPath)
		} else {
			v.Why = fmt.Sprintf("%s has no line for %s (it lists %s); a renamed bundle must keep its built name", sumsPath, name, strings.Join(listed, ", "))
		}
		if len(keys) > 0 {
			return Vouch{}, fmt.Errorf("authenticating %s: %s: %w", path, v.Why, ErrSignature)
		}
		return v, nil
	}
	v.ManifestDigest, v.FileSHA256, v.From = s.Manifest, s.File, sumsPath
	return v, nil
}

// ManifestBound is v without the whole file's digest when the manifest
// digest is there to authenticate the bundle: by the format's rules a
// reader accepts exactly one file for a manifest digest
// (docs/bundle-format.md, Authenticity), so the second digest proves
// nothing more, and dropping it lets the reader pass over the data of
// entries the host already holds instead of hashing every byte.
func (v Vouch) ManifestBound() Vouch {
	if v.ManifestDigest != "" {
		v.FileSHA256 = ""
	}
	return v
}

// Verify reads the whole bundle through the verifying reader, hashing every
// byte in the same pass, and checks the result against v: the manifest
// digest and, where v has it, the whole file's sha256. Errors from the
// reader keep their types (*bundle.EntryError for a damaged bundle); a
// bundle that is not the vouched-for one wraps ErrUntrusted: as soon as
// its manifest is read when the manifest digest differs, at the end when
// only the file's sha256 does.
func Verify(r io.Reader, v Vouch, visit bundle.Visitor) (*bundle.Manifest, string, error) {
	whole := sha256.New()
	in := r
	if v.FileSHA256 != "" {
		in = io.TeeReader(r, whole)
	}
	// The manifest digest is checked as soon as the manifest is read: a
	// bundle that is not the one vouched for is refused before its data is
	// read, and the visitor's entries are authentic as they verify.
	next := visit.Manifest
	visit.Manifest = func(m *bundle.Manifest, digest string) error {
		if v.ManifestDigest != "" && v.ManifestDigest != digest {
			return fmt.Errorf("manifest digest %s is not %s from %s: %w", digest, v.ManifestDigest, v.From, ErrUntrusted)
		}
		if next != nil {
			return next(m, digest)
		}
		return nil
	}
	m, digest, err := bundle.Read(in, visit)
	if err != nil {
		return nil, "", err
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
