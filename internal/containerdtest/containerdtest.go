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

	bin, config string
	cmd         *exec.Cmd
	exited      chan error
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
		bin:    bin,
		config: filepath.Join(dir, "config.toml"),
	}
	body := Config(Paths{Root: c.Root, State: c.State, Socket: c.Socket, Opt: filepath.Join(dir, "opt"),
		RuncRoot: filepath.Join(dir, "runc"), CNIBin: filepath.Dir(bin), CNIConf: filepath.Join(dir, "cni"),
		Sandbox: "registry.k8s.io/pause:" + render.PauseVersion})
	if err := os.WriteFile(c.config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.stopShims()
		c.stop(syscall.SIGTERM)
		unmountUnder(dir)
		if t.Failed() {
			b, _ := os.ReadFile(c.Log)
			t.Logf("--- containerd log:\n%s", tail(string(b), 30))
		}
		os.RemoveAll(dir)
	})
	c.start(t)
	return c
}

// Kill stops containerd with SIGKILL, as a crash or the OOM killer would,
// and waits until it is gone; its root and state stay for Restart.
func (c *Containerd) Kill() { c.stop(syscall.SIGKILL) }

// Restart starts containerd again on the same root, state and socket,
// after Kill.
func (c *Containerd) Restart(t testing.TB) {
	t.Helper()
	c.stop(syscall.SIGTERM)
	c.start(t)
}

// stop sends sig to containerd's process group and waits for the exit;
// a process that ignores SIGTERM for 10s gets SIGKILL.
func (c *Containerd) stop(sig syscall.Signal) {
	if c.cmd == nil {
		return
	}
	syscall.Kill(-c.cmd.Process.Pid, sig)
	select {
	case <-c.exited:
	case <-time.After(10 * time.Second):
		syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
		<-c.exited
	}
	c.cmd = nil
}

// start runs containerd and waits for its socket.
func (c *Containerd) start(t testing.TB) {
	t.Helper()
	// A killed containerd leaves its socket; waiting for it must see the
	// new one.
	os.Remove(c.Socket)
	log, err := os.OpenFile(c.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(c.bin, "--config", c.config)
	cmd.Stdout, cmd.Stderr = log, log
	// The shim must come from the same build: put it first on PATH.
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(c.bin)+":"+os.Getenv("PATH"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); log.Close() }()
	c.cmd, c.exited = cmd, exited
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(c.Socket); err == nil {
			return
		}
		select {
		case err := <-exited:
			c.cmd = nil
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
