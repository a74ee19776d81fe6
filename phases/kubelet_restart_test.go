package phases_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
)

// fakeKubeletPort, set in its environment, makes the test binary a
// stand-in kubelet: it answers /healthz there until killed.
const fakeKubeletPort = "AIRADM_TEST_FAKE_KUBELET_PORT"

func TestMain(m *testing.M) {
	if port := os.Getenv(fakeKubeletPort); port != "" {
		http.ListenAndServe("127.0.0.1:"+port, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") }))
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// TestKubeletRestartsOnlyWhenItsFilesChange: the kubelet phase leaves a
// running kubelet alone when the bundle changes none of its files, and
// restarts it when a new [kubelet.config] setting rewrites config.yaml.
// The kubelet is a stand-in (this test binary, run as "kubelet") because a
// real one needs a container runtime; internal/controlplane's
// TestLiveRenewalAndConverge applies such a change to a live control plane.
func TestKubeletRestartsOnlyWhenItsFilesChange(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	t.Setenv(fakeKubeletPort, strconv.Itoa(port))
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	kubelet := filepath.Join(t.TempDir(), "kubelet")
	if err := os.Symlink(self, kubelet); err != nil {
		t.Fatal(err)
	}
	config := func(maxPods int) string {
		return cfg + fmt.Sprintf("[kubelet.config]\nhealthzPort = %d\nmaxPods = %d\n", port, maxPods)
	}
	c := clustertest.New(t, config(110))
	root := t.TempDir()
	pid := func() int {
		b, _ := os.ReadFile(hostfs.Path(root, render.AiradmStateDir+"/kubelet.pid"))
		n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return n
	}
	t.Cleanup(func() {
		if p := pid(); p > 0 {
			syscall.Kill(p, syscall.SIGKILL)
		}
	})
	var log bytes.Buffer
	apply := func(c *clustertest.Cluster) string {
		t.Helper()
		path, digest := c.Bundle(t, "cp1", nil, nil)
		log.Reset()
		err := phases.Apply(context.Background(), phases.Options{
			Bundle: path, ManifestDigest: digest, Root: root, Node: "cp1", Out: &log,
			Kubelet: phases.KubeletExec, KubeletBinary: kubelet, Timeout: 30 * time.Second,
			SkipPhases: []string{"preflight", "runtime", "images", "etcd-join", "wait-etcd", "wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons"},
		})
		if err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		return log.String()
	}

	if out := apply(c); !strings.Contains(out, "healthy") {
		t.Fatalf("the first apply did not start the kubelet:\n%s", out)
	}
	first := pid()
	if out := apply(c); !strings.Contains(out, fmt.Sprintf("kubelet already running (pid %d); its files are unchanged", first)) || !strings.Contains(out, "nothing changed") {
		t.Errorf("the same bundle again:\n%s", out)
	}

	// The rebuild `airadm build` makes after [kubelet.config] changed.
	if err := os.WriteFile(filepath.Join(c.Dir, "cluster.toml"), []byte(config(42)), 0o644); err != nil {
		t.Fatal(err)
	}
	rc, err := render.Load(filepath.Join(c.Dir, "cluster.toml"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := secrets.Open(filepath.Join(c.Dir, "secrets"), func() time.Time { return clustertest.Now }, clustertest.Seed(t, 2))
	if err != nil {
		t.Fatal(err)
	}
	s, err := st.Ensure(rc)
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	out := apply(&clustertest.Cluster{Cluster: rc, Secrets: s, Dir: c.Dir})
	for _, want := range []string{
		"replaced " + render.KubeletConfigFile,
		fmt.Sprintf("stopped kubelet (pid %d) to restart it: %s changed", first, render.KubeletConfigFile),
		"healthy",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("apply did not say %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "kubelet restart kube-") {
		t.Errorf("a kubelet setting restarted a static pod:\n%s", out)
	}
	if second := pid(); second == first || second == 0 {
		t.Errorf("kubelet pid %d after the restart, was %d", second, first)
	}
	if err := syscall.Kill(first, 0); err == nil {
		if stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", first)); !strings.Contains(string(stat), ") Z ") {
			t.Errorf("the old kubelet (pid %d) still runs", first)
		}
	}
}
