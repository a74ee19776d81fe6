//go:build vmfull

package e2e_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/bundle"
)

// TestVMFull is TestVMWorker with the control plane in a VM as well: two
// Debian guests, each with only its seed attached, and nothing run on the
// host but QEMU and the test's reads of the cluster. Not in CI (just
// vm-e2e-full): under TCG a control plane takes many minutes.
func TestVMFull(t *testing.T) {
	needRootAndTools(t, "namespaces, TAP devices and the image build", vmTools()...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	img := vmImage(t, ctx)

	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer reg.Close()
	repo := strings.TrimPrefix(reg.URL, "http://") + "/k8s"
	work := t.TempDir()
	cfg := filepath.Join(work, "cluster.toml")
	// Real hosts: systemd's cgroup driver (the default), no settings for
	// the build machines' limits. Each role's pod network in its bundle.
	cni := hostFile(t, work, "/etc/cni/net.d/10-e2e-cp.conflist", []byte(fmt.Sprintf(cniConfig, "10.244.0.0/24")), "0644", "control-plane") +
		hostFile(t, work, "/etc/cni/net.d/10-e2e-worker.conflist", []byte(fmt.Sprintf(cniConfig, "10.244.1.0/24")), "0644", "worker")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`name = "vmfull"
[network]
pod_subnet = "10.244.0.0/16"
[pki]
algorithm = "ECDSA-P256"
[images]
repository = %q
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.77.0.11"
[[nodes]]
name = "w1"
role = "worker"
address = "10.77.0.21"
`, repo)+runtimeHostFiles(t)+cni), 0o644)
	c := loadAndPush(t, cfg, repo)
	airadm := buildAiradm(t)
	out := filepath.Join(work, "out")
	airadmBuild(t, airadm, "-c", cfg, "-o", out)
	seeds := map[string]string{}
	for _, n := range []string{"cp1", "w1"} {
		seeds[n] = filepath.Join(work, n+"-seed.iso")
		if b, err := exec.Command(airadm, "media", "cidata", "-c", cfg, "--from", out, "-o", seeds[n], n).CombinedOutput(); err != nil {
			t.Fatalf("airadm media cidata %s: %v\n%s", n, err, b)
		}
	}
	// The host reads the cluster with the admin.conf the build put in the
	// control plane's bundle.
	admin := filepath.Join(work, "admin.conf")
	bundleFile(t, filepath.Join(out, "cp1.bundle"), "/etc/kubernetes/admin.conf", admin)
	restCfg, err := clientcmd.BuildConfigFromFlags("", admin)
	if err != nil {
		t.Fatal(err)
	}
	restCfg.Timeout = 10 * time.Second
	cs, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		t.Fatal(err)
	}

	network(t)
	addTap(t, "airadm-vm0")
	addTap(t, "airadm-vm1")
	cpReady := watchNodeReady(ctx, cs, "cp1")
	cp := startGuest(t, img, "cp1", "airadm-vm0", "52:54:00:a1:4d:11", seeds["cp1"], work)
	// The worker boots once the control plane's airadm has finished, so
	// its own figures do not include waiting for it.
	deadline := time.Now().Add(30 * time.Minute)
	for {
		if _, _, ok := cp.seen(`airadm-install: node cp1 finished with exit status 0`); ok {
			break
		}
		if err := cp.problem(); err != nil {
			cp.fatalf("the control plane VM cannot come up: %v", err)
		}
		if time.Now().After(deadline) {
			cp.fatalf("airadm did not finish in the control plane VM within 30 minutes")
		}
		time.Sleep(2 * time.Second)
	}
	cpReadyAt := cp.waitReady(ctx, cpReady, 10*time.Minute)
	wReady := watchNodeReady(ctx, cs, "w1")
	w := startGuest(t, img, "w1", "airadm-vm1", "52:54:00:a1:4d:21", seeds["w1"], work)
	wReadyAt := w.waitReady(ctx, wReady, 20*time.Minute)
	runPodOn(t, ctx, cs, w, "w1", c.PauseImage())
	n, total := readyNodes(t, ctx, cs)
	_, cpAiradm, _ := cp.seen(`airadm verify --manifest-digest`)
	_, wAiradm, _ := w.seen(`airadm verify --manifest-digest`)
	fmt.Printf("vm-e2e-full: %d/%d nodes Ready; control plane VM power-on to Ready %s (airadm start to Ready %s); worker VM power-on to Ready %s (airadm start to Ready %s)\n",
		n, total, since(cp.start, cpReadyAt), since(cpAiradm, cpReadyAt), since(w.start, wReadyAt), since(wAiradm, wReadyAt))
	fmt.Printf("vm-e2e-full: cp1 from power-on: %s\n", cp.marks())
	fmt.Printf("vm-e2e-full: w1 from power-on: %s\n", w.marks())
}

// bundleFile copies the bundle entry for host path p to dst.
func bundleFile(t *testing.T, bundlePath, p, dst string) {
	t.Helper()
	f, err := os.Open(bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var data []byte
	if _, _, err := bundle.Read(f, bundle.Visitor{File: func(fe bundle.FileEntry, r io.Reader) error {
		if fe.Path != p {
			return nil
		}
		var err error
		data, err = io.ReadAll(r)
		return err
	}}); err != nil {
		t.Fatalf("reading %s: %v", bundlePath, err)
	}
	if data == nil {
		t.Fatalf("%s carries no %s", bundlePath, p)
	}
	if err := os.WriteFile(dst, data, 0o600); err != nil {
		t.Fatal(err)
	}
}
