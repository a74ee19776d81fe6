package expiry_test

import (
	"crypto/x509"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"airadm.dev/airadm/expiry"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/pki"
)

// TestHostReadsTheKubeletsRotatedCertificate: a worker's kubelet.conf names
// the pair the kubelet rotates; status reports that file's certificate,
// signed by the cluster CA, with its residual time at the given clock.
func TestHostReadsTheKubeletsRotatedCertificate(t *testing.T) {
	root := t.TempDir()
	now := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	ca, err := pki.NewCA(pki.ECDSAP256, "kubernetes", now.Add(-24*time.Hour), 10*365*24*time.Hour, big.NewInt(1))
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := pki.Sign(ca, pki.ECDSAP256, pki.Spec{CommonName: "system:node:w1", Organization: []string{"system:nodes"}, Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, now.Add(-time.Hour), now.Add(48*time.Hour), big.NewInt(77))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := pki.EncodeKey(leaf.Key)
	write := func(p string, b []byte) {
		full := hostfs.Path(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("/etc/kubernetes/pki/ca.crt", pki.EncodeCert(ca.Cert))
	write("/var/lib/kubelet/pki/kubelet-client-current.pem", append(pki.EncodeCert(leaf.Cert), key...))
	write("/etc/kubernetes/kubelet.conf", []byte(`apiVersion: v1
kind: Config
clusters:
- cluster: {server: "https://10.0.0.11:6443", certificate-authority: /etc/kubernetes/pki/ca.crt}
  name: default-cluster
users:
- name: default-auth
  user: {client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem, client-key: /var/lib/kubelet/pki/kubelet-client-current.pem}
contexts:
- context: {cluster: default-cluster, user: default-auth}
  name: default-context
current-context: default-context
`))
	certs, err := expiry.Host(root, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != 2 {
		t.Fatalf("got %d certificates, want ca.crt and kubelet.conf's: %+v", len(certs), certs)
	}
	if c := certs[0]; c.Path != "/etc/kubernetes/pki/ca.crt" || !c.IsCA || c.Authority != "" {
		t.Errorf("first = %+v", c)
	}
	c := certs[1]
	if c.Path != "/etc/kubernetes/kubelet.conf" || c.File != "/var/lib/kubelet/pki/kubelet-client-current.pem" || c.Authority != "ca" ||
		c.Serial != "4d" || c.Residual != 48*time.Hour || c.ResidualSeconds != 48*3600 || c.Subject != "CN=system:node:w1,O=system:nodes" {
		t.Errorf("kubelet.conf = %+v", c)
	}
}
