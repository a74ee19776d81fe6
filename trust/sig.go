package trust

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/hiddeco/sshsig"
	"golang.org/x/crypto/ssh"
)

// SigFile is the signature over SumsFile, beside it: the format of
// `ssh-keygen -Y sign -n airadm SHA256SUMS` (PROTOCOL.sshsig, armored).
const SigFile = SumsFile + ".sig"

// Namespace is the SSH signature namespace airadm signs and verifies with,
// so that no signature made for another purpose (git commits, files) can
// pass for one over SHA256SUMS.
const Namespace = "airadm"

// TrustedKeysPath is where a host lists the keys it trusts to sign builds.
const TrustedKeysPath = "/etc/airadm/trusted-keys"

// ErrSignature means SHA256SUMS.sig does not vouch for SHA256SUMS: it is
// damaged, made by a key that is not trusted, or missing although a key is
// trusted. Never read as "unsigned": the CLI exits 2.
var ErrSignature = errors.New("the signature does not vouch for SHA256SUMS")

// TrustedKey is one key allowed to sign builds.
type TrustedKey struct {
	Key ssh.PublicKey
	// Name is the principal of an allowed_signers line, or the key's
	// comment; it may be empty.
	Name string
	// From is file:line, for messages.
	From string
}

// Keyring is the keys a host trusts. With none, a signature is still
// checked against the key it names (so a damaged one is refused) but
// vouches for nothing more than the unsigned SHA256SUMS would.
type Keyring []TrustedKey

// LoadSigner reads an OpenSSH ed25519 private key (unencrypted, as
// `ssh-keygen -t ed25519 -N ""` writes it).
func LoadSigner(path string) (ssh.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading signing key: %w", err)
	}
	s, err := ssh.ParsePrivateKey(b)
	var missing *ssh.PassphraseMissingError
	if errors.As(err, &missing) {
		return nil, fmt.Errorf("reading signing key %s: it is passphrase-protected; airadm needs an unencrypted key (keep it offline, or use a copy without a passphrase on the build machine)", path)
	}
	if err != nil {
		return nil, fmt.Errorf("reading signing key %s: not an OpenSSH private key: %w", path, err)
	}
	if s.PublicKey().Type() != ssh.KeyAlgoED25519 {
		return nil, fmt.Errorf("reading signing key %s: it is %s; airadm signs with ed25519 keys (ssh-keygen -t ed25519)", path, s.PublicKey().Type())
	}
	return s, nil
}

// Sign returns the armored signature over sums, as ssh-keygen -Y sign
// writes it. ed25519 signatures are deterministic, so the same SHA256SUMS
// and key give the same bytes.
func Sign(sums []byte, signer ssh.Signer) ([]byte, error) {
	sig, err := sshsig.Sign(bytes.NewReader(sums), signer, sshsig.HashSHA512, Namespace)
	if err != nil {
		return nil, fmt.Errorf("signing %s: %w", SumsFile, err)
	}
	return sshsig.Armor(sig), nil
}

// keyTypes are the OpenSSH public key types a trusted-keys line may carry.
var keyTypes = map[string]bool{
	ssh.KeyAlgoED25519: true, ssh.KeyAlgoSKED25519: true, ssh.KeyAlgoRSA: true,
	ssh.KeyAlgoECDSA256: true, ssh.KeyAlgoECDSA384: true, ssh.KeyAlgoECDSA521: true, ssh.KeyAlgoSKECDSA256: true,
}

// ParseKeys reads trusted keys, one a line: an OpenSSH public key
// ("ssh-ed25519 AAAA... comment", as in a .pub file or authorized_keys) or
// an allowed_signers line ("principals [options] ssh-ed25519 AAAA..."), as
// ssh-keygen -Y verify reads them. Blank lines and lines starting with #
// are skipped. An allowed_signers line whose namespaces= option leaves out
// airadm is skipped, as ssh-keygen would. Any other line is an error naming
// name:line.
func ParseKeys(name string, data []byte) (Keyring, error) {
	var out Keyring
	var problems []string
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		at := fmt.Sprintf("%s:%d", name, i+1)
		fields := strings.Fields(line)
		k := -1
		for j, f := range fields {
			if keyTypes[f] {
				k = j
				break
			}
		}
		if k < 0 || k > 2 {
			problems = append(problems, fmt.Sprintf("%s: not an OpenSSH public key or allowed_signers line (want [principals [options]] ssh-ed25519 AAAA...)", at))
			continue
		}
		pub, comment, _, _, err := ssh.ParseAuthorizedKey([]byte(strings.Join(fields[k:], " ")))
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %s key: %v", at, fields[k], err))
			continue
		}
		tk := TrustedKey{Key: pub, Name: comment, From: at}
		if k > 0 {
			tk.Name = fields[0]
		}
		if k == 2 && !namespaceAllowed(fields[1]) {
			continue
		}
		out = append(out, tk)
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("reading trusted keys: %s", strings.Join(problems, "; "))
	}
	return out, nil
}

// namespaceAllowed reads an allowed_signers options field: without a
// namespaces= option every namespace is allowed.
func namespaceAllowed(opts string) bool {
	i := strings.Index(strings.ToLower(opts), `namespaces="`)
	if i < 0 {
		return true
	}
	list, _, _ := strings.Cut(opts[i+len(`namespaces="`):], `"`)
	for _, ns := range strings.Split(list, ",") {
		if ns == Namespace {
			return true
		}
	}
	return false
}

// LoadKeys reads each --trust-key file (all must exist) and then hostFile,
// the host's trusted-keys file, which may be absent. A file that exists
// but lists no key is an error: it was meant to trust something.
func LoadKeys(files []string, hostFile string) (Keyring, error) {
	var out Keyring
	read := func(p string, optional bool) error {
		b, err := os.ReadFile(p)
		if optional && errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading trusted keys: %w", err)
		}
		keys, err := ParseKeys(p, b)
		if err != nil {
			return err
		}
		if len(keys) == 0 {
			return fmt.Errorf("reading trusted keys: %s lists no key for namespace %s", p, Namespace)
		}
		out = append(out, keys...)
		return nil
	}
	for _, f := range files {
		if err := read(f, false); err != nil {
			return nil, err
		}
	}
	if hostFile != "" {
		if err := read(hostFile, true); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// describeKey names a key for messages: its name, type and fingerprint.
func describeKey(name string, k ssh.PublicKey) string {
	fp := ssh.FingerprintSHA256(k)
	if name == "" {
		return fmt.Sprintf("%s %s", k.Type(), fp)
	}
	return fmt.Sprintf("%s (%s %s)", name, k.Type(), fp)
}

// CheckSignature checks sig (armored) over sums. The signature must be
// well formed, in the airadm namespace, and valid for the key it names;
// with keys, that key must be one of them. It returns who signed, for
// messages. Every failure wraps ErrSignature.
func CheckSignature(sums, sig []byte, keys Keyring) (string, error) {
	s, err := sshsig.Unarmor(sig)
	if err != nil {
		return "", fmt.Errorf("reading %s: %w: %w", SigFile, err, ErrSignature)
	}
	if s.Namespace != Namespace {
		return "", fmt.Errorf("checking %s: it is for namespace %q, not %q: %w", SigFile, s.Namespace, Namespace, ErrSignature)
	}
	if err := sshsig.Verify(bytes.NewReader(sums), s, s.PublicKey, s.HashAlgorithm, Namespace); err != nil {
		return "", fmt.Errorf("checking %s: the signature by %s does not match %s: %w", SigFile, describeKey("", s.PublicKey), SumsFile, ErrSignature)
	}
	if len(keys) == 0 {
		return describeKey("", s.PublicKey), nil
	}
	for _, k := range keys {
		if bytes.Equal(k.Key.Marshal(), s.PublicKey.Marshal()) {
			return describeKey(k.Name, k.Key), nil
		}
	}
	return "", fmt.Errorf("checking %s: it is signed by %s, which is not a trusted key (%d trusted: %s): %w", SigFile, describeKey("", s.PublicKey), len(keys), keys.fingerprints(), ErrSignature)
}

func (kr Keyring) fingerprints() string {
	var out []string
	for _, k := range kr {
		out = append(out, ssh.FingerprintSHA256(k.Key))
	}
	return strings.Join(out, ", ")
}

// PublicKeyLine is the authorized_keys form of a signer's key, what an
// operator puts in /etc/airadm/trusted-keys.
func PublicKeyLine(s ssh.Signer) string {
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(s.PublicKey())))
}
