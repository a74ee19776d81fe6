package trust

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sort"
	"strings"

	"filippo.io/age"
	"filippo.io/age/agessh"
	"golang.org/x/crypto/ssh"

	"airadm.dev/airadm/render"
)

// DefaultIdentity is the host key apply decrypts with unless told otherwise:
// the key whose public half `ssh-keyscan` or the host's .pub file gives the
// operator as the node's recipient.
const DefaultIdentity = "/etc/ssh/ssh_host_ed25519_key"

// IsSecret says which files of a node airadm encrypts to its recipient:
// those whose mode grants nothing to group or others (0600, 0400). That is
// exactly the set kubeadm keeps private: every private key, every
// kubeconfig (each embeds a key or a token), the static pod manifests, and
// airadm's join file with the workers' bootstrap tokens. A file anyone may
// read is no secret, and encrypting it would only hide it from review.
func IsSecret(mode fs.FileMode) bool { return mode.Perm()&0o077 == 0 }

// EncryptSecrets encrypts every secret file (IsSecret) to recipient and
// returns the new file list, with the same paths and modes, and the set of
// encrypted paths. age encrypts with fresh randomness each time (it takes
// no random source), so an encrypted file differs from build to build.
func EncryptSecrets(files []render.File, recipient string) ([]render.File, map[string]bool, error) {
	r, _, err := render.ParseRecipient(recipient)
	if err != nil {
		return nil, nil, fmt.Errorf("encrypting secrets: %w", err)
	}
	out := make([]render.File, len(files))
	enc := map[string]bool{}
	for i, f := range files {
		out[i] = f
		if !IsSecret(f.Mode) {
			continue
		}
		var b bytes.Buffer
		w, err := age.Encrypt(&b, r)
		if err != nil {
			return nil, nil, fmt.Errorf("encrypting %s: %w", f.Path, err)
		}
		if _, err := w.Write(f.Data); err != nil {
			return nil, nil, fmt.Errorf("encrypting %s: %w", f.Path, err)
		}
		if err := w.Close(); err != nil {
			return nil, nil, fmt.Errorf("encrypting %s: %w", f.Path, err)
		}
		out[i].Data = b.Bytes()
		enc[f.Path] = true
	}
	return out, enc, nil
}

// Identity is what decrypts a node's secrets on the host.
type Identity struct {
	ids []age.Identity
	// From is the file it was read from, for messages.
	From string
}

// LoadIdentity reads an OpenSSH private key (ed25519, such as the host key)
// or an age identity file (AGE-SECRET-KEY-1... lines, as age-keygen writes).
func LoadIdentity(path string) (*Identity, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading identity: %w", err)
	}
	if bytes.Contains(b, []byte("-----BEGIN")) {
		id, err := agessh.ParseIdentity(b)
		var missing *ssh.PassphraseMissingError
		if errors.As(err, &missing) {
			return nil, fmt.Errorf("reading identity %s: it is passphrase-protected; airadm reads unencrypted keys only", path)
		}
		if err != nil {
			return nil, fmt.Errorf("reading identity %s: %w", path, err)
		}
		return &Identity{ids: []age.Identity{id}, From: path}, nil
	}
	ids, err := age.ParseIdentities(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("reading identity %s: neither an OpenSSH private key nor an age identity file: %w", path, err)
	}
	return &Identity{ids: ids, From: path}, nil
}

// Decrypt opens an age file. The header is read and its file key unwrapped
// at once, so a truncated header or the wrong identity fails here; the
// payload is authenticated chunk by chunk as it is read.
func (id *Identity) Decrypt(src io.Reader) (io.Reader, error) {
	r, err := age.Decrypt(src, id.ids...)
	if err != nil {
		var nm *age.NoIdentityMatchError
		if errors.As(err, &nm) {
			return nil, fmt.Errorf("decrypting: %s cannot: the entry is encrypted to another key (pass --identity with the node's key)", id.From)
		}
		return nil, fmt.Errorf("decrypting: %w", err)
	}
	return r, nil
}

// Stanza is one recipient stanza of an age header: its type ("X25519",
// "ssh-ed25519", ...) and, for SSH keys, the key's tag.
type Stanza struct {
	Type string `json:"type"`
	// SSHTag is an ssh-ed25519 stanza's key tag (the first four bytes of
	// the sha256 of the public key, base64), which names the key.
	SSHTag string `json:"sshTag,omitempty"`
}

// errRecorded stops DecryptHeader once the stanzas are recorded.
var errRecorded = errors.New("stanzas recorded")

// stanzaRecorder is an age.Identity that unwraps nothing: it only sees the
// header's stanzas, so inspect can say to whom a file is encrypted without
// a key.
type stanzaRecorder struct{ got []Stanza }

func (s *stanzaRecorder) Unwrap(stanzas []*age.Stanza) ([]byte, error) {
	for _, st := range stanzas {
		one := Stanza{Type: st.Type}
		if st.Type == "ssh-ed25519" && len(st.Args) > 0 {
			one.SSHTag = st.Args[0]
		}
		s.got = append(s.got, one)
	}
	return nil, errRecorded
}

// Stanzas reads an age file's header (and nothing after it) and lists its
// recipient stanzas, without decrypting anything.
func Stanzas(src io.Reader) ([]Stanza, error) {
	hdr, err := age.ExtractHeader(src)
	if err != nil {
		return nil, fmt.Errorf("reading age header: %w", err)
	}
	rec := &stanzaRecorder{}
	if _, err := age.DecryptHeader(hdr, rec); !errors.Is(err, errRecorded) {
		return nil, fmt.Errorf("reading age header: %v", err)
	}
	return rec.got, nil
}

// SSHTag is the tag an ssh-ed25519 stanza carries for the recipient's key,
// or "" for a recipient that is not an SSH key.
func SSHTag(recipient string) string {
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(recipient))
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(pub.Marshal())
	return base64.RawStdEncoding.EncodeToString(sum[:4])
}

// DescribeStanzas says to whom an age file is encrypted, in a phrase,
// given the node's recipient from the manifest.
func DescribeStanzas(st []Stanza, recipient string) string {
	tag := SSHTag(recipient)
	var parts []string
	for _, s := range st {
		switch {
		case s.SSHTag != "" && s.SSHTag == tag:
			parts = append(parts, "ssh-ed25519 (the node's recipient)")
		case s.SSHTag != "":
			parts = append(parts, "ssh-ed25519 tag "+s.SSHTag+" (NOT the node's recipient)")
		default:
			parts = append(parts, s.Type)
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}
