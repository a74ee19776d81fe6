package e2e_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"airadm.dev/airadm/internal/containerdtest"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/render"
)

// A simulated host: its own network namespace (on a bridge with the test
// process), and its own mount namespace in which the host paths Kubernetes
// uses are bind mounts of directories under the test's temp dir. airadm
// apply then runs against "/" exactly as on a real host.
type node struct {
	t      *testing.T
	name   string
	addr   string
	netns  string
	dir    string
	holder *exec.Cmd
}

const (
	bridge   = "airadm-e2e0"
	bridgeIP = "10.77.0.1"
)

// hostPaths are bind-mounted per node. Those missing on the host are
// created for the mount points and removed again at the end.
var hostPaths = []string{
	"/etc/kubernetes", "/var/lib/kubelet", "/var/lib/etcd", "/var/lib/airadm", "/var/lib/containerd",
	"/run/containerd", "/etc/cni/net.d", "/var/log/pods", "/var/log/containers", "/var/log/airadm",
	"/etc/systemd/system", "/var/lib/cni", "/run/netns",
	// What the bundle's runtime brings and the runtime phase writes.
	"/etc/containerd", "/etc/sysctl.d", "/etc/modules-load.d", "/opt/cni/bin", "/opt/containerd",
	"/usr/local/bin", "/usr/local/sbin",
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// network makes the bridge the nodes hang off; the test process reaches
// them through it. Everything is removed when the test ends.
func network(t *testing.T) {
	exec.Command("ip", "link", "del", bridge).Run() // a previous run's, if killed
	run(t, "ip", "link", "add", bridge, "type", "bridge")
	t.Cleanup(func() { exec.Command("ip", "link", "del", bridge).Run() })
	run(t, "ip", "addr", "add", bridgeIP+"/24", "dev", bridge)
	run(t, "ip", "link", "set", bridge, "up")
}

// mountPoints creates the host's missing mount points, once for all nodes.
func mountPoints(t *testing.T) {
	var created []string
	for _, p := range hostPaths {
		if _, err := os.Stat(p); os.IsNotExist(err) {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			created = append(created, p)
		}
	}
	t.Cleanup(func() {
		for i := len(created) - 1; i >= 0; i-- {
			syscall.Unmount(created[i], syscall.MNT_DETACH) // ip netns mounts /run/netns onto itself
			os.Remove(created[i])
			// and parents airadm's MkdirAll made, if now empty
			os.Remove(filepath.Dir(created[i]))
		}
	})
}

func newNode(t *testing.T, name, addr string) *node {
	t.Helper()
	n := &node{t: t, name: name, addr: addr, netns: "airadm-e2e-" + name}
	dir, err := os.MkdirTemp("", "e2e-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	n.dir = dir
	exec.Command("ip", "netns", "del", n.netns).Run()
	run(t, "ip", "netns", "add", n.netns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.netns).Run() })
	veth := "ve-" + name
	run(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
	run(t, "ip", "link", "set", veth, "master", bridge, "up")
	run(t, "ip", "-n", n.netns, "addr", "add", addr+"/24", "dev", "eth0")
	run(t, "ip", "-n", n.netns, "link", "set", "eth0", "up")
	run(t, "ip", "-n", n.netns, "link", "set", "lo", "up")
	run(t, "ip", "-n", n.netns, "route", "add", "default", "via", bridgeIP)

	// Name resolution that answers at once: the node's own name from
	// /etc/hosts, and a resolver at the bridge's host address where
	// nothing listens, so a lookup from the node fails with ECONNREFUSED
	// in about a millisecond. Without this, DNS packets routed out through
	// the bridge are dropped (ip_forward is off on these VMs) and Go's
	// resolver waits out two 5 s timeouts, which kubeadm's preflight host
	// name lookup did, inflating its time. Not 127.0.0.1: CoreDNS forwards
	// to the node's resolver, and its loop plugin exits (the pod then
	// crash-loops) when that is a loopback address, its own.
	hosts := filepath.Join(dir, "hosts")
	resolv := filepath.Join(dir, "resolv.conf")
	if err := os.WriteFile(hosts, []byte(fmt.Sprintf("127.0.0.1 localhost\n::1 localhost\n%s %s\n", addr, name)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(resolv, []byte("nameserver "+bridgeIP+"\noptions timeout:1 attempts:1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var script strings.Builder
	script.WriteString("set -e\n")
	fmt.Fprintf(&script, "mount --bind %s /etc/hosts\nmount --bind %s /etc/resolv.conf\n", hosts, resolv)
	for _, p := range hostPaths {
		src := filepath.Join(dir, strings.ReplaceAll(strings.TrimPrefix(p, "/"), "/", "_"))
		if err := os.MkdirAll(src, 0o755); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&script, "mount --bind %s %s\n", src, p)
	}
	script.WriteString("echo ready\nexec sleep 1000000\n")
	// nsenter joins the network namespace without `ip netns exec`'s fresh
	// /sys, which would hide /sys/fs/cgroup from kubelet.
	n.holder = exec.Command("unshare", "--mount", "--propagation", "private",
		"nsenter", "--net=/run/netns/"+n.netns, "sh", "-c", script.String())
	n.holder.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stdout, _ := n.holder.StdoutPipe()
	n.holder.Stderr = os.Stderr
	if err := n.holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.stop)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		t.Fatalf("node %s namespace setup: %q %v", name, line, err)
	}
	return n
}

// pid is the process holding the namespaces (the sleep, after exec).
func (n *node) pid() string { return strconv.Itoa(n.holder.Process.Pid) }

// command runs inside the node's namespaces.
func (n *node) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--target", n.pid(), "--mount", "--net", "--", name}, args...)...)
}

func (n *node) run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := n.command(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// checkBare fails the test unless the node starts as a bare host: no
// containerd config, binary or socket, no kubelet and no CNI plugins.
func (n *node) checkBare() {
	n.t.Helper()
	if out, err := n.run(context.Background(), "sh", "-c", `test ! -e /etc/containerd/config.toml && test ! -e /usr/local/bin/containerd &&
test ! -e /usr/local/bin/kubelet && test ! -e /usr/bin/kubelet && test ! -S /run/containerd/containerd.sock && test -z "$(ls -A /opt/cni/bin)"`); err != nil {
		n.t.Fatalf("node %s does not start bare: %v %s", n.name, err, out)
	}
}

// runtimeHostFiles is [[host.files]] for what a bare host lacks: the
// pinned containerd with its shim, kubelet and the CNI plugins from the
// k8sbin cache, and Debian's runc, all as local sources.
func runtimeHostFiles(t *testing.T) string {
	t.Helper()
	return runtimeHostFilesFor(t, render.KubernetesVersion)
}

// runtimeHostFilesFor is runtimeHostFiles with the kubelet of version.
func runtimeHostFilesFor(t *testing.T, version string) string {
	t.Helper()
	var b strings.Builder
	for _, f := range []struct{ path, bin string }{
		{"/usr/local/bin/containerd", "containerd"},
		{"/usr/local/bin/containerd-shim-runc-v2", "containerd-shim-runc-v2"},
		{"/usr/local/bin/kubelet", "kubelet"},
		{"/usr/local/sbin/runc", ""},
		{"/opt/cni/bin/bridge", "bridge"},
		{"/opt/cni/bin/host-local", "host-local"},
		{"/opt/cni/bin/loopback", "loopback"},
		{"/opt/cni/bin/portmap", "portmap"},
	} {
		src := "/usr/sbin/runc"
		if f.bin != "" {
			var err error
			if src, err = k8sbin.PathFor(version, f.bin); err != nil {
				t.Fatal(err)
			}
		}
		data, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "\n[[host.files]]\npath = %q\nsource = %q\nsha256 = \"%x\"\n", f.path, src, sha256.Sum256(data))
	}
	return b.String()
}

// startContainerd runs the node's own containerd at the default socket
// path, as kubelet and airadm expect it.
func (n *node) startContainerd(sandbox string) {
	t := n.t
	t.Helper()
	bin, err := k8sbin.Path("containerd")
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(n.dir, "containerd.toml")
	body := containerdtest.Config(containerdtest.Paths{
		Root: "/var/lib/containerd", State: "/run/containerd", Socket: "/run/containerd/containerd.sock",
		Opt: filepath.Join(n.dir, "opt"), RuncRoot: "/run/containerd/runc",
		CNIBin: filepath.Dir(bin), CNIConf: "/etc/cni/net.d", Sandbox: sandbox,
	})
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	log, _ := os.Create(filepath.Join(n.dir, "containerd.log"))
	cmd := n.command(context.Background(), bin, "--config", cfg)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := n.run(context.Background(), "test", "-S", "/run/containerd/containerd.sock"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd on %s did not start; see %s", n.name, filepath.Join(n.dir, "containerd.log"))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// stop kills every process in the node's mount namespace (kubelet,
// containerd, shims, containers), unmounts, and removes its files.
func (n *node) stop() {
	if n.holder == nil || n.holder.Process == nil {
		return
	}
	mine, err := os.Readlink("/proc/" + n.pid() + "/ns/mnt")
	if err == nil {
		for round := 0; round < 3; round++ {
			procs, _ := os.ReadDir("/proc")
			for _, p := range procs {
				pid, err := strconv.Atoi(p.Name())
				if err != nil || strconv.Itoa(pid) == n.pid() {
					continue
				}
				if ns, err := os.Readlink("/proc/" + p.Name() + "/ns/mnt"); err == nil && ns == mine {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			time.Sleep(300 * time.Millisecond)
		}
	}
	killKubepods()
	syscall.Kill(-n.holder.Process.Pid, syscall.SIGKILL)
	n.holder.Wait()
	removeKubepods()
	n.keepLogs()
	os.RemoveAll(n.dir)
}

// keepLogs copies the node's logs (its /var/log/airadm: the kubelet's and
// containerd's) to $AIRADM_E2E_LOGS/<node> when that is set, since reset
// and the node's teardown remove them.
func (n *node) keepLogs() {
	dst := os.Getenv("AIRADM_E2E_LOGS")
	if dst == "" {
		return
	}
	dst = filepath.Join(dst, n.name)
	if err := os.MkdirAll(dst, 0o755); err == nil {
		// kubeadm's nodes log the kubelet beside their files.
		// The pods' logs too: the apiserver's and etcd's own start.
		exec.Command("sh", "-c", `cp -a "$1"/var_log_airadm/. "$1"/*.log "$2"/; cp -aL "$1"/var_log_pods "$2"/pods`, "sh", n.dir, dst).Run()
	}
}

// killKubepods kills the containers kubelets started: they live in mount
// namespaces of their own, below the shims.
func killKubepods() {
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		if b, err := os.ReadFile("/proc/" + p.Name() + "/cgroup"); err == nil && strings.Contains(string(b), "/airadm-e2e-") {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// cgroupRoot is the node's kubelet cgroupRoot: two kubelets sharing one
// kubepods hierarchy would each kill the other's pods as orphans.
func (n *node) cgroupRoot() string { return "/airadm-e2e-" + n.name }

// makeCgroupRoot creates the node's cgroup root in every controller, as
// kubelet requires it to exist.
func (n *node) makeCgroupRoot() {
	ctrls, _ := filepath.Glob("/sys/fs/cgroup/*")
	for _, c := range ctrls {
		if info, err := os.Stat(c); err == nil && info.IsDir() {
			os.Mkdir(filepath.Join(c, n.cgroupRoot()), 0o755)
		}
	}
}

// removeKubepods removes the pod cgroups kubelets made, children first.
func removeKubepods() {
	var dirs []string
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods*")
	nodeRoots, _ := filepath.Glob("/sys/fs/cgroup/*/airadm-e2e-*")
	roots = append(roots, nodeRoots...)
	for _, r := range roots {
		filepath.WalkDir(r, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		syscall.Rmdir(dirs[i])
	}
}

// unjoin takes a joined worker back to where its join started, for
// another timed round: its kubelet stopped, its credentials and kubelet's
// certificates gone, its Node deleted. Containers and images stay, as do
// the rest of airadm's or kubeadm's files (each join rewrites them).
func (n *node) unjoin(ctx context.Context, cs kubernetes.Interface) {
	t := n.t
	t.Helper()
	n.killKubelet()
	for _, p := range []string{"etc_kubernetes/kubelet.conf", "etc_kubernetes/bootstrap-kubelet.conf"} {
		os.Remove(filepath.Join(n.dir, p))
	}
	certs, _ := filepath.Glob(filepath.Join(n.dir, "var_lib_kubelet", "pki", "kubelet-client-*"))
	for _, c := range certs {
		os.Remove(c)
	}
	if err := cs.CoreV1().Nodes().Delete(ctx, n.name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatalf("deleting Node %s: %v", n.name, err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := cs.CoreV1().Nodes().Get(ctx, n.name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Node %s still there a minute after its deletion: %v", n.name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// killKubelet kills the kubelet running in n's mount namespace and waits
// until it is gone.
func (n *node) killKubelet() {
	mnt, err := os.Readlink("/proc/" + n.pid() + "/ns/mnt")
	if err != nil {
		n.t.Fatal(err)
	}
	var pids []int
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
		if filepath.Base(exe) == "kubelet" && ns == mnt {
			syscall.Kill(pid, syscall.SIGKILL)
			pids = append(pids, pid)
		}
	}
	if len(pids) == 0 {
		n.t.Fatalf("no kubelet runs on %s", n.name)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, pid := range pids {
		for {
			// Gone, or a zombie its parent has not reaped yet.
			stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil || strings.Contains(string(stat), ") Z ") {
				break
			}
			if time.Now().After(deadline) {
				n.t.Fatalf("kubelet %d on %s survived SIGKILL for 30 s", pid, n.name)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// tool is a command a test runs and the Debian package that has it.
type tool struct{ name, pkg string }

// needRootAndTools fails the test, saying how to get them, unless it runs
// as root (for why) and every tool is on PATH: those every test with
// namespaced nodes runs, and extra.
func needRootAndTools(t *testing.T, why string, extra ...tool) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("%s needs root for %s", t.Name(), why)
	}
	tools := append([]tool{{"ip", "iproute2"}, {"nsenter", "util-linux"}, {"unshare", "util-linux"}, {"runc", "runc"}}, extra...)
	for _, tl := range tools {
		if _, err := exec.LookPath(tl.name); err != nil {
			t.Fatalf("%s is missing: apt-get install %s (./hack/test installs it)", tl.name, tl.pkg)
		}
	}
}

// buildMachineTOML is what cluster.toml needs for nodes on these build
// machines, which run cgroup v1 and lack CAP_SYS_RESOURCE
// (REAL-CLUSTER-NOTES.md); a VM guest takes it too, harmlessly. The
// bundles bring containerd, whose config says the same.
const buildMachineTOML = `[kubelet]
cgroup_driver = "cgroupfs"
[kubelet.config]
failCgroupV1 = false
oomScoreAdj = 0
[containerd.config.plugins.'io.containerd.cri.v1.runtime']
restrict_oom_score_adj = true
[containerd.config.plugins.'io.containerd.nri.v1.nri']
disable = true
`
