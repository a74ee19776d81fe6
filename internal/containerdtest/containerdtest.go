// Package containerdtest runs a private containerd of the pinned version
// for tests, with its own root, state and sockets under the test's temp
// directory, and runc from the host (Debian's package).
package containerdtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/render"
)

// Containerd is a running instance.
type Containerd struct {
	Socket string // unix socket path
	Root   string
	State  string
	Log    string
}

// Endpoint is the socket as a CRI runtime endpoint.
func (c *Containerd) Endpoint() string { return "unix://" + c.Socket }

// config follows REAL-CLUSTER-NOTES.md: a private instance with NRI off,
// no imported config, per-instance runc root, and restrict_oom_score_adj
// because these VMs lack CAP_SYS_RESOURCE.
const configTemplate = `version = 4
root = %[1]q
state = %[2]q
imports = []

[plugins]
  [plugins.'io.containerd.server.v1.grpc']
    address = %[3]q
  [plugins.'io.containerd.server.v1.ttrpc']
    address = %[4]q
  [plugins.'io.containerd.internal.v1.opt']
    path = %[5]q
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[6]q
  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    Root = %[7]q
    SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [%[8]q]
    conf_dir = %[9]q
`

// Paths place one instance.
type Paths struct {
	Root, State, Socket, Opt, RuncRoot string
	CNIBin, CNIConf                    string
	Sandbox                            string // the pause image reference
}

// Config is the instance's config.toml.
func Config(p Paths) string {
	return fmt.Sprintf(configTemplate, p.Root, p.State, p.Socket, p.Socket+".ttrpc", p.Opt, p.Sandbox, p.RuncRoot, p.CNIBin, p.CNIConf)
}

// Start runs containerd until the test ends. It fails the test, saying how
// to get them, if containerd or runc is missing.
func Start(t testing.TB) *Containerd {
	t.Helper()
	bin, err := k8sbin.Path("containerd")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("runc"); err != nil {
		t.Fatal("runc is not installed: apt-get install runc (./hack/test installs it)")
	}
	dir, err := os.MkdirTemp("", "ctd-") // short: socket paths must stay under 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	c := &Containerd{
		Root:   filepath.Join(dir, "root"),
		State:  filepath.Join(dir, "state"),
		Socket: filepath.Join(dir, "c.sock"),
		Log:    filepath.Join(dir, "containerd.log"),
	}
	cfg := filepath.Join(dir, "config.toml")
	body := Config(Paths{Root: c.Root, State: c.State, Socket: c.Socket, Opt: filepath.Join(dir, "opt"),
		RuncRoot: filepath.Join(dir, "runc"), CNIBin: filepath.Dir(bin), CNIConf: filepath.Join(dir, "cni"),
		Sandbox: "registry.k8s.io/pause:" + render.PauseVersion})
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(c.Log)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", cfg)
	cmd.Stdout, cmd.Stderr = log, log
	// The shim must come from the same build: put it first on PATH.
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); log.Close() }()
	t.Cleanup(func() {
		c.stopShims()
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		unmountUnder(dir)
		if t.Failed() {
			b, _ := os.ReadFile(c.Log)
			t.Logf("--- containerd log:\n%s", tail(string(b), 30))
		}
		os.RemoveAll(dir)
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(c.Socket); err == nil {
			return c
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(c.Log)
			t.Fatalf("containerd exited (%v):\n%s", err, tail(string(b), 30))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("containerd did not open its socket within 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stopShims kills the runc shims by the PIDs they recorded, since they
// outlive containerd by design.
func (c *Containerd) stopShims() {
	pids, _ := filepath.Glob(filepath.Join(c.State, "io.containerd.runtime.v2.task", "*", "*", "shim.pid"))
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// unmountUnder lazily unmounts anything still mounted below dir.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return
	}
	lines := strings.Split(string(b), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		f := strings.Fields(lines[i])
		if len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
			syscall.Unmount(f[1], syscall.MNT_DETACH)
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
