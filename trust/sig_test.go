package trust

import (
	"crypto/ed25519"
	"errors"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
)

// testSigner is a fixed ed25519 key, so signatures are reproducible.
func testSigner(t *testing.T, seed byte) ssh.Signer {
	t.Helper()
	s, err := ssh.NewSignerFromKey(ed25519.NewKeyFromSeed([]byte(strings.Repeat(string(seed), ed25519.SeedSize))))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestParseKeys(t *testing.T) {
	pub := PublicKeyLine(testSigner(t, 1))
	for _, c := range []struct {
		name, in string
		names    []string
		err      string
	}{
		{"pub file", pub + " ops@example\n", []string{"ops@example"}, ""},
		{"comments and blanks", "# ops\n\n" + pub + "\n", []string{""}, ""},
		{"allowed_signers", "ops@example " + pub, []string{"ops@example"}, ""},
		{"allowed_signers with our namespace", `ops@example namespaces="git,airadm" ` + pub, []string{"ops@example"}, ""},
		{"allowed_signers for git only", `ops@example namespaces="git" ` + pub, nil, ""},
		{"not a key", "hello world\n" + pub, nil, "keys:1: not an OpenSSH public key or allowed_signers line"},
		{"bad base64", "ssh-ed25519 AAAA!!", nil, "keys:1: ssh-ed25519 key: "},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := ParseKeys("keys", []byte(c.in))
			if (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
				t.Fatalf("err = %v, want %q", err, c.err)
			}
			if len(got) != len(c.names) {
				t.Fatalf("got %d keys, want %d", len(got), len(c.names))
			}
			for i, k := range got {
				if k.Name != c.names[i] {
					t.Errorf("key %d named %q, want %q", i, k.Name, c.names[i])
				}
			}
		})
	}
}

func TestCheckSignature(t *testing.T) {
	ops, other := testSigner(t, 1), testSigner(t, 2)
	sums := []byte(strings.Repeat("a", 64) + "  cp1.bundle\n")
	sig, err := Sign(sums, ops)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := Sign(sums, ops)
	if string(again) != string(sig) {
		t.Error("signing the same SHA256SUMS twice gave different bytes")
	}
	trusted := Keyring{{Key: ops.PublicKey(), Name: "ops"}}
	otherKeys := Keyring{{Key: other.PublicKey()}}
	for _, c := range []struct {
		name  string
		sums  []byte
		sig   []byte
		keys  Keyring
		err   string
		signe string
	}{
		{"trusted", sums, sig, trusted, "", "ops (ssh-ed25519 SHA256:"},
		{"no keys", sums, sig, nil, "", "ssh-ed25519 SHA256:"},
		{"untrusted", sums, sig, otherKeys, "which is not a trusted key", ""},
		{"other content", append([]byte("x"), sums...), sig, trusted, "does not match SHA256SUMS", ""},
		{"garbage", sums, []byte("not a signature"), trusted, "reading SHA256SUMS.sig", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			by, err := CheckSignature(c.sums, c.sig, c.keys)
			if c.err == "" {
				if err != nil || !strings.HasPrefix(by, c.signe) {
					t.Fatalf("CheckSignature = %q, %v", by, err)
				}
				return
			}
			if !errors.Is(err, ErrSignature) || !strings.Contains(err.Error(), c.err) {
				t.Fatalf("err = %v, want %q wrapping ErrSignature", err, c.err)
			}
		})
	}
}
