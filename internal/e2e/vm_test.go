package e2e_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/internal/vmimage"
)

// A guest: a Debian VM under QEMU (TCG: KVM guests hang on these
// machines) with a root disk from the vmimage cache, used copy-on-write so
// the cache stays clean, its cloud-init seed as a CD-ROM, and a TAP device
// on the test bridge. Its serial console goes to a file that a goroutine
// follows, stamping each line with the host's clock as it appears.
type guest struct {
	t       *testing.T
	name    string
	console string
	start   time.Time
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	stderr  strings.Builder

	mu    sync.Mutex
	lines []stamp
}

// consoleMarks are the console lines whose first appearance the e2e line
// reports, in boot order.
var consoleMarks = []struct{ name, pattern string }{
	{"kernel", `Linux version `},
	{"systemd", `systemd\[1\]: |Welcome to `},
	{"cloud-init final", `running 'modules:final'`},
	{"airadm verify", `airadm verify --manifest-digest`},
	{"airadm apply", `airadm apply --manifest-digest`},
	{"airadm done", `airadm-install: node \S+ finished with exit status`},
}

// startGuest boots name from img with seed attached and its NIC on tap.
func startGuest(t *testing.T, img vmimage.Image, name, tap, mac, seed, dir string) *guest {
	t.Helper()
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal("qemu-system-x86_64 is missing: apt-get install qemu-system-x86 (./hack/test installs it)")
	}
	g := &guest{t: t, name: name, console: filepath.Join(dir, name+"-console.log"), exited: make(chan struct{})}
	args := []string{
		"-nodefaults", "-display", "none", "-no-reboot",
		"-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048",
		"-kernel", img.Kernel, "-initrd", img.Initrd,
		"-append", "root=/dev/vda rw console=ttyS0 systemd.show_status=true",
		// snapshot=on: the guest's writes go to a temporary file, not
		// into the cached image.
		"-drive", "file=" + img.Root + ",if=virtio,format=raw,snapshot=on",
		// The seed as a CD-ROM, as a hypervisor attaches an ISO.
		"-device", "virtio-scsi-pci,id=scsi0",
		"-drive", "file=" + seed + ",if=none,id=seed,media=cdrom,format=raw,readonly=on",
		"-device", "scsi-cd,drive=seed,bus=scsi0.0",
		"-netdev", "tap,id=net0,ifname=" + tap + ",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=net0,mac=" + mac,
		"-serial", "file:" + g.console,
	}
	g.cmd = exec.Command(qemu, args...)
	g.cmd.Stderr = &g.stderr
	g.start = time.Now()
	if err := g.cmd.Start(); err != nil {
		t.Fatalf("starting QEMU for %s: %v", name, err)
	}
	go func() {
		g.waitErr = g.cmd.Wait()
		close(g.exited)
	}()
	t.Cleanup(g.stop)
	go g.follow()
	return g
}

// stop powers the guest off at once: it is thrown away.
func (g *guest) stop() {
	select {
	case <-g.exited:
		return
	default:
	}
	g.cmd.Process.Kill()
	<-g.exited
}

// follow reads the console file as QEMU writes it, until QEMU exits.
func (g *guest) follow() {
	var f *os.File
	var partial string
	for {
		done := false
		select {
		case <-g.exited:
			done = true
		case <-time.After(100 * time.Millisecond):
		}
		if f == nil {
			f, _ = os.Open(g.console)
		}
		if f != nil {
			b, _ := io.ReadAll(f)
			now := time.Now()
			partial += string(b)
			lines := strings.Split(partial, "\n")
			partial = lines[len(lines)-1]
			g.mu.Lock()
			for _, l := range lines[:len(lines)-1] {
				g.lines = append(g.lines, stamp{what: strings.TrimRight(l, "\r"), at: now})
			}
			g.mu.Unlock()
		}
		if done {
			if f != nil {
				f.Close()
			}
			return
		}
	}
}

// seen returns when a console line matching pattern first appeared.
func (g *guest) seen(pattern string) (string, time.Time, bool) {
	re := regexp.MustCompile(pattern)
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, l := range g.lines {
		if re.MatchString(l.what) {
			return l.what, l.at, true
		}
	}
	return "", time.Time{}, false
}

// tail is the console's last n lines, for failure messages.
func (g *guest) tail(n int) string {
	b, _ := os.ReadFile(g.console)
	return lastLines(string(b), n)
}

// fatalf fails the test with the guest's console tail.
func (g *guest) fatalf(format string, args ...any) {
	g.t.Helper()
	g.t.Fatalf("%s\n--- %s console (%s), last lines:\n%s", fmt.Sprintf(format, args...), g.name, g.console, g.tail(80))
}

// problem says why the guest cannot become a node any more: QEMU exited,
// or airadm in it finished with an error. It is nil while there is hope.
func (g *guest) problem() error {
	select {
	case <-g.exited:
		return fmt.Errorf("QEMU exited (%v) after %v: %s", g.waitErr, time.Since(g.start).Round(time.Second), strings.TrimSpace(g.stderr.String()))
	default:
	}
	if line, _, ok := g.seen(`airadm-install: node \S+ finished with exit status [1-9]`); ok {
		return fmt.Errorf("airadm failed in the guest: %s", line)
	}
	return nil
}

// marks lists the console marks seen, as offsets from power-on.
func (g *guest) marks() string {
	var parts []string
	for _, m := range consoleMarks {
		if _, at, ok := g.seen(m.pattern); ok {
			parts = append(parts, fmt.Sprintf("%s %s", m.name, since(g.start, at)))
		}
	}
	return strings.Join(parts, ", ")
}

// addTap puts a TAP device on the test bridge for a guest.
func addTap(t *testing.T, name string) {
	t.Helper()
	exec.Command("ip", "link", "del", name).Run() // a previous run's, if killed
	run(t, "ip", "tuntap", "add", "dev", name, "mode", "tap")
	t.Cleanup(func() { exec.Command("ip", "link", "del", name).Run() })
	run(t, "ip", "link", "set", "dev", name, "master", bridge, "up")
}

// vmImage builds the guest image if the cache lacks it.
func vmImage(t *testing.T, ctx context.Context) vmimage.Image {
	t.Helper()
	c := vmimage.Default()
	start := time.Now()
	var buildLog strings.Builder
	img, err := vmimage.Ensure(ctx, c, &buildLog)
	if err != nil {
		t.Fatalf("%v\n%s", err, lastLines(buildLog.String(), 40))
	}
	if buildLog.Len() > 0 {
		t.Logf("built the VM image %s in %v", img.Dir, time.Since(start).Round(time.Second))
	}
	return img
}

// hostFile is one [[host.files]] entry for a file written under dir.
func hostFile(t *testing.T, dir, path string, data []byte, mode string, roles ...string) string {
	t.Helper()
	src := filepath.Join(dir, filepath.Base(path))
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	entry := fmt.Sprintf("\n[[host.files]]\npath = %q\nsource = %q\nsha256 = \"%x\"\nmode = %q\n", path, src, sha256.Sum256(data), mode)
	if len(roles) > 0 {
		entry += fmt.Sprintf("roles = [\"%s\"]\n", strings.Join(roles, `", "`))
	}
	return entry
}

// TestVMWorker boots a worker as a real machine: a Debian VM with real
// systemd and cloud-init, nothing of Kubernetes installed, and only its
// cloud-init seed (written by airadm media cidata) attached. cloud-init
// runs airadm from the seed; the bundle's containerd and kubelet are
// started by systemd; the node joins the control plane, which runs
// natively here as in TestEndToEnd, by its token, becomes Ready and runs
// a pod.
func TestVMWorker(t *testing.T) {
	needRootAndTools(t, "namespaces, TAP devices and the image build", vmTools()...)
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Fatalf("the guest's TAP device needs /dev/net/tun: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	img := vmImage(t, ctx)

	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer reg.Close()
	repo := strings.TrimPrefix(reg.URL, "http://") + "/k8s"

	const vmAddr = "10.77.0.41"
	work := t.TempDir()
	cfg := filepath.Join(work, "cluster.toml")
	// The worker's pod network comes in its bundle: a VM has no test
	// harness to write it.
	conflist := hostFile(t, work, "/etc/cni/net.d/10-e2e.conflist", []byte(fmt.Sprintf(cniConfig, "10.244.1.0/24")), "0644", "worker")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`name = "vm"
[network]
pod_subnet = "10.244.0.0/16"
[pki]
algorithm = "ECDSA-P256"
[images]
repository = %q
`+buildMachineTOML+`[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.77.0.11"
kubelet_config = { cgroupRoot = "/airadm-e2e-cp1" }
[[nodes]]
# a VM: its address, and no route, from the seed's network-config
name = "vm1"
role = "worker"
address = %q
`, repo, vmAddr)+runtimeHostFiles(t)+conflist), 0o644)
	c := loadAndPush(t, cfg, repo)
	airadm := buildAiradm(t)
	out := filepath.Join(work, "out")
	airadmBuild(t, airadm, "-c", cfg, "-o", out)
	// The seed, as an operator writes it: the CLI, whose runner is this
	// airadm.
	seed := filepath.Join(work, "vm1-seed.iso")
	if b, err := exec.Command(airadm, "media", "cidata", "-c", cfg, "--from", out, "-o", seed, "vm1").CombinedOutput(); err != nil {
		t.Fatalf("airadm media cidata: %v\n%s", err, b)
	}

	network(t)
	mountPoints(t)
	// The VM boots while the control plane is applied: under TCG the
	// guest needs minutes to reach cloud-init's runcmd, the control plane
	// natively well under one, so the worker's figures do not include
	// waiting for it (the test checks).
	const tap = "airadm-vm0"
	addTap(t, tap)
	g := startGuest(t, img, "vm1", tap, "52:54:00:a1:4d:41", seed, work)
	cp := newNode(t, "cp1", "10.77.0.11")
	cp.makeCgroupRoot()
	cp.checkBare()
	os.WriteFile(filepath.Join(cp.dir, "etc_cni_net.d", "10-e2e.conflist"), []byte(fmt.Sprintf(cniConfig, "10.244.0.0/24")), 0o644)
	t.Cleanup(func() {
		if b, err := cp.run(context.Background(), airadm, "reset", "--force"); err != nil {
			t.Logf("reset cp1: %v\n%s", err, b)
		}
	})
	cpStart := time.Now()
	if b, err := cp.run(ctx, airadm, "apply", "--node", "cp1", "--kubelet", "exec", "--kubelet-binary", "/usr/local/bin/kubelet",
		filepath.Join(out, "cp1.bundle")); err != nil {
		t.Fatalf("airadm apply on cp1: %v\n%s", err, b)
	}
	cpTook := time.Since(cpStart)
	restCfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(cp.dir, "etc_kubernetes", "admin.conf"))
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		t.Fatal(err)
	}

	cpDone := time.Now()
	vmReady := watchNodeReady(ctx, cs, "vm1")
	readyAt := g.waitReady(ctx, vmReady, 12*time.Minute)
	runPodOn(t, ctx, cs, g, "vm1", c.PauseImage())
	n, total := readyNodes(t, ctx, cs)

	_, applyAt, _ := g.seen(`airadm apply --manifest-digest`)
	_, verifyAt, ok := g.seen(`airadm verify --manifest-digest`)
	if !ok {
		g.fatalf("the guest's console never showed airadm start")
	}
	if verifyAt.Before(cpDone) {
		t.Logf("note: airadm started in the guest %s before the control plane was up: the figures include waiting for it", since(verifyAt, cpDone))
	}
	t.Logf("vm1 console marks from power-on: %s; Ready %s", g.marks(), since(g.start, readyAt))
	fmt.Printf("vm-e2e: %d/%d nodes Ready, worker VM power-on to Ready %s, airadm start to Ready %s (apply to Ready %s); control plane natively in %s\n",
		n, total, since(g.start, readyAt), since(verifyAt, readyAt), since(applyAt, readyAt), cpTook.Round(100*time.Millisecond))
	fmt.Printf("vm-e2e: worker VM from power-on: %s\n", g.marks())
}

// waitReady waits for the node's Ready (from watchNodeReady), failing
// early, with the console's tail, if the guest can no longer get there.
func (g *guest) waitReady(ctx context.Context, ready <-chan time.Time, limit time.Duration) time.Time {
	g.t.Helper()
	deadline := time.After(limit)
	for {
		select {
		case at := <-ready:
			return at
		case <-deadline:
			g.fatalf("node %s not Ready %v after power-on", g.name, limit)
		case <-ctx.Done():
			g.fatalf("node %s not Ready: %v", g.name, ctx.Err())
		case <-time.After(time.Second):
			if err := g.problem(); err != nil {
				g.fatalf("node %s cannot become Ready: %v", g.name, err)
			}
		}
	}
}

// runPodOn runs a pause pod on node and waits until it runs.
func runPodOn(t *testing.T, ctx context.Context, cs kubernetes.Interface, g *guest, node, image string) {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "on-" + node, Namespace: "default"},
		Spec: corev1.PodSpec{
			NodeSelector: map[string]string{"kubernetes.io/hostname": node},
			Containers:   []corev1.Container{{Name: "pause", Image: image, ImagePullPolicy: corev1.PullNever}},
		},
	}
	if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Minute)
	var last error
	for time.Now().Before(deadline) {
		p, err := cs.CoreV1().Pods("default").Get(ctx, pod.Name, metav1.GetOptions{})
		if err == nil && p.Status.Phase == corev1.PodRunning && p.Spec.NodeName == node {
			return
		}
		if err == nil {
			err = fmt.Errorf("phase %s on %q: %s", p.Status.Phase, p.Spec.NodeName, podWhy(p))
		}
		last = err
		time.Sleep(2 * time.Second)
	}
	g.fatalf("no pod running on %s after 5 minutes: %v\nits events:\n%s", node, last, podEvents(ctx, cs, pod))
}

// podEvents lists what the kubelet and scheduler reported about pod, with
// the runtime's own errors (a failed sandbox says why there).
func podEvents(ctx context.Context, cs kubernetes.Interface, pod *corev1.Pod) string {
	evs, err := cs.CoreV1().Events(pod.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod.Name})
	if err != nil {
		return "listing events: " + err.Error()
	}
	var b strings.Builder
	for _, e := range evs.Items {
		fmt.Fprintf(&b, "  %s %s x%d: %s\n", e.Type, e.Reason, e.Count, e.Message)
	}
	return b.String()
}

// podWhy is what a pod's container statuses say about it.
func podWhy(p *corev1.Pod) string {
	var why []string
	for _, s := range p.Status.ContainerStatuses {
		if w := s.State.Waiting; w != nil {
			why = append(why, w.Reason+": "+w.Message)
		}
	}
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue && c.Message != "" {
			why = append(why, string(c.Type)+": "+c.Message)
		}
	}
	return strings.Join(why, "; ")
}

// readyNodes counts the Ready nodes among all.
func readyNodes(t *testing.T, ctx context.Context, cs kubernetes.Interface) (ready, total int) {
	t.Helper()
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, nd := range nodes.Items {
		for _, c := range nd.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				ready++
			}
		}
	}
	return ready, len(nodes.Items)
}

// vmTools are what the VM tests run besides the nodes' tools.
func vmTools() []tool {
	return []tool{{"qemu-system-x86_64", "qemu-system-x86"}, {"mmdebstrap", "mmdebstrap"}, {"mkfs.ext4", "e2fsprogs"}}
}
