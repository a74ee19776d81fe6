package render

import (
	"bytes"
	"fmt"
	"strings"

	"filippo.io/age"
	"filippo.io/age/agessh"
	"golang.org/x/crypto/ssh"
)

// ParseRecipient reads a node's recipient (nodes[].recipient): an age X25519 recipient
// ("age1...") or an SSH ed25519 public key ("ssh-ed25519 AAAA...
// [comment]"). It returns the recipient and its canonical spelling (the
// SSH key without its comment), which the manifest records.
func ParseRecipient(s string) (age.Recipient, string, error) {
	s = strings.TrimSpace(s)
	switch {
	case strings.HasPrefix(s, "age1"):
		r, err := age.ParseX25519Recipient(s)
		if err != nil {
			return nil, "", fmt.Errorf("%q is not an age X25519 recipient: %w", s, err)
		}
		return r, r.String(), nil
	case strings.HasPrefix(s, ssh.KeyAlgoED25519+" "):
		pub, _, _, rest, err := ssh.ParseAuthorizedKey([]byte(s))
		if err != nil || len(bytes.TrimSpace(rest)) > 0 {
			return nil, "", fmt.Errorf("%q is not one SSH ed25519 public key", s)
		}
		r, err := agessh.NewEd25519Recipient(pub)
		if err != nil {
			return nil, "", fmt.Errorf("%q: %w", s, err)
		}
		return r, strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))), nil
	}
	return nil, "", fmt.Errorf("%q is neither an age X25519 recipient (age1...) nor an SSH ed25519 public key (ssh-ed25519 AAAA...)", s)
}
