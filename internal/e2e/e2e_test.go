// Package e2e_test is the whole story on one machine: images built from
// the pinned binaries in a loopback registry, `airadm build`, `airadm apply`
// of a control plane and a worker, each in its own network and mount
// namespace with its own containerd and kubelet, and the real kubeadm
// reading the result.
package e2e_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
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

	"filippo.io/age"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/crypto/ssh"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/render"
)

// binaryImage is one layer holding bin at /usr/local/bin/<name> (or at
// path), uncompressed: everything stays on this machine, and skipping gzip
// keeps the test fast.
func binaryImage(t *testing.T, bin, path string, entrypoint []string) v1.Image {
	t.Helper()
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := strings.Split(strings.Trim(filepath.Dir(path), "/"), "/")
	for i := range dirs {
		if dirs[i] == "" {
			continue
		}
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: strings.Join(dirs[:i+1], "/") + "/", Mode: 0o755})
	}
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(path, "/"), Mode: 0o755, Size: int64(len(data))})
	tw.Write(data)
	tw.Close()
	layer := static.NewLayer(buf.Bytes(), types.OCIUncompressedLayer)
	img, err := mutate.AppendLayers(mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON), layer)
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.Config(img, v1.Config{Env: []string{"PATH=/usr/local/bin:/usr/bin:/bin"}, Entrypoint: entrypoint})
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf.OS, cf.Architecture = "linux", "amd64"
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// pushImages builds kubeadm's seven images from the binaries of the
// cluster's version and pushes them to a loopback registry under host/k8s.
// loadAndPush loads the cluster config at cfg and pushes the images it
// needs to the test registry at repo.
func loadAndPush(t *testing.T, cfg, repo string) *render.Cluster {
	t.Helper()
	c, err := render.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	pushImages(t, repo, c)
	return c
}

// airadmBuild runs airadm build with args, failing the test with its
// output.
func airadmBuild(t *testing.T, airadm string, args ...string) {
	t.Helper()
	if out, err := exec.Command(airadm, append([]string{"build"}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("airadm build %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func pushImages(t *testing.T, repo string, c *render.Cluster) {
	t.Helper()
	pause := filepath.Join(t.TempDir(), "pause")
	build := exec.Command("go", "build", "-o", pause, "./hack/pause")
	build.Dir = "../.."
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building pause: %v\n%s", err, out)
	}
	for _, im := range c.CoreImages() {
		var img v1.Image
		switch im.Component {
		case "pause":
			img = binaryImage(t, pause, "/pause", []string{"/pause"})
		case "coredns":
			bin, err := k8sbin.Path("coredns")
			if err != nil {
				t.Fatal(err)
			}
			img = binaryImage(t, bin, "/coredns", []string{"/coredns"})
		default:
			bin, err := k8sbin.PathFor(c.KubernetesVersion, im.Component)
			if err != nil {
				t.Fatal(err)
			}
			img = binaryImage(t, bin, "/usr/local/bin/"+im.Component, nil)
		}
		ref, err := name.ParseReference(im.Ref)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(ref, img); err != nil {
			t.Fatalf("pushing %s: %v", im.Ref, err)
		}
	}
}

func buildAiradm(t *testing.T, tags ...string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "airadm")
	cmd := exec.Command("go", "build", "-tags", strings.Join(tags, ","), "-o", bin, ".")
	cmd.Dir = "../.."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building airadm: %v\n%s", err, out)
	}
	return bin
}

const cniConfig = `{
  "cniVersion": "1.0.0",
  "name": "e2e",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "%s"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "loopback"}
  ]
}
`

func TestEndToEnd(t *testing.T) {
	needRootAndTools(t, "network and mount namespaces")
	kubelet, err := k8sbin.Path("kubelet")
	if err != nil {
		t.Fatal(err)
	}
	kubeadm, err := k8sbin.Path("kubeadm")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer reg.Close()
	repo := strings.TrimPrefix(reg.URL, "http://") + "/k8s"

	work := t.TempDir()
	cfg := filepath.Join(work, "cluster.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`name = "e2e"
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
name = "w1"
role = "worker"
address = "10.77.0.21"
kubelet_config = { cgroupRoot = "/airadm-e2e-w1" }
[[nodes]]
# joins with the real kubeadm join, using the token airadm published
name = "w2"
role = "worker"
address = "10.77.0.22"
`, repo)+runtimeHostFiles(t)), 0o644)
	c := loadAndPush(t, cfg, repo)

	airadm := buildAiradm(t)
	airadmBuild(t, airadm, "-c", cfg, "-o", filepath.Join(work, "out"))
	// w1 runs from a thin bundle and the image pack beside it (a fleet's
	// build); its token is the one cp1's bundle publishes, from secrets/.
	airadmBuild(t, airadm, "-c", cfg, "-o", filepath.Join(work, "out-pack"), "--pack", "w1")
	if f, err := os.Open(filepath.Join(work, "out-pack", "w1.bundle")); err != nil {
		t.Fatal(err)
	} else if m, err := bundle.ReadManifest(f); err != nil || m.Pack == "" {
		t.Fatalf("out-pack/w1.bundle: %v; want a thin bundle naming its pack", err)
	} else {
		f.Close()
	}
	// cp1 runs from a signed bundle whose secrets are encrypted to it: the
	// same cluster and secrets/, with cp1's age recipient, built alone.
	trustArgs := encryptedSignedCP(t, airadm, cfg, filepath.Join(work, "out-enc"))
	bundleOf := func(node string) string {
		switch node {
		case "w1":
			return filepath.Join(work, "out-pack", "w1.bundle")
		case "cp1":
			return filepath.Join(work, "out-enc", "cp1.bundle")
		}
		return filepath.Join(work, "out", node+".bundle")
	}

	network(t)
	mountPoints(t)
	lookup := buildLookup(t)
	kubeadmTL := kubeadmInit(t, ctx, kubeadm, kubelet, airadm, lookup, repo, filepath.Join(work, "out", "cp1.bundle"), c.PauseImage())
	cp := newNode(t, "cp1", "10.77.0.11")
	w := newNode(t, "w1", "10.77.0.21")
	for _, n := range []*node{cp, w} {
		n.checkResolver(ctx, lookup)
		n.makeCgroupRoot()
		// Bare hosts: the bundle brings containerd, runc, the CNI
		// plugins and kubelet, and apply installs and starts them.
		n.checkBare()
	}
	// A pod network for each node's sandboxes (the CNI a real cluster
	// would install through images.extra and addons.manifests).
	for n, subnet := range map[*node]string{cp: "10.244.0.0/24", w: "10.244.1.0/24"} {
		os.WriteFile(filepath.Join(n.dir, "etc_cni_net.d", "10-e2e.conflist"), []byte(fmt.Sprintf(cniConfig, subnet)), 0o644)
	}
	t.Cleanup(func() {
		for _, n := range []*node{w, cp} { // w2 is kubeadm's; its node teardown kills it
			n.keepLogs() // reset removes them
			if out, err := n.run(context.Background(), airadm, "reset", "--force"); err != nil {
				t.Logf("reset %s: %v\n%s", n.name, err, out)
			}
		}
	})
	// apply runs airadm apply on n, timing each phase from the moment
	// its "[phase]" line appears.
	apply := func(n *node, args ...string) timeline {
		t.Helper()
		args = append([]string{"apply"}, args...)
		if n.name == "cp1" {
			args = append(args, trustArgs...)
		}
		args = append(args, "--node", n.name, "--kubelet", "exec", "--kubelet-binary", "/usr/local/bin/kubelet", bundleOf(n.name))
		var tl timeline
		tl.start = time.Now()
		cpu := readCPU()
		out, err := runStreaming(n.command(ctx, airadm, args...), func(line string, at time.Time) {
			if name, ok := strings.CutPrefix(line, "["); ok {
				name, _, _ = strings.Cut(name, "]")
				tl.phases = append(tl.phases, stamp{what: name, at: at})
				if name == "kubelet" {
					tl.kubelet = at
				}
			}
			if strings.HasPrefix(line, "at once: ") {
				// The phases before end here; those run at once are
				// printed when each is done, with how long it took.
				tl.phases = append(tl.phases, stamp{what: "(at once)", at: at, took: "-"})
			}
			if took, ok := strings.CutPrefix(line, "  done in "); ok && len(tl.phases) > 0 {
				tl.phases[len(tl.phases)-1].took = took
			}
		})
		tl.end = time.Now()
		tl.cpu = cpu
		if err != nil {
			logs, _ := os.ReadFile(filepath.Join(n.dir, "var_log_airadm", "kubelet.log"))
			t.Fatalf("airadm apply on %s: %v\n%s\n--- kubelet log (end):\n%s", n.name, err, out, lastLines(string(logs), 40))
		}
		t.Logf("airadm apply on %s:\n%s", n.name, out)
		return tl
	}
	// Images first, then the rest timed on its own: kubeadm init is timed
	// with its images already present, so this is the figure to set
	// beside it.
	// The runtime comes from the bundle: files and runtime first (the
	// runtime phase reports how long containerd took to answer).
	apply(cp, "phase", "files")
	apply(cp, "phase", "runtime")
	importTime := apply(cp, "phase", "images").wall()
	stopReadyz := watchReadyz(ctx, cp.addr)
	cpHealthy := watchComponents(ctx, cp.netns)
	cpTL := apply(cp, "--skip-phases", "images")
	cpTL.readyz = stopReadyz()
	cpTL.healthy = cpHealthy(time.Minute)
	if cpTL.healthy.IsZero() {
		t.Errorf("the controller-manager or the scheduler on cp1 did not answer its health check within a minute of apply's end")
	}
	cpBusy := busy(cpTL.cpu, readCPU())
	restCfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(cp.dir, "etc_kubernetes", "admin.conf"))
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		t.Fatal(err)
	}
	// The worker likewise: images first, then timed to Node Ready. Both
	// joins (airadm's and kubeadm's) are timed against a settled
	// controller-manager: its first CSR approval after start waits for its
	// informers, which would charge whichever join came first. The
	// bootstrap signer's signature on cluster-info for each token shows its
	// controllers are running, and kubeadm join needs it anyway.
	apply(w, "phase", "files")
	apply(w, "phase", "runtime")
	apply(w, "phase", "images")
	for _, node := range []string{"w1", "w2"} {
		tok, err := os.ReadFile(filepath.Join(work, "secrets", "tokens", node+".token"))
		if err != nil {
			t.Fatal(err)
		}
		id, _, _ := strings.Cut(strings.TrimSpace(string(tok)), ".")
		waitFor(t, ctx, 2*time.Minute, "cluster-info signed for "+node+"'s token", func() (bool, error) {
			cm, err := cs.CoreV1().ConfigMaps("kube-public").Get(ctx, "cluster-info", metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			_, ok := cm.Data["jws-kubeconfig-"+id]
			return ok, nil
		})
	}
	// airadmJoin times one airadm join of w1 to Node Ready.
	airadmJoin := func() (join, timeline) {
		wReady := watchNodeReady(ctx, cs, w.name)
		busy := settle(20 * time.Second)
		tl := apply(w, "--skip-phases", "images")
		select {
		case at := <-wReady:
			return join{at.Sub(tl.start), busy}, tl
		case <-time.After(3 * time.Minute):
			t.Fatalf("node %s not Ready 3 minutes after airadm apply", w.name)
		}
		panic("unreachable")
	}
	airadmJoins := []join{}
	first, wTL := airadmJoin()
	airadmJoins = append(airadmJoins, first)

	ready := func() (int, error) {
		nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return 0, err
		}
		n := 0
		for _, nd := range nodes.Items {
			for _, cond := range nd.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					n++
				}
			}
		}
		return n, nil
	}
	tokenBytes, err := os.ReadFile(filepath.Join(work, "secrets", "tokens", "w2.token"))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _ := os.ReadFile(filepath.Join(cp.dir, "etc_kubernetes", "pki", "ca.crt"))
	block, _ := pem.Decode(caPEM)
	ca, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	w2, kubeadmJoin := kubeadmJoiner(t, ctx, cs, kubeadm, kubelet, airadm, lookup, filepath.Join(work, "out", "w2.bundle"), strings.TrimSpace(string(tokenBytes)), ca, c.PauseImage())
	kubeadmJoins := []join{kubeadmJoin()}

	waitFor(t, ctx, 3*time.Minute, "all three nodes Ready", func() (bool, error) {
		n, err := ready()
		return n == 3, err
	})

	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "on-w1", Namespace: "default"},
		Spec: corev1.PodSpec{
			NodeSelector: map[string]string{"kubernetes.io/hostname": "w1"},
			Containers:   []corev1.Container{{Name: "pause", Image: c.PauseImage(), ImagePullPolicy: corev1.PullNever}},
		},
	}
	if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 2*time.Minute, "a pod running on w1", func() (bool, error) {
		p, err := cs.CoreV1().Pods("default").Get(ctx, "on-w1", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return p.Status.Phase == corev1.PodRunning && p.Spec.NodeName == "w1", fmt.Errorf("phase %s on %q", p.Status.Phase, p.Spec.NodeName)
	})

	// CoreDNS runs on the nodes' resolver (it crash-looped on a loopback
	// one); its restarts say whether it still does.
	if pods, err := cs.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{LabelSelector: "k8s-app=kube-dns"}); err == nil {
		for _, p := range pods.Items {
			restarts := int32(0)
			for _, st := range p.Status.ContainerStatuses {
				restarts += st.RestartCount
			}
			t.Logf("%s on %q: %s, %d restarts", p.Name, p.Spec.NodeName, p.Status.Phase, restarts)
		}
	}

	// The real kubeadm reads what airadm made.
	for _, args := range [][]string{
		{"certs", "check-expiration"},
		{"token", "list", "--kubeconfig", "/etc/kubernetes/admin.conf"},
	} {
		out, err := cp.run(ctx, kubeadm, args...)
		if err != nil {
			t.Fatalf("kubeadm %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("kubeadm %s:\n%s", strings.Join(args, " "), out)
		if args[0] == "certs" && !strings.Contains(out, "apiserver-etcd-client") {
			t.Errorf("kubeadm certs check-expiration does not list the certificates:\n%s", out)
		}
	}
	n, _ := ready()

	// Two more rounds of each join, alternated, for medians: one join
	// varies by most of a second with when the kubelet's first status
	// lands against its once-a-second checks.
	for round := 1; round < 3; round++ {
		sides := []func(){
			func() { w.unjoin(ctx, cs); j, _ := airadmJoin(); airadmJoins = append(airadmJoins, j) },
			func() { w2.unjoin(ctx, cs); kubeadmJoins = append(kubeadmJoins, kubeadmJoin()) },
		}
		if round == 1 {
			sides[0], sides[1] = sides[1], sides[0]
		}
		for _, side := range sides {
			side()
		}
	}
	airadmJoinReady, kubeadmJoinReady := medianJoin(airadmJoins), medianJoin(kubeadmJoins)
	fmt.Printf("e2e: %d/3 nodes Ready (w2 joined by the real kubeadm join); images present on every side (airadm imported cp1's in %s)\n",
		n, importTime.Round(10*time.Millisecond))
	fmt.Printf("e2e: %-14s %8s %14s %16s %14s %12s %12s\n", "", "wall", "start->/readyz", "kubelet->/readyz", "after /readyz", "kubelet at", "all healthy")
	for _, row := range []struct {
		name string
		tl   timeline
	}{{"kubeadm init", kubeadmTL}, {"airadm apply", cpTL}} {
		fmt.Printf("e2e: %-14s %8s %14s %16s %14s %12s %12s\n", row.name, since(row.tl.start, row.tl.end), since(row.tl.start, row.tl.readyz),
			since(row.tl.kubelet, row.tl.readyz), since(row.tl.readyz, row.tl.end), since(row.tl.start, row.tl.kubelet), since(row.tl.start, row.tl.healthy))
	}
	fmt.Printf("e2e: (all healthy: start to the controller-manager and the scheduler answering their health checks too, which kubeadm init waits for and airadm apply does not)\n")
	t.Logf("during airadm apply: %s", cpBusy)
	fmt.Printf("e2e: control plane wall ratio airadm/kubeadm %s (target <= 0.65); airadm after /readyz %s (target <= 0.2s)\n",
		ratio(cpTL.wall(), kubeadmTL.wall()), since(cpTL.readyz, cpTL.end))
	fmt.Printf("e2e: airadm control-plane phases: %s\n", cpTL.phaseDurations())
	fmt.Printf("e2e: worker start->Node Ready, median of %d alternated rounds: kubeadm join %s, airadm apply %s, ratio %s (target <= 0.6)\n",
		len(airadmJoins), kubeadmJoinReady.Round(10*time.Millisecond), airadmJoinReady.Round(10*time.Millisecond), ratio(airadmJoinReady, kubeadmJoinReady))
	fmt.Printf("e2e: worker rounds (start->Ready, host CPU busy just before): kubeadm %s; airadm %s\n", joinList(kubeadmJoins), joinList(airadmJoins))
	fmt.Printf("e2e: airadm worker phases (first round, apply returned after %s): %s\n", wTL.wall().Round(10*time.Millisecond), wTL.phaseDurations())
}

// buildLookup builds the resolver probe run inside the nodes.
func buildLookup(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "lookup")
	build := exec.Command("go", "build", "-o", bin, "./testdata/lookup")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building lookup: %v\n%s", err, out)
	}
	return bin
}

// checkResolver shows that name resolution inside n cannot stall: its own
// name resolves from /etc/hosts, and an unknown name is refused at once
// (ECONNREFUSED from 127.0.0.1:53), not left to time out.
func (n *node) checkResolver(ctx context.Context, lookup string) {
	t := n.t
	t.Helper()
	out, err := n.run(ctx, lookup, n.name, "no-such-host.invalid")
	if err != nil {
		t.Fatalf("resolver probe on %s: %v\n%s", n.name, err, out)
	}
	t.Logf("resolver on %s (name, addresses, error, time):\n%s", n.name, out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "["+n.addr+"]") {
		t.Fatalf("node %s does not resolve its own name to %s:\n%s", n.name, n.addr, out)
	}
	if !strings.Contains(lines[1], "connection refused") {
		t.Fatalf("an unknown name on node %s is not refused at once (the resolver could wait out timeouts):\n%s", n.name, out)
	}
}

// kubeadmInit times the real `kubeadm init` of the pinned version on a
// node of its own with the same images (imported beforehand, as airadm's
// are), the same kubelet and containerd: the baseline for airadm apply.
// kubeadm cannot start kubelet without systemd, so the test starts it the
// way the kubeadm drop-in would, as soon as kubeadm has written its files.
// The node is torn down before airadm runs, so both see the same load.
func kubeadmInit(t *testing.T, ctx context.Context, kubeadm, kubelet, airadm, lookup, repo, cpBundle, sandbox string) timeline {
	t.Helper()
	n := newNode(t, "kcp", "10.77.0.31")
	n.checkResolver(ctx, lookup)
	n.makeCgroupRoot()
	n.startContainerd(sandbox)
	if out, err := n.run(ctx, airadm, "apply", "phase", "images", "--node", "cp1", cpBundle); err != nil {
		t.Fatalf("importing images for kubeadm: %v\n%s", err, out)
	}
	cfg := filepath.Join(n.dir, "kubeadm.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint:
  advertiseAddress: %s
  bindPort: 6443
nodeRegistration:
  name: kcp
  criSocket: unix:///run/containerd/containerd.sock
  ignorePreflightErrors: [all]
  kubeletExtraArgs:
  - name: node-ip
    value: %s
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
kubernetesVersion: %s
imageRepository: %s
encryptionAlgorithm: ECDSA-P256
networking:
  podSubnet: 10.244.0.0/16
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
oomScoreAdj: 0
cgroupRoot: %s
`, n.addr, n.addr, render.KubernetesVersion, repo, n.cgroupRoot())), 0o600)

	var tl timeline
	stopReadyz := watchReadyz(ctx, n.addr)
	healthy := watchComponents(ctx, n.netns)
	tl.start = time.Now()
	cpu := readCPU()
	out, kerr, err := n.runKubeadm(ctx, kubeadm, kubelet, &tl.kubelet, "init", "--config", cfg)
	tl.end = time.Now()
	t.Logf("during kubeadm init: %s", busy(cpu, readCPU()))
	tl.readyz = stopReadyz()
	tl.healthy = healthy(time.Minute)
	if err != nil {
		logs, _ := os.ReadFile(filepath.Join(n.dir, "kubelet.log"))
		t.Fatalf("kubeadm init: %v\n%s\n--- kubelet log (end):\n%s", err, lastLines(out, 30), lastLines(string(logs), 30))
	}
	if kerr != nil {
		t.Fatalf("starting kubelet for kubeadm: %v", kerr)
	}
	t.Logf("kubeadm init took %v:\n%s", tl.wall(), lastLines(out, 12))
	n.stop()
	return tl
}

// runKubeadm runs kubeadm in n and starts kubelet the moment kubeadm
// prints "[kubelet-start] Starting the kubelet", which is when kubeadm
// would have systemd start it (it cannot here, without systemd). It
// records when kubelet started in *kubeletAt.
func (n *node) runKubeadm(ctx context.Context, kubeadm, kubelet string, kubeletAt *time.Time, args ...string) (out string, kubeletErr, err error) {
	kubeletErr = fmt.Errorf("kubeadm never printed %q", "[kubelet-start] Starting the kubelet")
	out, err = runStreaming(n.command(ctx, kubeadm, args...), func(line string, at time.Time) {
		if !strings.Contains(line, "[kubelet-start] Starting the kubelet") {
			return
		}
		*kubeletAt = time.Now()
		kubeletErr = n.startKubelet(kubelet)
	})
	return out, kubeletErr, err
}

// startKubelet starts kubelet with the kubeadm drop-in's command line
// and the flags kubeadm wrote, as systemd would.
func (n *node) startKubelet(kubelet string) error {
	f, err := os.ReadFile(filepath.Join(n.dir, "var_lib_kubelet", "kubeadm-flags.env"))
	if err != nil {
		return err
	}
	args := []string{"--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf", "--kubeconfig=/etc/kubernetes/kubelet.conf", "--config=/var/lib/kubelet/config.yaml"}
	v := strings.TrimPrefix(strings.TrimSpace(string(f)), "KUBELET_KUBEADM_ARGS=")
	args = append(args, strings.Fields(strings.Trim(v, `"`))...)
	log, err := os.Create(filepath.Join(n.dir, "kubelet.log"))
	if err != nil {
		return err
	}
	cmd := n.command(context.Background(), kubelet, args...)
	cmd.Stdout, cmd.Stderr = log, log
	return cmd.Start()
}

// kubeadmJoiner sets up w2 and returns its timed join, which joins w2
// with the real `kubeadm join`, discovering the cluster through the
// cluster-info and RBAC airadm published, with the token airadm issued:
// kubeadm's own tooling can grow the cluster.
func kubeadmJoiner(t *testing.T, ctx context.Context, cs kubernetes.Interface, kubeadm, kubelet, airadm, lookup, bundle, token string, ca *x509.Certificate, sandbox string) (*node, func() join) {
	t.Helper()
	n := newNode(t, "w2", "10.77.0.22")
	n.checkResolver(ctx, lookup)
	n.makeCgroupRoot()
	n.startContainerd(sandbox)
	if out, err := n.run(ctx, airadm, "apply", "phase", "images", "--node", "w2", bundle); err != nil {
		t.Fatalf("importing images for w2: %v\n%s", err, out)
	}
	os.WriteFile(filepath.Join(n.dir, "etc_cni_net.d", "10-e2e.conflist"), []byte(fmt.Sprintf(cniConfig, "10.244.2.0/24")), 0o644)
	sum := sha256.Sum256(ca.RawSubjectPublicKeyInfo)
	patches := filepath.Join(n.dir, "patches")
	os.MkdirAll(patches, 0o755)
	os.WriteFile(filepath.Join(patches, "kubeletconfiguration+strategic.yaml"), []byte("cgroupRoot: "+n.cgroupRoot()+"\n"), 0o644)
	cfg := filepath.Join(n.dir, "join.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`apiVersion: kubeadm.k8s.io/v1beta4
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: 10.77.0.11:6443
    token: %s
    caCertHashes: ["sha256:%x"]
nodeRegistration:
  name: w2
  criSocket: unix:///run/containerd/containerd.sock
  ignorePreflightErrors: [all]
  kubeletExtraArgs:
  - name: node-ip
    value: %s
patches:
  directory: %s
`, token, sum, n.addr, patches)), 0o600)
	return n, func() join {
		t.Helper()
		return n.kubeadmJoin(ctx, cs, kubeadm, kubelet, cfg)
	}
}

// kubeadmJoin runs one timed `kubeadm join` on n with its config.
func (n *node) kubeadmJoin(ctx context.Context, cs kubernetes.Interface, kubeadm, kubelet, cfg string) join {
	t := n.t
	t.Helper()
	readyCh := watchNodeReady(ctx, cs, n.name)
	var kubeletAt time.Time
	busy := settle(20 * time.Second)
	start := time.Now()
	out, kerr, err := n.runKubeadm(ctx, kubeadm, kubelet, &kubeletAt, "join", "--config", cfg)
	returned := time.Since(start)
	if err != nil {
		logs, _ := os.ReadFile(filepath.Join(n.dir, "kubelet.log"))
		t.Fatalf("kubeadm join: %v\n%s\n--- kubelet log (end):\n%s", err, lastLines(out, 30), lastLines(string(logs), 30))
	}
	if kerr != nil {
		t.Fatalf("starting kubelet for kubeadm join: %v", kerr)
	}
	var readyAt time.Time
	select {
	case readyAt = <-readyCh:
	case <-time.After(3 * time.Minute):
		t.Fatalf("node %s not Ready 3 minutes after kubeadm join", n.name)
	}
	t.Logf("kubeadm join returned after %v (kubelet started at %v), Node Ready at %v:\n%s", returned, since(start, kubeletAt), since(start, readyAt), lastLines(out, 8))
	return join{readyAt.Sub(start), busy}
}

func waitFor(t *testing.T, ctx context.Context, d time.Duration, what string, f func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(d)
	var last error
	for time.Now().Before(deadline) && ctx.Err() == nil {
		ok, err := f()
		if ok {
			return
		}
		last = err
		time.Sleep(time.Second)
	}
	t.Fatalf("no %s after %v: %v", what, d, last)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// encryptedSignedCP builds cp1 alone into out from a copy of cfg (beside
// it, so it shares secrets/) that gives cp1 an age recipient, signed with a
// fresh ed25519 key, checks that its keys are encrypted and the signature
// is there, and returns the apply flags that trust the key and decrypt.
func encryptedSignedCP(t *testing.T, airadm, cfg, out string) []string {
	t.Helper()
	dir := filepath.Dir(cfg)
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	idPath := filepath.Join(dir, "cp1.agekey")
	os.WriteFile(idPath, []byte(id.String()+"\n"), 0o600)
	_, key, _ := ed25519.GenerateKey(nil)
	block, err := ssh.MarshalPrivateKey(key, "e2e")
	if err != nil {
		t.Fatal(err)
	}
	signKey := filepath.Join(dir, "signing-key")
	os.WriteFile(signKey, pem.EncodeToMemory(block), 0o600)
	signer, _ := ssh.NewSignerFromKey(key)
	pub := filepath.Join(dir, "signing-key.pub")
	os.WriteFile(pub, ssh.MarshalAuthorizedKey(signer.PublicKey()), 0o644)

	b, _ := os.ReadFile(cfg)
	enc := strings.Replace(string(b), "name = \"cp1\"\n", fmt.Sprintf("name = \"cp1\"\nrecipient = %q\n", id.Recipient().String()), 1)
	encCfg := filepath.Join(dir, "cluster-enc.toml")
	os.WriteFile(encCfg, []byte(enc), 0o644)
	airadmBuild(t, airadm, "-c", encCfg, "-o", out, "--sign-key", signKey, "cp1")
	f, err := os.Open(filepath.Join(out, "cp1.bundle"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := bundle.ReadManifest(f)
	if err != nil {
		t.Fatal(err)
	}
	for _, fe := range m.Files {
		if fe.Path == "/etc/kubernetes/pki/ca.key" && !fe.Encrypted() {
			t.Fatalf("%s: ca.key is not encrypted", f.Name())
		}
	}
	if _, err := os.Stat(filepath.Join(out, "SHA256SUMS.sig")); err != nil {
		t.Fatalf("build --sign-key: %v", err)
	}
	return []string{"--identity", idPath, "--trust-key", pub}
}
