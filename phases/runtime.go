package phases

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	containerd "github.com/containerd/containerd/v2/client"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

// Where the runtime phase keeps a containerd it started without systemd.
const (
	containerdPIDFile = render.AiradmStateDir + "/containerd.pid"
	containerdLogFile = "/var/log/airadm/containerd.log"
)

// runRuntime brings the host's kernel and container runtime to what the
// bundle needs: the kernel prerequisites, checked, set and persisted; and,
// when the bundle carries containerd, its config and unit installed and
// containerd (re)started, until it answers. A bundle without containerd
// leaves the host's runtime as it is.
func runRuntime(ctx context.Context, r *Run) error {
	start := time.Now()
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	failed := 0
	for _, k := range r.kernel(!r.DryRun) {
		r.logf("  %s", k)
		if k.problem {
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d kernel prerequisites are not met (see above)", failed)
	}
	persist := []hostFile{{render.ModulesLoadFile, render.ModulesLoad()}, {render.SysctlFile, render.SysctlConf()}}
	bin := r.bundledContainerd()
	var cfg, unit []byte
	if bin != "" {
		if cfg = files[render.BundledContainerdConfig]; cfg == nil {
			return fmt.Errorf("the bundle carries %s but no containerd config (%s); rebuild it with this airadm", bin, render.BundledContainerdConfig)
		}
		persist = append(persist, hostFile{render.ContainerdConfigFile, cfg})
		if !r.manifestHas(render.ContainerdUnitFile) {
			// The bundle's own unit, if it carries one, was laid by files.
			if files[render.BundledContainerdUnit] == nil {
				return fmt.Errorf("the bundle carries %s but no containerd unit (%s); rebuild it with this airadm", bin, render.BundledContainerdUnit)
			}
			unit = bytes.ReplaceAll(files[render.BundledContainerdUnit], []byte("ExecStart="+render.ContainerdUnitBinary+"\n"), []byte("ExecStart="+bin+"\n"))
			persist = append(persist, hostFile{render.ContainerdUnitFile, unit})
		}
	}
	// Under systemd the kubelet unit starts /usr/bin/kubelet: a bundle
	// that carries kubelet elsewhere gets a drop-in naming it (whatever
	// the mode: the unit is installed either way).
	if kb := r.bundledKubelet(); kb != "" && kb != render.KubeletBinary {
		persist = append(persist, hostFile{render.KubeletBinaryDropInFile, render.KubeletBinaryDropIn(kb)})
	}
	if !r.DryRun {
		paths := make([]string, 0, len(persist))
		for _, p := range persist {
			paths = append(paths, p.path)
		}
		// Write-ahead, as the files phase: reset must find every file.
		if err := r.journal.claim(r.Root, r.Manifest, paths); err != nil {
			return fmt.Errorf("recording the runtime's files in the journal: %w", err)
		}
	}
	configChanged := false
	for _, p := range persist {
		changed, err := r.install(p.path, p.data)
		if err != nil {
			return err
		}
		if changed && p.path == render.ContainerdConfigFile {
			configChanged = true
		}
	}
	if bin == "" {
		sock, err := r.criSocket(files)
		if err != nil {
			return err
		}
		r.logf("  the bundle carries no containerd: the host's runtime at %s is used as it is", sock)
		return nil
	}
	sock, err := containerdSocket(cfg)
	if err != nil {
		return err
	}
	if r.DryRun {
		r.logf("  would start containerd %s (%s) and wait for it at %s", bin, r.kubeletMode(), sock)
		return nil
	}
	var exited <-chan error
	if r.kubeletMode() == KubeletSystemd {
		if err := r.containerdSystemd(ctx, configChanged); err != nil {
			return err
		}
	} else if exited, err = r.containerdExec(bin, configChanged); err != nil {
		return err
	}
	if err := waitCRI(ctx, sock, exited, r.path(containerdLogFile)); err != nil {
		return err
	}
	r.logf("  containerd answers CRI at %s, %.2fs after the phase started", sock, time.Since(start).Seconds())
	return nil
}

// hostFile is a file the runtime phase installs.
type hostFile struct {
	path string
	data []byte
}

// kernelResult is one kernel prerequisite and what was found or done.
type kernelResult struct {
	name, state string
	problem     bool
}

func (k kernelResult) String() string {
	switch {
	case k.problem:
		return "failed: " + k.name + ": " + k.state
	case strings.Contains(k.state, ", want "), strings.HasPrefix(k.state, "not loaded"):
		return "not met: " + k.name + ": " + k.state
	}
	return "ok: " + k.name + ": " + k.state
}

// kernel checks the modules and sysctls kubeadm's install guide lists,
// by their effect: a module built into the kernel (as on these build
// machines, which have no modprobe) is as good as a loaded one. With fix,
// it loads missing modules where modprobe exists and sets the sysctls; it
// changes the running kernel only when Root is "/", as that is the kernel
// of the host being prepared.
func (r *Run) kernel(fix bool) []kernelResult {
	fix = fix && r.Root == "/"
	loaded, _ := os.ReadFile("/proc/modules")
	var out []kernelResult
	for _, m := range render.KernelModules {
		res := kernelResult{name: "module " + m}
		present := func() bool {
			switch m {
			case "overlay":
				fs, _ := os.ReadFile("/proc/filesystems")
				return slices.ContainsFunc(strings.Split(string(fs), "\n"), func(l string) bool { return strings.HasSuffix(l, "\toverlay") })
			case "br_netfilter":
				_, err := os.Stat("/proc/sys/net/bridge")
				return err == nil
			}
			_, err := os.Stat("/sys/module/" + m)
			return err == nil
		}
		switch {
		case present() && bytes.Contains(loaded, []byte(m+" ")):
			res.state = "loaded"
		case present():
			res.state = "built into the kernel"
		case !fix:
			res.state = "not loaded"
			_, noModprobe := exec.LookPath("modprobe")
			res.problem = r.Root == "/" && (!r.planned("runtime") || noModprobe != nil)
			if r.Root != "/" {
				res.state += " (the kernel is not the one under --root " + r.Root + "; left alone)"
			} else if !res.problem {
				res.state += " (the runtime phase loads it)"
			}
		default:
			modprobe, err := exec.LookPath("modprobe")
			if err != nil {
				res.state, res.problem = "not loaded, and there is no modprobe to load it", true
				break
			}
			if b, err := exec.Command(modprobe, m).CombinedOutput(); err != nil {
				res.state, res.problem = fmt.Sprintf("modprobe %s: %v: %s", m, err, strings.TrimSpace(string(b))), true
			} else if present() {
				res.state = "loaded by modprobe"
			} else {
				res.state, res.problem = "modprobe succeeded but the module has no effect", true
			}
		}
		out = append(out, res)
	}
	// loads says whether module m is missing now and the runtime phase
	// will load it, as reported above.
	loads := func(m string) bool {
		for _, k := range out {
			if k.name == "module "+m {
				return !k.problem && strings.HasSuffix(k.state, "(the runtime phase loads it)")
			}
		}
		return false
	}
	for _, s := range render.KernelSysctls() {
		res := kernelResult{name: s.Key}
		file := "/proc/sys/" + strings.ReplaceAll(s.Key, ".", "/")
		b, err := os.ReadFile(file)
		have := strings.TrimSpace(string(b))
		switch {
		case err != nil && s.Module != "" && loads(s.Module):
			// Checked before the runtime phase loads the module that
			// brings it: not there yet, and not a problem.
			res.state = fmt.Sprintf("absent until %s is loaded, want %s (the runtime phase loads it and sets it)", s.Module, s.Value)
		case err != nil && s.Optional:
			res.state = "absent from this kernel (optional)"
		case err != nil:
			res.state, res.problem = "absent from this kernel", true
		case have == s.Value:
			res.state = "= " + have
		case !fix:
			res.state = fmt.Sprintf("= %s, want %s", have, s.Value)
			res.problem = r.Root == "/" && !r.planned("runtime")
			if r.Root != "/" {
				res.state += " (the kernel is not the one under --root " + r.Root + "; left alone)"
			} else if !res.problem {
				res.state += " (the runtime phase sets it)"
			}
		default:
			if err := os.WriteFile(file, []byte(s.Value), 0o644); err != nil {
				res.state, res.problem = fmt.Sprintf("= %s, and setting it to %s failed: %v", have, s.Value, err), true
			} else {
				res.state = fmt.Sprintf("set to %s (was %s)", s.Value, have)
			}
		}
		out = append(out, res)
	}
	return out
}

// bundledContainerd is the host path of the containerd the bundle
// carries, or "".
func (r *Run) bundledContainerd() string {
	for _, p := range render.ContainerdBinaries() {
		if r.manifestHas(p) {
			return p
		}
	}
	return ""
}

// bundledKubelet is the host path of the kubelet the bundle carries, or
// "".
func (r *Run) bundledKubelet() string {
	for _, p := range render.KubeletBinaries() {
		if r.manifestHas(p) {
			return p
		}
	}
	return ""
}

func (r *Run) manifestHas(p string) bool {
	return slices.ContainsFunc(r.Manifest.Files, func(fe bundle.FileEntry) bool { return fe.Path == p })
}

// install writes data at a host path atomically unless it is already
// there, and says whether it changed anything.
func (r *Run) install(hostPath string, data []byte) (bool, error) {
	target := r.path(hostPath)
	if have, err := os.ReadFile(target); err == nil && bytes.Equal(have, data) {
		return false, nil
	}
	if r.DryRun {
		r.logf("  would write %s", hostPath)
		return true, nil
	}
	if err := hostfs.MkdirAll(r.Root, filepath.Dir(hostPath)); err != nil {
		return false, err
	}
	if err := atomicfile.Write(target, data, 0o644); err != nil {
		return false, err
	}
	r.logf("  wrote %s", hostPath)
	return true, nil
}

// containerdSocket reads the gRPC address from containerd's config.
func containerdSocket(cfg []byte) (string, error) {
	var c struct {
		Plugins map[string]map[string]any `toml:"plugins"`
	}
	if _, err := toml.Decode(string(cfg), &c); err != nil {
		return "", fmt.Errorf("reading the bundle's containerd config: %w", err)
	}
	if a, ok := c.Plugins["io.containerd.server.v1.grpc"]["address"].(string); ok && a != "" {
		return a, nil
	}
	return "/run/containerd/containerd.sock", nil
}

// containerdSystemd installs and starts the unit through systemd. A
// running containerd is restarted only when its config changed.
func (r *Run) containerdSystemd(ctx context.Context, configChanged bool) error {
	systemctl := func(args ...string) error {
		if out, err := exec.CommandContext(ctx, "systemctl", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("systemctl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	if err := systemctl("daemon-reload"); err != nil {
		return err
	}
	if err := systemctl("enable", "containerd"); err != nil {
		return err
	}
	active := exec.CommandContext(ctx, "systemctl", "is-active", "--quiet", "containerd").Run() == nil
	switch {
	case active && !configChanged:
		r.logf("  containerd already running (systemd), its config unchanged")
		return nil
	case active:
		r.logf("  restarting containerd (systemd): its config changed")
		return systemctl("restart", "containerd")
	default:
		r.logf("  starting containerd (systemd)")
		return systemctl("start", "containerd")
	}
}

// containerdExec starts containerd detached, in a session of its own, as
// the kubelet's exec mode does, unless the one apply started runs with an
// unchanged config. It returns a channel that reports an exit of the
// process it started.
func (r *Run) containerdExec(bin string, configChanged bool) (<-chan error, error) {
	if pid, ok := runningProcess(r.path(containerdPIDFile), "containerd"); ok {
		if !configChanged {
			r.logf("  containerd already running (pid %d), its config unchanged", pid)
			return nil, nil
		}
		r.logf("  stopping containerd (pid %d): its config changed", pid)
		if err := stopProcess(pid); err != nil {
			return nil, fmt.Errorf("stopping containerd: %w", err)
		}
	} else if sock, err := containerdSocket(r.files[render.BundledContainerdConfig]); err == nil && answers(sock) {
		// Two containerds on one socket would take it from each other.
		return nil, fmt.Errorf("a containerd that airadm did not start already answers at %s; stop it (or build the bundle without a runtime to use it)", sock)
	}
	if err := hostfs.MkdirAll(r.Root, filepath.Dir(containerdLogFile)); err != nil {
		return nil, err
	}
	log, err := os.OpenFile(r.path(containerdLogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening containerd log: %w", err)
	}
	defer log.Close()
	cmd := exec.Command(r.path(bin), "--config", r.path(render.ContainerdConfigFile))
	cmd.Stdout, cmd.Stderr = log, log
	// The shim and runc are found on PATH: the bundle's directories come
	// first (under --root, the ones under it), as systemd's default PATH
	// has them on a real host.
	var dirs []string
	for _, d := range []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
		dirs = append(dirs, r.path(d))
	}
	cmd.Env = append(slices.DeleteFunc(os.Environ(), func(e string) bool { return strings.HasPrefix(e, "PATH=") }),
		"PATH="+strings.Join(dirs, ":")+":"+os.Getenv("PATH"))
	// A session of its own: containerd outlives airadm, as under systemd.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	if err := writePID(r.path(containerdPIDFile), cmd.Process.Pid); err != nil {
		return nil, err
	}
	r.logf("  started containerd (pid %d), logging to %s", cmd.Process.Pid, containerdLogFile)
	return exited, nil
}

// waitCRI waits until containerd at sock answers and its CRI plugin
// reports no error, polling with a short backoff: containerd serves its
// socket only after every plugin has initialised, so the first answer is
// final. exited, if not nil, reports the process dying first.
func waitCRI(ctx context.Context, sock string, exited <-chan error, logPath string) error {
	deadline := time.Now().Add(60 * time.Second)
	delay := 5 * time.Millisecond
	var last error
	for {
		if _, err := os.Stat(sock); err != nil {
			last = err
		} else if last = criStatus(ctx, sock); last == nil {
			return nil
		} else if errors.Is(last, errCRIFailed) {
			return last
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("containerd exited at once (%v); the end of its log:\n%s", err, lastLines(string(b), 15))
		case <-ctx.Done():
			return fmt.Errorf("waiting for containerd at %s: %w", sock, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 200*time.Millisecond)
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd did not answer at %s within 60s: %v", sock, last)
		}
	}
}

var errCRIFailed = errors.New("containerd's CRI plugin failed")

// answers says whether a containerd serves sock now; a missing socket is
// not dialled (the client would wait out its timeout).
func answers(sock string) bool {
	if info, err := os.Stat(sock); err != nil || info.Mode().Type() != os.ModeSocket {
		return false
	}
	return criStatus(context.Background(), sock) == nil
}

// criStatus asks containerd for the status of its CRI plugin.
func criStatus(ctx context.Context, sock string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := containerd.New(sock, containerd.WithTimeout(time.Second))
	if err != nil {
		return err
	}
	defer c.Close()
	resp, err := c.IntrospectionService().Plugins(ctx, `type=="io.containerd.grpc.v1",id=="cri"`)
	if err != nil {
		return err
	}
	if len(resp.Plugins) == 0 {
		return fmt.Errorf("%w: containerd at %s has no CRI plugin", errCRIFailed, sock)
	}
	if e := resp.Plugins[0].GetInitErr(); e != nil {
		return fmt.Errorf("%w: %s", errCRIFailed, e.GetMessage())
	}
	return nil
}

// runningProcess reads a PID file and checks that the process is alive
// and runs the named binary (PIDs are reused).
func runningProcess(pidFile, name string) (int, bool) {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || filepath.Base(strings.SplitN(string(cmdline), "\x00", 2)[0]) != name {
		return 0, false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err == nil && strings.Contains(string(stat), ") Z ") {
		return 0, false // a zombie the slow PID 1 has not reaped yet
	}
	return pid, true
}

// installedContainerd is a containerd that apply installed, as reset
// finds it.
type installedContainerd struct {
	socket, root, state string
	systemd             bool // its unit is apply's and systemd runs
}

// ownContainerd reads the config of the containerd apply installed under
// root, or returns nil when the journal lists none: a host's own runtime
// is left alone.
func ownContainerd(root string, j *Journal) *installedContainerd {
	if !slices.Contains(j.Files, render.ContainerdConfigFile) {
		return nil
	}
	b, err := os.ReadFile(hostfs.Path(root, render.ContainerdConfigFile))
	if err != nil {
		return nil
	}
	var cfg struct {
		Root, State string
	}
	toml.Decode(string(b), &cfg)
	c := &installedContainerd{root: orDefault(cfg.Root, "/var/lib/containerd"), state: orDefault(cfg.State, "/run/containerd")}
	c.socket, _ = containerdSocket(b)
	if root == "/" && slices.Contains(j.Files, render.ContainerdUnitFile) {
		if _, err := os.Stat("/run/systemd/system"); err == nil {
			c.systemd = true
		}
	}
	return c
}

func orDefault(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// stop stops the containerd apply started, then the shims that outlive
// it, unmounts what they left, and removes containerd's root and state:
// they were made by a containerd apply installed.
func (c *installedContainerd) stop(ctx context.Context, root string, j *Journal, logf func(string, ...any)) error {
	var errs []error
	if pid, ok := runningProcess(hostfs.Path(root, containerdPIDFile), "containerd"); ok {
		errs = append(errs, stopProcess(pid))
		logf("stopped containerd (pid %d)", pid)
	} else if c.systemd {
		if out, err := exec.CommandContext(ctx, "systemctl", "disable", "--now", "containerd").CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("systemctl disable --now containerd: %w: %s", err, strings.TrimSpace(string(out))))
		} else {
			logf("stopped and disabled containerd (systemd)")
		}
	}
	pids, _ := filepath.Glob(filepath.Join(c.state, "io.containerd.runtime.v2.task", "*", "*", "shim.pid"))
	for _, p := range pids {
		if pid, ok := runningProcess(p, "containerd-shim-runc-v2"); ok {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for _, dir := range []string{c.state, c.root} {
		errs = append(errs, unmountUnder(dir), removeAll(dir))
	}
	logf("removed containerd's root %s and state %s", c.root, c.state)
	return errors.Join(errs...)
}
