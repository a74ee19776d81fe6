// Package controlplane runs a real control plane for tests: etcd,
// kube-apiserver, kube-controller-manager and kube-scheduler of the pinned
// release as plain processes, started from the command lines of the rendered
// static pod manifests with host paths moved under a temp root.
//
// Node addresses must lie in 127.0.0.0/8: Linux routes that whole range to
// the loopback interface, so each member gets its own address without an
// alias and no test traffic can leave the machine. The components bind fixed
// ports (2379, 2380, 2381, 6443, 10257, 10259), so tests using this package
// must not run in parallel with each other.
//
// The one flag the harness adds is kube-apiserver's
// --endpoint-reconciler-type=none: the reconciler refuses loopback
// addresses for the default kubernetes Service's endpoints, which these
// tests do not use.
package controlplane

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/render"
)

// StartTimeout bounds each component's wait for health. Measured starts are
// seconds (etcd ~1 s, apiserver 4-9 s); the margin covers a loaded CI box.
const StartTimeout = 90 * time.Second

// Plane is a running control plane.
type Plane struct {
	t       testing.TB
	Cluster *clustertest.Cluster
	// Root holds each node's rendered tree, Root/<node>/etc/kubernetes/...
	Root  string
	procs []*Process
}

// Process is one component with its log.
type Process struct {
	Name string
	Log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	// For a component started from a manifest: what Sync needs to start
	// it again when the manifest changes, as kubelet would.
	node         render.Node
	component    string
	manifest     []byte
	moveLoopback bool
	// replaced is set when Sync stopped it on purpose.
	replaced bool
}

// NodeRoot is where node's files live.
func (p *Plane) NodeRoot(node string) string { return filepath.Join(p.Root, node) }

// File reads one of node's rendered files.
func (p *Plane) File(node, hostPath string) []byte {
	p.t.Helper()
	b, err := os.ReadFile(hostfs.Path(p.NodeRoot(node), hostPath))
	if err != nil {
		p.t.Fatal(err)
	}
	return b
}

// Start renders every node of c under a temp root and starts etcd on every
// control plane, then the apiserver, controller-manager and scheduler of
// the first. Everything is stopped when the test ends, whatever happens.
func Start(t *testing.T, c *clustertest.Cluster) *Plane {
	t.Helper()
	p := New(t, c)
	p.Render()
	p.Start()
	return p
}

// New prepares an empty root for c's nodes; nothing runs yet.
func New(t *testing.T, c *clustertest.Cluster) *Plane {
	p := &Plane{t: t, Cluster: c, Root: t.TempDir()}
	t.Cleanup(p.stop)
	return p
}

// Render writes every node's rendered files under its NodeRoot.
func (p *Plane) Render() {
	t, c := p.t, p.Cluster
	t.Helper()
	for _, n := range c.Nodes {
		if !n.Address.Is4() || !n.Address.IsLoopback() {
			t.Fatalf("node %s address %s is not in 127.0.0.0/8", n.Name, n.Address)
		}
		files := c.Files(t, n.Name)
		var list []render.File
		for _, f := range files {
			list = append(list, f)
		}
		if err := hostfs.WriteTree(p.NodeRoot(n.Name), list); err != nil {
			t.Fatal(err)
		}
	}
}

// Start runs the control plane from the files under each NodeRoot, however
// they got there (Render, or airadm apply).
func (p *Plane) Start() {
	p.t.Helper()
	cps := p.Cluster.ControlPlanes()
	for i, n := range cps {
		p.startComponent(n, "etcd", i > 0)
	}
	for i, n := range cps {
		metrics := "127.0.0.1"
		if i > 0 {
			metrics = n.Address.String()
		}
		p.waitHTTP("etcd "+n.Name, "http://"+metrics+":2381/health", nil)
	}
	first := cps[0]
	p.startComponent(first, "kube-apiserver", false)
	p.WaitReady()
	p.startComponent(first, "kube-controller-manager", false)
	p.startComponent(first, "kube-scheduler", false)
	insecure := &tls.Config{InsecureSkipVerify: true} // self-signed serving certs; only liveness is asked
	p.waitHTTP("kube-controller-manager", "https://127.0.0.1:10257/healthz", insecure)
	p.waitHTTP("kube-scheduler", "https://127.0.0.1:10259/healthz", insecure)
}

// startComponent runs the command line of node's manifest for component.
// For members after the first, etcd's loopback listeners move to the
// member's own address: on one machine they would all claim 127.0.0.1.
func (p *Plane) startComponent(n render.Node, component string, moveLoopback bool) {
	p.t.Helper()
	var pod corev1.Pod
	manifest := p.File(n.Name, render.ManifestsDir+"/"+component+".yaml")
	if err := yaml.UnmarshalStrict(manifest, &pod); err != nil {
		p.t.Fatalf("decoding %s manifest of %s: %v", component, n.Name, err)
	}
	bin, err := k8sbin.Path(component)
	if err != nil {
		p.t.Fatal(err)
	}
	root := p.NodeRoot(n.Name)
	var args []string
	for _, a := range pod.Spec.Containers[0].Command[1:] {
		a = strings.ReplaceAll(a, render.KubernetesDir+"/", root+render.KubernetesDir+"/")
		a = strings.ReplaceAll(a, "="+render.EtcdDataDir, "="+root+render.EtcdDataDir)
		if moveLoopback {
			a = strings.ReplaceAll(a, "https://127.0.0.1:2379,", "")
			a = strings.ReplaceAll(a, "http://127.0.0.1:2381", "http://"+n.Address.String()+":2381")
		}
		args = append(args, a)
	}
	if component == "kube-apiserver" {
		args = append(args, "--endpoint-reconciler-type=none")
	}
	pr := p.Run(component+"-"+n.Name, bin, args...)
	pr.node, pr.component, pr.manifest, pr.moveLoopback = n, component, manifest, moveLoopback
}

// Sync does what kubelet does with static pods: it restarts every running
// component whose manifest changed since it started, waits until each is
// healthy again, and returns their names ("kube-apiserver-cp1"), in start
// order. Components read their certificates and kubeconfigs at start, so
// this is when a converged node takes them up.
func (p *Plane) Sync() []string {
	p.t.Helper()
	var changed []*Process
	for _, pr := range slices.Clone(p.procs) {
		if pr.component == "" {
			continue
		}
		if done, _ := pr.Exited(); done {
			continue
		}
		now := p.File(pr.node.Name, render.ManifestsDir+"/"+pr.component+".yaml")
		if bytes.Equal(now, pr.manifest) {
			continue
		}
		changed = append(changed, pr)
	}
	// Stop every changed component before starting any, the later ones
	// first. A controller-manager or scheduler left running while etcd or
	// the apiserver restarts loses its leader lease and exits, which
	// kubelet shrugs off with a restart but this harness would report: so
	// those are bounced too (and not counted as restarted by a change).
	bounce := slices.Clone(changed)
	if slices.ContainsFunc(changed, func(pr *Process) bool {
		return pr.component == "etcd" || pr.component == "kube-apiserver"
	}) {
		for _, pr := range p.procs {
			if (pr.component == "kube-controller-manager" || pr.component == "kube-scheduler") && !slices.Contains(bounce, pr) {
				if done, _ := pr.Exited(); !done {
					bounce = append(bounce, pr)
				}
			}
		}
		slices.SortStableFunc(bounce, func(a, b *Process) int { return slices.Index(p.procs, a) - slices.Index(p.procs, b) })
	}
	for i := len(bounce) - 1; i >= 0; i-- {
		bounce[i].replaced = true
		bounce[i].terminate()
	}
	var restarted []string
	for _, pr := range bounce {
		p.startComponent(pr.node, pr.component, pr.moveLoopback)
		if slices.Contains(changed, pr) {
			restarted = append(restarted, pr.Name)
		}
		insecure := &tls.Config{InsecureSkipVerify: true}
		switch pr.component {
		case "etcd":
			metrics := "127.0.0.1"
			if pr.moveLoopback {
				metrics = pr.node.Address.String()
			}
			p.waitHTTP(pr.Name, "http://"+metrics+":2381/health", nil)
		case "kube-apiserver":
			p.WaitReady()
		case "kube-controller-manager":
			p.waitHTTP(pr.Name, "https://127.0.0.1:10257/healthz", insecure)
		case "kube-scheduler":
			p.waitHTTP(pr.Name, "https://127.0.0.1:10259/healthz", insecure)
		}
	}
	return restarted
}

// terminate stops the process's group, SIGKILL after 10 s.
func (pr *Process) terminate() {
	if done, _ := pr.Exited(); done {
		return
	}
	syscall.Kill(-pr.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-pr.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-pr.cmd.Process.Pid, syscall.SIGKILL)
		<-pr.done
	}
}

// Run starts a process whose output goes to a log file in the root; it is
// killed when the test ends, or if the test binary itself dies.
func (p *Plane) Run(name, bin string, args ...string) *Process {
	p.t.Helper()
	log := filepath.Join(p.Root, name+".log")
	f, err := os.Create(log)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		p.t.Fatalf("starting %s: %v", name, err)
	}
	pr := &Process{Name: name, Log: log, cmd: cmd, done: make(chan struct{})}
	go func() {
		pr.err = cmd.Wait()
		f.Close()
		close(pr.done)
	}()
	p.procs = append(p.procs, pr)
	return pr
}

// Exited reports whether the process has ended, and how.
func (pr *Process) Exited() (bool, error) {
	select {
	case <-pr.done:
		return true, pr.err
	default:
		return false, nil
	}
}

// Kill stops the process at once (SIGKILL to its group), as a host that
// loses power would, and waits until it is gone.
func (pr *Process) Kill() {
	syscall.Kill(-pr.cmd.Process.Pid, syscall.SIGKILL)
	<-pr.done
}

// stop ends every process by PID group, newest first, and on failure shows
// the end of each log so the reason is in the test output.
func (p *Plane) stop() {
	for i := len(p.procs) - 1; i >= 0; i-- {
		p.procs[i].terminate()
	}
	if p.t.Failed() {
		for _, pr := range p.procs {
			p.t.Logf("--- last lines of %s:\n%s", pr.Name, tail(pr.Log, 25))
		}
	}
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

func (p *Plane) waitHTTP(what, url string, tlsConfig *tls.Config) {
	p.t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
	deadline := time.Now().Add(StartTimeout)
	var last string
	for time.Now().Before(deadline) {
		resp, err := client.Get(url)
		if err == nil {
			body := make([]byte, 512)
			n, _ := resp.Body.Read(body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, body[:n])
		} else {
			last = err.Error()
		}
		p.failIfExited()
		time.Sleep(250 * time.Millisecond)
	}
	p.t.Fatalf("%s not healthy at %s within %v: %s", what, url, StartTimeout, last)
}

func (p *Plane) failIfExited() {
	p.t.Helper()
	for _, pr := range p.procs {
		// Control-plane components only: a test's kubelet may exit on purpose.
		if done, err := pr.Exited(); done && !pr.replaced && (strings.HasPrefix(pr.Name, "kube-") || strings.HasPrefix(pr.Name, "etcd")) {
			p.t.Fatalf("%s exited (%v) while starting:\n%s", pr.Name, err, tail(pr.Log, 25))
		}
	}
}

// Kubeconfig reads one of the first control plane's kubeconfigs.
func (p *Plane) Kubeconfig(file string) []byte {
	return p.File(p.Cluster.ControlPlanes()[0].Name, render.KubernetesDir+"/"+file)
}

// Client builds a clientset from one of the first control plane's kubeconfigs.
func (p *Plane) Client(file string) (kubernetes.Interface, *rest.Config) {
	p.t.Helper()
	cfg, err := clientcmd.RESTConfigFromKubeConfig(p.Kubeconfig(file))
	if err != nil {
		p.t.Fatalf("loading %s: %v", file, err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		p.t.Fatal(err)
	}
	return cs, cfg
}

// WaitReady polls /readyz through super-admin.conf until it answers ok.
func (p *Plane) WaitReady() {
	p.t.Helper()
	cs, _ := p.Client("super-admin.conf")
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	var last error
	for ctx.Err() == nil {
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(body) == "ok" {
			return
		}
		last = err
		p.failIfExited()
		time.Sleep(250 * time.Millisecond)
	}
	p.t.Fatalf("kube-apiserver not ready within %v: %v", StartTimeout, last)
}
