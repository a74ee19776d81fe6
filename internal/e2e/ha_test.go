package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/render"
)

const lbAddr = "10.77.0.10"

// haproxyConfig balances the apiservers as an operator's load balancer
// would: TCP, a connect health check on each apiserver every 500 ms, and
// a connection that fails on one server retried on another.
func haproxyConfig(cps []*node) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
  maxconn 2000
defaults
  mode tcp
  timeout connect 1s
  timeout client 1h
  timeout server 1h
  retries 2
  option redispatch
frontend apiserver
  bind %s:6443
  default_backend apiservers
backend apiservers
  balance roundrobin
  default-server inter 500ms fall 2 rise 2
`, lbAddr)
	for _, n := range cps {
		fmt.Fprintf(&b, "  server %s %s:6443 check\n", n.name, n.addr)
	}
	return b.String()
}

// TestHA applies three control planes at once behind a real HAProxy, then
// a worker; loses one control plane and checks that the cluster carries
// on through the load balancer; then resets it and applies its bundle
// again, and checks that it rejoins etcd.
func TestHA(t *testing.T) {
	needRootAndTools(t, "network and mount namespaces", tool{"haproxy", "haproxy"})
	kubeadm, err := k8sbin.Path("kubeadm")
	if err != nil {
		t.Fatal(err)
	}
	etcdctl, err := k8sbin.Path("etcdctl")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()

	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer reg.Close()
	repo := strings.TrimPrefix(reg.URL, "http://") + "/k8s"

	type spec struct{ name, role, addr, subnet string }
	specs := []spec{
		{"cp1", "control-plane", "10.77.0.11", "10.244.0.0/24"},
		{"cp2", "control-plane", "10.77.0.12", "10.244.1.0/24"},
		{"cp3", "control-plane", "10.77.0.13", "10.244.2.0/24"},
		{"w1", "worker", "10.77.0.21", "10.244.3.0/24"},
	}
	work := t.TempDir()
	cfg := filepath.Join(work, "cluster.toml")
	var nodesTOML strings.Builder
	for _, s := range specs {
		fmt.Fprintf(&nodesTOML, "[[nodes]]\nname = %q\nrole = %q\naddress = %q\nkubelet_config = { cgroupRoot = \"/airadm-e2e-%s\" }\n", s.name, s.role, s.addr, s.name)
	}
	os.WriteFile(cfg, []byte(fmt.Sprintf(`name = "ha"
control_plane_endpoint = "%s:6443"
[network]
pod_subnet = "10.244.0.0/16"
[pki]
algorithm = "ECDSA-P256"
[images]
repository = %q
`+buildMachineTOML+`%s`, lbAddr, repo, nodesTOML.String())+runtimeHostFiles(t)), 0o644)
	c := loadAndPush(t, cfg, repo)
	airadm := buildAiradm(t)
	airadmBuild(t, airadm, "-c", cfg, "-o", filepath.Join(work, "out"))

	network(t)
	mountPoints(t)
	nodes := map[string]*node{}
	var cps []*node
	for _, s := range specs {
		n := newNode(t, s.name, s.addr)
		n.makeCgroupRoot()
		n.checkBare()
		os.WriteFile(filepath.Join(n.dir, "etc_cni_net.d", "10-e2e.conflist"), []byte(fmt.Sprintf(cniConfig, s.subnet)), 0o644)
		nodes[s.name] = n
		if s.role == "control-plane" {
			cps = append(cps, n)
		}
	}
	w := nodes["w1"]
	t.Cleanup(func() {
		for _, n := range []*node{w, cps[2], cps[1], cps[0]} {
			if out, err := n.run(context.Background(), airadm, "reset", "--force"); err != nil {
				t.Logf("reset %s: %v\n%s", n.name, err, out)
			}
		}
	})
	mem := watchMemory(nodes)
	defer mem.stop()

	lb := newNode(t, "lb", lbAddr)
	os.WriteFile(filepath.Join(lb.dir, "haproxy.cfg"), []byte(haproxyConfig(cps)), 0o644)
	lbLog, _ := os.Create(filepath.Join(lb.dir, "haproxy.log"))
	haproxy := lb.command(context.Background(), "haproxy", "-db", "-f", filepath.Join(lb.dir, "haproxy.cfg"))
	haproxy.Stdout, haproxy.Stderr = lbLog, lbLog
	if err := haproxy.Start(); err != nil {
		t.Fatalf("starting haproxy: %v", err)
	}

	apply := func(n *node) (string, time.Duration, error) {
		start := time.Now()
		out, err := n.run(ctx, airadm, "apply", "--node", n.name, "--kubelet", "exec", "--kubelet-binary", "/usr/local/bin/kubelet",
			filepath.Join(work, "out", n.name+".bundle"))
		return out, time.Since(start), err
	}
	// The three control planes at once.
	var wg sync.WaitGroup
	outs := make([]string, len(cps))
	took := make([]time.Duration, len(cps))
	errs := make([]error, len(cps))
	for i, n := range cps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], took[i], errs[i] = apply(n)
		}()
	}
	wg.Wait()
	for i, n := range cps {
		if errs[i] != nil {
			logs, _ := os.ReadFile(filepath.Join(n.dir, "var_log_airadm", "kubelet.log"))
			t.Fatalf("airadm apply on %s: %v\n%s\n--- kubelet log (end):\n%s", n.name, errs[i], outs[i], lastLines(string(logs), 40))
		}
		t.Logf("airadm apply on %s (%v, concurrent with the others):\n%s", n.name, took[i].Round(10*time.Millisecond), outs[i])
		if !strings.Contains(outs[i], "etcd quorum after") {
			t.Errorf("apply on %s did not report etcd's quorum", n.name)
		}
	}
	if out, d, err := apply(w); err != nil {
		t.Fatalf("airadm apply on w1: %v\n%s", err, out)
	} else {
		t.Logf("airadm apply on w1 (%v):\n%s", d.Round(10*time.Millisecond), out)
	}

	// A client through the load balancer, as admin.conf has it.
	restCfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(cps[0].dir, "etc_kubernetes", "admin.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(restCfg.Host, lbAddr) {
		t.Fatalf("admin.conf names %s, not the load balancer %s", restCfg.Host, lbAddr)
	}
	restCfg.Timeout = 5 * time.Second
	cs, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		t.Fatal(err)
	}
	ready := func() (int, error) {
		nl, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return 0, err
		}
		n := 0
		for _, nd := range nl.Items {
			for _, cond := range nd.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					n++
				}
			}
		}
		return n, nil
	}
	waitFor(t, ctx, 3*time.Minute, "all four nodes Ready", func() (bool, error) {
		n, err := ready()
		return n == 4, fmt.Errorf("%d Ready: %v", n, err)
	})
	checkPostStart(t, ctx, cs, cps, filepath.Join(work, "out"))

	etcd := func(args ...string) (string, error) {
		pki := filepath.Join(cps[0].dir, "etc_kubernetes", "pki")
		var eps []string
		for _, n := range cps {
			eps = append(eps, "https://"+n.addr+":2379")
		}
		base := []string{"--cacert", filepath.Join(pki, "etcd", "ca.crt"),
			"--cert", filepath.Join(pki, "etcd", "healthcheck-client.crt"), "--key", filepath.Join(pki, "etcd", "healthcheck-client.key"),
			"--dial-timeout", "2s", "--command-timeout", "3s"}
		// etcdctl adds up repeated --endpoints flags: give every member
		// only when the caller names none.
		if !slices.Contains(args, "--endpoints") {
			base = append(base, "--endpoints", strings.Join(eps, ","))
		}
		out, err := exec.CommandContext(ctx, etcdctl, append(base, args...)...).CombinedOutput()
		return string(out), err
	}
	// started counts voting members that have started (a name and client
	// URLs), as etcdctl member list shows them.
	started := func() (int, string) {
		out, err := etcd("member", "list", "-w", "json")
		if err != nil {
			return 0, out
		}
		var list struct {
			Members []struct {
				Name       string   `json:"name"`
				ClientURLs []string `json:"clientURLs"`
				IsLearner  bool     `json:"isLearner"`
			} `json:"members"`
		}
		if err := json.Unmarshal([]byte(out), &list); err != nil {
			return 0, out
		}
		n := 0
		for _, m := range list.Members {
			if m.Name != "" && len(m.ClientURLs) > 0 && !m.IsLearner {
				n++
			}
		}
		return n, out
	}
	if n, out := started(); n != 3 {
		t.Fatalf("etcd has %d started members, want 3:\n%s", n, out)
	}
	table, _ := etcd("member", "list", "-w", "table")
	t.Logf("etcdctl member list:\n%s", table)
	for _, n := range cps {
		out, err := n.run(ctx, kubeadm, "certs", "check-expiration")
		if err != nil || !strings.Contains(out, "apiserver-etcd-client") {
			t.Fatalf("kubeadm certs check-expiration on %s: %v\n%s", n.name, err, out)
		}
	}

	// Lose cp2: its kubelet and every container it ran.
	lost := cps[1]
	lostAt := time.Now()
	lost.killKubeletAndContainers()
	var answered time.Duration
	for {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := cs.CoreV1().Nodes().List(rctx, metav1.ListOptions{})
		cancel()
		if err == nil {
			answered = time.Since(lostAt)
			break
		}
		if time.Since(lostAt) > 5*time.Second {
			t.Fatalf("the API through the load balancer did not answer within 5 s of losing %s: %v", lost.name, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "after-loss", Namespace: "default"},
		Spec: corev1.PodSpec{
			NodeSelector: map[string]string{"kubernetes.io/hostname": "w1"},
			Containers:   []corev1.Container{{Name: "pause", Image: c.PauseImage(), ImagePullPolicy: corev1.PullNever}},
		},
	}
	waitFor(t, ctx, time.Minute, "the pod created", func() (bool, error) {
		_, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
		return err == nil, err
	})
	waitFor(t, ctx, 2*time.Minute, "a new pod running on w1 without "+lost.name, func() (bool, error) {
		p, err := cs.CoreV1().Pods("default").Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return p.Status.Phase == corev1.PodRunning && p.Spec.NodeName == "w1", fmt.Errorf("phase %s on %q", p.Status.Phase, p.Spec.NodeName)
	})
	var healthy string
	for _, n := range []*node{cps[0], cps[2]} {
		out, err := etcd("endpoint", "health", "--endpoints", "https://"+n.addr+":2379")
		if err != nil {
			t.Fatalf("etcd on %s has no quorum without %s: %v\n%s", n.name, lost.name, err, out)
		}
		healthy += out
	}
	t.Logf("without %s:\n%s", lost.name, healthy)

	// Reset it and apply its bundle again: it rejoins etcd.
	if out, err := lost.run(ctx, airadm, "reset", "--force"); err != nil {
		t.Fatalf("reset %s: %v\n%s", lost.name, err, out)
	} else {
		t.Logf("airadm reset on %s:\n%s", lost.name, out)
	}
	rejoinStart := time.Now()
	out, d, err := apply(lost)
	if err != nil {
		t.Fatalf("airadm apply on %s again: %v\n%s", lost.name, err, out)
	}
	t.Logf("airadm apply on %s again (%v):\n%s", lost.name, d.Round(10*time.Millisecond), out)
	// reset removed its member (if the others answered); apply adds it back.
	if !strings.Contains(out, "rejoins as a learner") || !strings.Contains(out, "rejoined") {
		t.Errorf("apply on %s did not say it rejoined etcd as a learner", lost.name)
	}
	var rejoined time.Duration
	waitFor(t, ctx, time.Minute, "3 started, healthy etcd members", func() (bool, error) {
		n, out := started()
		if n != 3 {
			return false, fmt.Errorf("%d started: %s", n, out)
		}
		if out, err := etcd("endpoint", "health", "--cluster"); err != nil {
			return false, fmt.Errorf("%v: %s", err, out)
		}
		rejoined = time.Since(rejoinStart)
		return true, nil
	})
	table, _ = etcd("member", "list", "-w", "table")
	t.Logf("etcdctl member list after the rejoin:\n%s", table)
	waitFor(t, ctx, 2*time.Minute, "all four nodes Ready again", func() (bool, error) {
		n, err := ready()
		return n == 4, fmt.Errorf("%d Ready: %v", n, err)
	})

	peak := mem.stop()
	readyCPs := 0
	nl, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: "node-role.kubernetes.io/control-plane"})
	if err == nil {
		for _, nd := range nl.Items {
			for _, cond := range nd.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					readyCPs++
				}
			}
		}
	}
	fmt.Printf("ha-e2e: %d/3 control planes + 1 worker Ready, API through LB answered %s after losing %s, %s rejoined in %s\n",
		readyCPs, answered.Round(10*time.Millisecond), lost.name, lost.name, rejoined.Round(100*time.Millisecond))
	fmt.Printf("ha-e2e: control planes applied at once in %s, %s, %s\n", took[0].Round(100*time.Millisecond), took[1].Round(100*time.Millisecond), took[2].Round(100*time.Millisecond))
	fmt.Printf("ha-e2e: peak memory of the cluster's processes %s\n", peak)
}

// checkPostStart checks what three control planes applying at once
// wrote through the API: one token Secret per worker, the kubeadm-config
// every bundle carries, and each control plane labelled and tainted once.
func checkPostStart(t *testing.T, ctx context.Context, cs kubernetes.Interface, cps []*node, out string) {
	t.Helper()
	secrets, err := cs.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{FieldSelector: "type=bootstrap.kubernetes.io/token"})
	if err != nil {
		t.Fatal(err)
	}
	if len(secrets.Items) != 1 {
		t.Errorf("%d bootstrap token Secrets, want 1 (for w1)", len(secrets.Items))
	}
	cm, err := cs.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubeadm-config", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range cps {
		b, err := os.ReadFile(filepath.Join(n.dir, "var_lib_airadm", strings.TrimPrefix(render.KubeadmConfigFile, render.AiradmStateDir+"/")))
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != cm.Data["ClusterConfiguration"] {
			t.Errorf("kubeadm-config differs from %s's bundle", n.name)
		}
		nd, err := cs.CoreV1().Nodes().Get(ctx, n.name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		taints := 0
		for _, tn := range nd.Spec.Taints {
			if tn.Key == "node-role.kubernetes.io/control-plane" {
				taints++
			}
		}
		if _, ok := nd.Labels["node-role.kubernetes.io/control-plane"]; !ok || taints != 1 {
			t.Errorf("node %s: control-plane label %v, %d control-plane taints; want the label and one taint", n.name, ok, taints)
		}
	}
}

// killKubeletAndContainers stops a control plane the hard way: its
// kubelet and every container kubelet ran (the static pods), SIGKILLed.
// Its containerd stays, as on a host whose kubelet died.
func (n *node) killKubeletAndContainers() {
	mine, err := os.Readlink("/proc/" + n.pid() + "/ns/mnt")
	if err != nil {
		n.t.Fatal(err)
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		comm, _ := os.ReadFile("/proc/" + p.Name() + "/comm")
		ns, _ := os.Readlink("/proc/" + p.Name() + "/ns/mnt")
		cg, _ := os.ReadFile("/proc/" + p.Name() + "/cgroup")
		if (ns == mine && strings.TrimSpace(string(comm)) == "kubelet") || strings.Contains(string(cg), n.cgroupRoot()+"/") {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// memWatch samples the resident memory of the cluster's processes: those
// in the nodes' mount namespaces (kubelet, containerd, shims) and the
// containers below the nodes' cgroup roots.
type memWatch struct {
	stopOnce sync.Once
	done     chan struct{}
	finished chan struct{}
	peak     uint64
	at       map[string]uint64 // per command name, at the peak
}

func watchMemory(nodes map[string]*node) *memWatch {
	w := &memWatch{done: make(chan struct{}), finished: make(chan struct{})}
	nsOf := map[string]bool{}
	for _, n := range nodes {
		if ns, err := os.Readlink("/proc/" + n.pid() + "/ns/mnt"); err == nil {
			nsOf[ns] = true
		}
	}
	page := uint64(os.Getpagesize())
	go func() {
		defer close(w.finished)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			var sum uint64
			by := map[string]uint64{}
			procs, _ := os.ReadDir("/proc")
			for _, p := range procs {
				if _, err := strconv.Atoi(p.Name()); err != nil {
					continue
				}
				ns, _ := os.Readlink("/proc/" + p.Name() + "/ns/mnt")
				if !nsOf[ns] {
					cg, _ := os.ReadFile("/proc/" + p.Name() + "/cgroup")
					if !strings.Contains(string(cg), "/airadm-e2e-") {
						continue
					}
				}
				statm, err := os.ReadFile("/proc/" + p.Name() + "/statm")
				if err != nil {
					continue
				}
				f := strings.Fields(string(statm))
				if len(f) < 2 {
					continue
				}
				rss, _ := strconv.ParseUint(f[1], 10, 64)
				comm, _ := os.ReadFile("/proc/" + p.Name() + "/comm")
				sum += rss * page
				by[strings.TrimSpace(string(comm))] += rss * page
			}
			if sum > w.peak {
				w.peak, w.at = sum, by
			}
			select {
			case <-w.done:
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

// stop ends the sampling and describes the peak: the total and the
// largest processes by name.
func (w *memWatch) stop() string {
	w.stopOnce.Do(func() { close(w.done) })
	<-w.finished
	type kv struct {
		name string
		b    uint64
	}
	var top []kv
	for k, v := range w.at {
		top = append(top, kv{k, v})
	}
	sort.Slice(top, func(i, j int) bool { return top[i].b > top[j].b })
	var parts []string
	for i, e := range top {
		if i == 5 {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %d MiB", e.name, e.b>>20))
	}
	var total, avail uint64
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			f := strings.Fields(l)
			if len(f) > 1 && f[0] == "MemTotal:" {
				total, _ = strconv.ParseUint(f[1], 10, 64)
			}
			if len(f) > 1 && f[0] == "MemAvailable:" {
				avail, _ = strconv.ParseUint(f[1], 10, 64)
			}
		}
	}
	return fmt.Sprintf("%d MiB RSS (%s), of the host's %d MiB (%d MiB available now)", w.peak>>20, strings.Join(parts, ", "), total>>10, avail>>10)
}
