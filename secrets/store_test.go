package secrets_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
)

const base = `
name = "s"
control_plane_endpoint = "10.0.0.10:6443"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
[[nodes]]
name = "w1"
role = "worker"
address = "10.0.0.21"
`

func ensure(t *testing.T, dir, config string, now time.Time) (*render.Secrets, []string, error) {
	t.Helper()
	c, err := render.Parse("cluster.toml", []byte(config))
	if err != nil {
		t.Fatal(err)
	}
	st, err := secrets.Open(filepath.Join(dir, "secrets"), func() time.Time { return now }, clustertest.Seed(t, 7))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var log []string
	st.Log = func(l string) { log = append(log, strings.ReplaceAll(l, dir+"/", "")) }
	s, err := st.Ensure(c)
	return s, log, err
}

func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		info, _ := d.Info()
		out[strings.TrimPrefix(p, dir+"/")] = info.Mode().String() + " " + info.ModTime().String() + " " + string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestCreatedOnceThenReused(t *testing.T) {
	dir := t.TempDir()
	s1, log, err := ensure(t, dir, base, clustertest.Now)
	if err != nil {
		t.Fatal(err)
	}
	if len(log) != 17 { // 3 CAs, sa.key, 12 leaves, 1 token
		t.Errorf("first run created %d items, want 17: %q", len(log), log)
	}
	before := snapshot(t, dir)
	s2, log, err := ensure(t, dir, base, clustertest.Now.Add(48*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(log) != 0 {
		t.Errorf("second run changed material: %q", log)
	}
	after := snapshot(t, dir)
	for p, v := range before {
		if after[p] != v {
			t.Errorf("%s changed on reuse", p)
		}
	}
	if !s1.CAs[render.ClusterCA].Cert.Equal(s2.CAs[render.ClusterCA].Cert) || s1.Tokens["w1"] != s2.Tokens["w1"] {
		t.Error("reuse returned different material")
	}

	info, err := os.Stat(filepath.Join(dir, "secrets"))
	if err != nil || info.Mode().Perm() != 0o700 {
		t.Errorf("secrets dir mode = %v, want 0700", info.Mode())
	}
	modes := map[string]fs.FileMode{
		"pki/ca.key": 0o600, "pki/ca.crt": 0o644, "pki/sa.key": 0o600, "pki/etcd/ca.key": 0o600,
		"nodes/cp1/apiserver.key": 0o600, "nodes/cp1/kubeconfig/admin.conf.key": 0o600,
		"tokens/w1.token": 0o600, ".lock": 0o600,
	}
	for p, want := range modes {
		info, err := os.Stat(filepath.Join(dir, "secrets", p))
		if err != nil || info.Mode().Perm() != want {
			t.Errorf("%s: mode %v (%v), want %o", p, info.Mode(), err, want)
		}
	}
}

func TestAddedNodeIssuedFromSameCAs(t *testing.T) {
	dir := t.TempDir()
	s1, _, err := ensure(t, dir, base, clustertest.Now)
	if err != nil {
		t.Fatal(err)
	}
	more := base + `
[[nodes]]
name = "cp2"
role = "control-plane"
address = "10.0.0.12"
[[nodes]]
name = "w2"
role = "worker"
address = "10.0.0.22"
`
	s2, log, err := ensure(t, dir, more, clustertest.Now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(log) != 13 { // cp2's 12 leaves and w2's token; nothing else
		t.Errorf("adding nodes created %q", log)
	}
	for _, l := range log {
		if !strings.Contains(l, "nodes/cp2/") && !strings.Contains(l, "tokens/w2") {
			t.Errorf("adding nodes touched %s", l)
		}
	}
	ca := s1.CAs[render.ClusterCA].Cert
	if err := s2.Leaves["cp2"]["apiserver"].Cert.CheckSignatureFrom(ca); err != nil {
		t.Errorf("cp2 apiserver not signed by the original CA: %v", err)
	}
	if !s2.Leaves["cp1"]["apiserver"].Cert.Equal(s1.Leaves["cp1"]["apiserver"].Cert) {
		t.Error("cp1's certificate changed when cp2 was added")
	}
}

func TestChangedSANsReissueOnlyTheAPIServer(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := ensure(t, dir, base, clustertest.Now); err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(base, `algorithm = "ECDSA-P256"`, "algorithm = \"ECDSA-P256\"\nextra_sans = [\"api.s.example\"]", 1)
	s, log, err := ensure(t, dir, changed, clustertest.Now)
	if err != nil {
		t.Fatal(err)
	}
	if len(log) != 1 || !strings.HasPrefix(log[0], "reissued (names in the config changed) secrets/nodes/cp1/apiserver.crt") {
		t.Errorf("log = %q", log)
	}
	if got := s.Leaves["cp1"]["apiserver"].Cert.DNSNames; got[len(got)-1] != "api.s.example" {
		t.Errorf("reissued SANs = %q", got)
	}
}

func TestCAsAreNeverRegenerated(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := ensure(t, dir, base, clustertest.Now); err != nil {
		t.Fatal(err)
	}
	rsa := strings.Replace(base, "ECDSA-P256", "RSA-2048", 1)
	_, _, err := ensure(t, dir, rsa, clustertest.Now)
	if err == nil || !strings.Contains(err.Error(), "its key is ECDSA-P256 but pki.algorithm is RSA-2048; CAs are never regenerated") {
		t.Fatalf("err = %v", err)
	}
}

func TestConcurrentRunsAreLockedOut(t *testing.T) {
	dir := t.TempDir()
	st, err := secrets.Open(dir, time.Now, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	_, err = secrets.Open(dir, time.Now, nil)
	if !errors.Is(err, secrets.ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
	st.Close()
	st2, err := secrets.Open(dir, time.Now, nil)
	if err != nil {
		t.Fatalf("Open after Close = %v", err)
	}
	st2.Close()
}

func TestDamagedMaterialIsReportedNotReplaced(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := ensure(t, dir, base, clustertest.Now); err != nil {
		t.Fatal(err)
	}
	tok := filepath.Join(dir, "secrets/tokens/w1.token")
	if err := os.WriteFile(tok, []byte("abcdef.SECRETSECRETSECR\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := ensure(t, dir, base, clustertest.Now)
	if err == nil || !strings.Contains(err.Error(), "w1.token: not a bootstrap token") {
		t.Fatalf("err = %v", err)
	}
	if strings.Contains(err.Error(), "SECRET") {
		t.Error("the error leaks the token's content")
	}
	b, _ := os.ReadFile(tok)
	if string(b) != "abcdef.SECRETSECRETSECR\n" {
		t.Error("a damaged token was overwritten")
	}

	os.Remove(tok)
	key := filepath.Join(dir, "secrets/pki/etcd/ca.key")
	other, _ := os.ReadFile(filepath.Join(dir, "secrets/pki/ca.key"))
	if err := os.WriteFile(key, other, 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err = ensure(t, dir, base, clustertest.Now)
	if err == nil || !strings.Contains(err.Error(), "etcd/ca.key: it is not the key of") {
		t.Fatalf("err = %v", err)
	}
}
