package build

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// cniTarball is a stand-in for the CNI plugins' release tarball: ./name
// entries with mode 0755.
func cniTarball(t testing.TB, names ...string) []byte {
	t.Helper()
	var buf bytes.Buffer
	gw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gw)
	tw.WriteHeader(&tar.Header{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755})
	for _, n := range names {
		body := []byte("#!plugin " + n)
		tw.WriteHeader(&tar.Header{Name: "./" + n, Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(body))})
		tw.Write(body)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	gw.Close()
	return buf.Bytes()
}

// withHost appends a [host] section to the quickstart's config.
func withHost(t testing.TB, cfg, host string) {
	t.Helper()
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.WriteString(f, "\n"+host); err != nil {
		t.Fatal(err)
	}
}

// bundleFiles reads a bundle in full (verifying it) and returns its files
// as path -> "mode content".
func bundleFiles(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]string{}
	_, _, err = bundle.Read(f, bundle.Visitor{File: func(fe bundle.FileEntry, r io.Reader) error {
		b, err := io.ReadAll(r)
		out[fe.Path] = fe.Mode + " " + string(b)
		return err
	}})
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	return out
}

// TestHostFilesLocal: local files and an archive land in the bundles of
// the roles that want them, with their modes; a second build is
// byte-identical.
func TestHostFilesLocal(t *testing.T) {
	cfg := quickstart(t)
	dir := filepath.Dir(cfg)
	kubelet := []byte("kubelet binary")
	os.WriteFile(filepath.Join(dir, "kubelet"), kubelet, 0o644)
	os.MkdirAll(filepath.Join(dir, "bin"), 0o755)
	runc := []byte("runc binary")
	os.WriteFile(filepath.Join(dir, "bin", "runc.amd64"), runc, 0o644)
	cni := cniTarball(t, "bridge", "host-local", "loopback")
	os.WriteFile(filepath.Join(dir, "cni.tgz"), cni, 0o644)
	withHost(t, cfg, fmt.Sprintf(`
[[host.files]]
path = "/usr/bin/kubelet"
source = "kubelet"
sha256 = %q

[[host.files]]
path = "/usr/local/sbin/runc"
source = "bin/runc.amd64"
sha256 = %q
mode = "0700"
roles = ["worker"]

[[host.archives]]
dir = "/opt/cni/bin"
source = "cni.tgz"
sha256 = %q
`, sha(kubelet), sha(runc), sha(cni)))
	out := filepath.Join(t.TempDir(), "out")
	res, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225600, 0))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		node string
		want map[string]string
	}{
		{"cp1", map[string]string{
			"/usr/bin/kubelet": "0755 kubelet binary", "/opt/cni/bin/bridge": "0755 #!plugin bridge",
			"/opt/cni/bin/host-local": "0755 #!plugin host-local", "/opt/cni/bin/loopback": "0755 #!plugin loopback",
			"/usr/local/sbin/runc": "",
		}},
		{"w1", map[string]string{
			"/usr/bin/kubelet": "0755 kubelet binary", "/usr/local/sbin/runc": "0700 runc binary", "/opt/cni/bin/bridge": "0755 #!plugin bridge",
		}},
	} {
		got := bundleFiles(t, filepath.Join(out, tc.node+".bundle"))
		for p, want := range tc.want {
			if got[p] != want {
				t.Errorf("%s: %s = %q, want %q", tc.node, p, got[p], want)
			}
		}
	}
	// Deterministic: the same inputs and secrets give the same bytes.
	res2, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225600, 0))
	if err != nil {
		t.Fatal(err)
	}
	for i := range res.Bundles {
		if res.Bundles[i].SHA256 != res2.Bundles[i].SHA256 {
			t.Errorf("%s: rebuild changed the bundle", res.Bundles[i].Node)
		}
	}
}

// TestHostFilesBadInput: a wrong digest, a missing file, a hostile archive
// and two sources for one path are all reported at once as an InputError,
// naming the sources and, for the mismatch, both digests; nothing is
// created: no secrets/, no output.
func TestHostFilesBadInput(t *testing.T) {
	cfg := quickstart(t)
	dir := filepath.Dir(cfg)
	data := []byte("the real kubelet")
	os.WriteFile(filepath.Join(dir, "kubelet"), data, 0o644)
	var evil bytes.Buffer
	tw := tar.NewWriter(&evil)
	tw.WriteHeader(&tar.Header{Name: "bin/sh", Typeflag: tar.TypeSymlink, Linkname: "/bin/busybox"})
	tw.Close()
	os.WriteFile(filepath.Join(dir, "evil.tar"), evil.Bytes(), 0o644)
	other := cniTarball(t, "crictl")
	os.WriteFile(filepath.Join(dir, "other.tgz"), other, 0o644)
	wrong := strings.Repeat("ab", 32)
	withHost(t, cfg, fmt.Sprintf(`
[[host.files]]
path = "/usr/bin/kubelet"
source = "kubelet"
sha256 = %q

[[host.files]]
path = "/usr/bin/kubectl"
source = "no-such-file"
sha256 = %q

[[host.files]]
path = "/usr/bin/crictl"
source = "kubelet"
sha256 = %q

[[host.archives]]
dir = "/"
source = "evil.tar"
sha256 = %q

[[host.archives]]
dir = "/usr/bin"
source = "other.tgz"
sha256 = %q
`, wrong, wrong, sha(data), sha(evil.Bytes()), sha(other)))
	out := filepath.Join(t.TempDir(), "out")
	_, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225600, 0))
	var ie *InputError
	if !errors.As(err, &ie) {
		t.Fatalf("err = %v, want an InputError", err)
	}
	for _, want := range []string{
		fmt.Sprintf("fetching %s: sha256 mismatch: got %s, want %s", filepath.Join(dir, "kubelet"), sha(data), wrong),
		fmt.Sprintf("fetching %s: no such file or directory", filepath.Join(dir, "no-such-file")),
		fmt.Sprintf(`unpacking %s: entry "bin/sh": is a symlink (to "/bin/busybox")`, filepath.Join(dir, "evil.tar")),
		"host file /usr/bin/crictl comes from both",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	for _, p := range []string{out, filepath.Join(dir, "secrets")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s exists after a refused build", p)
		}
	}
}

// countingServer serves files by path over TLS and counts requests and
// bytes sent.
type countingServer struct {
	*httptest.Server
	requests, bytes atomic.Int64
}

func newCountingServer(t *testing.T, files map[string][]byte) *countingServer {
	cs := &countingServer{}
	cs.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cs.requests.Add(1)
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		n, _ := w.Write(b)
		cs.bytes.Add(int64(n))
	}))
	t.Cleanup(cs.Close)
	return cs
}

// TestHostFilesURLFetchedOnce: a URL source is fetched once for all nodes
// that carry it, and a second build fetches nothing.
func TestHostFilesURLFetchedOnce(t *testing.T) {
	kubelet := bytes.Repeat([]byte("kubelet"), 100000)
	srv := newCountingServer(t, map[string][]byte{"/kubelet": kubelet})
	cfg := quickstart(t)
	withHost(t, cfg, fmt.Sprintf(`
[[host.files]]
path = "/usr/bin/kubelet"
source = "%s/kubelet"
sha256 = %q
`, srv.URL, sha(kubelet)))
	out := filepath.Join(t.TempDir(), "out")
	c, err := render.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	build := func() {
		t.Helper()
		_, err := Run(context.Background(), Options{
			ConfigPath: cfg, Cluster: c, Out: out, CacheDir: filepath.Join(filepath.Dir(cfg), ".cache"), Jobs: 4,
			BuildTime: time.Unix(1767225600, 0), Now: time.Now, Rand: rand.Reader, HTTPClient: srv.Client(),
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	build()
	if r, b := srv.requests.Load(), srv.bytes.Load(); r != 1 || b != int64(len(kubelet)) {
		t.Errorf("3 nodes: %d requests, %d bytes; want 1 request of %d bytes", r, b, len(kubelet))
	}
	for _, n := range []string{"cp1", "w1", "w2"} {
		if got := bundleFiles(t, filepath.Join(out, n+".bundle"))["/usr/bin/kubelet"]; got != "0755 "+string(kubelet) {
			t.Errorf("%s: /usr/bin/kubelet has %d bytes", n, len(got))
		}
	}
	build()
	if r, b := srv.requests.Load(), srv.bytes.Load(); r != 1 || b != int64(len(kubelet)) {
		t.Errorf("after a second build: %d requests, %d bytes in all; want nothing more fetched", r, b)
	}
}

// TestHostFilesSSLCertFile runs builds in child processes with Go's default
// HTTP client, as the CLI does: the loopback server's CA is trusted through
// SSL_CERT_FILE and only through it, and a second source with a wrong
// sha256 is refused with nothing written.
func TestHostFilesSSLCertFile(t *testing.T) {
	good, bad := []byte("kubectl binary"), []byte("crictl binary")
	srv := newCountingServer(t, map[string][]byte{"/kubectl": good, "/crictl": bad})
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	child := func(cfg, out string, env ...string) (string, error) {
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), "AIRADM_TEST_BUILD_CHILD="+cfg, "AIRADM_TEST_BUILD_OUT="+out, "AIRADM_TEST_BUILD_TIME=1767225600", "SSL_CERT_DIR=/nonexistent")
		cmd.Env = append(cmd.Env, env...)
		b, err := cmd.CombinedOutput()
		return string(b), err
	}
	hostFile := func(name string, data []byte, sum string) string {
		return fmt.Sprintf("\n[[host.files]]\npath = \"/usr/bin/%s\"\nsource = \"%s/%s\"\nsha256 = %q\n", name, srv.URL, name, sum)
	}

	cfg := quickstart(t)
	withHost(t, cfg, hostFile("kubectl", good, sha(good)))
	out := filepath.Join(filepath.Dir(cfg), "out")
	if msg, err := child(cfg, out, "SSL_CERT_FILE=/nonexistent"); err == nil || !strings.Contains(msg, "certificate") {
		t.Fatalf("a build that does not trust the server's CA: err %v, output %s", err, msg)
	}
	if msg, err := child(cfg, out, "SSL_CERT_FILE="+caFile); err != nil {
		t.Fatalf("build trusting the CA through SSL_CERT_FILE: %v\n%s", err, msg)
	}
	if got := bundleFiles(t, filepath.Join(out, "w1.bundle"))["/usr/bin/kubectl"]; got != "0755 kubectl binary" {
		t.Errorf("/usr/bin/kubectl = %q", got)
	}

	cfg = quickstart(t)
	wrong := sha([]byte("something else"))
	withHost(t, cfg, hostFile("kubectl", good, sha(good))+hostFile("crictl", bad, wrong))
	out = filepath.Join(filepath.Dir(cfg), "out")
	msg, err := child(cfg, out, "SSL_CERT_FILE="+caFile)
	want := fmt.Sprintf("fetching %s/crictl: sha256 mismatch: got %s, want %s", srv.URL, sha(bad), wrong)
	if err == nil || !strings.Contains(msg, want) {
		t.Errorf("build with a wrong sha256: err %v, output %q; want %q", err, msg, want)
	}
	for _, p := range []string{out, filepath.Join(filepath.Dir(cfg), "secrets")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s exists after a refused build", p)
		}
	}
}

// TestHostBinaryWithSecretMarker: the real kubelet and kubectl contain the
// bytes client-key-data (client-go's kubeconfig struct tags), which the
// reader's scan of a worker's files looks for. A worker's bundle that
// carries them under /usr must still read; the same bytes in a file of
// the directories airadm renders into, or anywhere under /etc, are still
// refused.
func TestHostBinaryWithSecretMarker(t *testing.T) {
	cfg := quickstart(t)
	dir := filepath.Dir(cfg)
	kubelet := []byte("\x7fELF...`json:\"client-key-data,omitempty\"`...")
	os.WriteFile(filepath.Join(dir, "kubelet"), kubelet, 0o644)
	withHost(t, cfg, fmt.Sprintf(`
[[host.files]]
path = "/usr/bin/kubelet"
source = "kubelet"
sha256 = %q
`, sha(kubelet)))
	out := filepath.Join(t.TempDir(), "out")
	if _, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225600, 0)); err != nil {
		t.Fatal(err)
	}
	if got := bundleFiles(t, filepath.Join(out, "w1.bundle"))["/usr/bin/kubelet"]; got != "0755 "+string(kubelet) {
		t.Errorf("/usr/bin/kubelet = %q", got)
	}

	cfg = quickstart(t)
	dir = filepath.Dir(cfg)
	os.WriteFile(filepath.Join(dir, "kubelet"), kubelet, 0o644)
	withHost(t, cfg, fmt.Sprintf(`
[[host.files]]
path = "/etc/default/kubelet-key"
source = "kubelet"
sha256 = %q
`, sha(kubelet)))
	out = filepath.Join(t.TempDir(), "out")
	if _, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225600, 0)); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(out, "w1.bundle"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, _, err := bundle.Read(f, bundle.Visitor{}); err == nil || !strings.Contains(err.Error(), "client-key-data") {
		t.Errorf("a worker's bundle with client-key-data under /etc read with error %v", err)
	}
}

func TestUstarName(t *testing.T) {
	for _, tc := range []struct {
		path string
		ok   bool
	}{
		{"/usr/bin/kubelet", true},
		{"/" + strings.Repeat("a", 94), true},  // files/ + 94 = 100 bytes, whole
		{"/" + strings.Repeat("a", 100), true}, // split after files/
		{"/" + strings.Repeat("a", 101), false},
		{"/" + strings.Repeat("d", 149) + "/" + strings.Repeat("f", 100), true},  // 155 + 100
		{"/" + strings.Repeat("d", 150) + "/" + strings.Repeat("f", 100), false}, // prefix 156
		{"/d/" + strings.Repeat("f", 101), false},
	} {
		if got := ustarName(tc.path); got != tc.ok {
			t.Errorf("ustarName(%d bytes) = %v, want %v", len(tc.path), got, tc.ok)
		}
	}
}
