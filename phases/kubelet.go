package phases

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

// How kubelet is started: through systemd where it is PID 1, or as a
// detached process on hosts (and in tests) without it.
const (
	KubeletSystemd = "systemd"
	KubeletExec    = "exec"
)

const (
	kubeletPIDFile = render.AiradmStateDir + "/kubelet.pid"
	kubeletLogFile = "/var/log/airadm/kubelet.log"
)

func (r *Run) kubeletMode() string {
	if r.Kubelet != "" {
		return r.Kubelet
	}
	if r.Root == "/" {
		if _, err := os.Stat("/run/systemd/system"); err == nil {
			return KubeletSystemd
		}
	}
	return KubeletExec
}

func runKubelet(ctx context.Context, r *Run) error {
	if r.upgrade != nil {
		return r.upgradeKubelet(ctx)
	}
	return startKubelet(ctx, r)
}

// startKubelet starts kubelet (restarts it, under systemd).
func startKubelet(ctx context.Context, r *Run) error {
	mode := r.kubeletMode()
	// A running kubelet read its files when it started: it restarts if
	// this run changed one of them, and is left alone otherwise.
	changed := r.kubeletInputsChanged()
	if r.DryRun {
		if r.worker() {
			r.logf("  would request the kubelet's client certificate with the bootstrap token and write %s", render.KubeletKubeconfig)
		}
		if len(changed) > 0 {
			r.logf("  would start or restart kubelet (%s): %s changed", mode, strings.Join(changed, ", "))
		} else {
			r.logf("  would start kubelet (%s) unless it runs", mode)
		}
		return nil
	}
	if mode == KubeletSystemd {
		if err := r.bootstrapKubelet(ctx); err != nil {
			return err
		}
		active := exec.CommandContext(ctx, "systemctl", "is-active", "--quiet", "kubelet").Run() == nil
		if active && len(changed) == 0 {
			r.logf("  kubelet running under systemd; its files are unchanged")
			return nil
		}
		for _, args := range [][]string{{"daemon-reload"}, {"enable", "kubelet"}, {"restart", "kubelet"}} {
			if out, err := exec.CommandContext(ctx, "systemctl", args...).CombinedOutput(); err != nil {
				return fmt.Errorf("systemctl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
			}
		}
		if active {
			r.logf("  kubelet restarted by systemd: %s changed", strings.Join(changed, ", "))
		} else {
			r.logf("  kubelet enabled and started by systemd")
		}
		return nil
	}
	if pid, ok := r.runningKubelet(); ok {
		if len(changed) == 0 {
			r.logf("  kubelet already running (pid %d); its files are unchanged", pid)
			return nil
		}
		if err := stopProcess(pid); err != nil {
			return fmt.Errorf("restarting kubelet: %w", err)
		}
		r.logf("  stopped kubelet (pid %d) to restart it: %s changed", pid, strings.Join(changed, ", "))
	}
	if err := r.bootstrapKubelet(ctx); err != nil {
		return err
	}
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	args, err := kubeletArgs(files[render.KubeletFlagsFile], r.Root)
	if err != nil {
		return err
	}
	bin := r.KubeletBinary
	if bin == "" {
		bin = render.KubeletBinary
	}
	if err := hostfs.MkdirAll(r.Root, filepath.Dir(kubeletLogFile)); err != nil {
		return err
	}
	logPath := r.path(kubeletLogFile)
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("opening kubelet log: %w", err)
	}
	defer log.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	// A session of its own: kubelet outlives airadm, as under systemd.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", bin, err)
	}
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	if err := writePID(r.path(kubeletPIDFile), pid); err != nil {
		return err
	}
	// Wait for kubelet's healthz, or its exit: a kubelet that dies at once
	// has a bad config or binary, and saying so now beats leaving
	// wait-control-plane to time out.
	healthz := fmt.Sprintf("http://127.0.0.1:%d/healthz", kubeletHealthzPort(files))
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	b := newBackoff(100 * time.Millisecond)
	for {
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("kubelet exited at once (%v); the end of %s:\n%s", err, kubeletLogFile, lastLines(string(b), 15))
		case <-ctx.Done():
			// kubelet runs on, recorded in its PID file: a re-run finds
			// it, and reset stops it.
			return fmt.Errorf("waiting for kubelet (pid %d) to be healthy: %w", pid, ctx.Err())
		case <-time.After(b.next):
			b.next = min(2*b.next, b.cap)
		}
		if resp, err := client.Get(healthz); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				r.logf("  kubelet started (pid %d), healthy, logging to %s", pid, kubeletLogFile)
				return nil
			}
		}
		if time.Now().After(deadline) {
			r.logf("  kubelet started (pid %d) but %s has not answered yet; see %s", pid, healthz, kubeletLogFile)
			return nil
		}
	}
}

func (r *Run) worker() bool { return render.Role(r.Manifest.Role) == render.Worker }

// bootstrapKubelet gives a worker's kubelet its client certificate before
// it starts (bootstrap.go), so it has no TLS bootstrap of its own to wait
// out.
func (r *Run) bootstrapKubelet(ctx context.Context) error {
	if !r.worker() {
		return nil
	}
	start := time.Now()
	var issued bool
	var err error
	if r.early != nil {
		issued, err = r.useEarlyCert(ctx)
	} else {
		issued, err = BootstrapKubelet(ctx, r.Root, r.Manifest.Node, r.Timeout)
	}
	if errors.Is(err, ErrControlPlaneUnreachable) {
		r.logf("  %v; the kubelet will do its TLS bootstrap itself once it is", err)
		return nil
	}
	if err != nil {
		return err
	}
	switch {
	case issued && r.early != nil:
		r.logf("  client certificate for system:node:%s issued through the CSR API, requested while the bundle was verified (%v before this phase), waited %v here; wrote %s",
			r.Manifest.Node, start.Sub(r.early.started).Round(time.Millisecond), time.Since(start).Round(time.Millisecond), render.KubeletKubeconfig)
	case issued:
		r.logf("  client certificate for system:node:%s issued through the CSR API in %v; wrote %s", r.Manifest.Node, time.Since(start).Round(time.Millisecond), render.KubeletKubeconfig)
	}
	return nil
}

// useEarlyCert writes the certificate requested during verification, as
// BootstrapKubelet would have, unless the host got a valid kubelet.conf
// meanwhile.
func (r *Run) useEarlyCert(ctx context.Context) (bool, error) {
	c := r.early.result(ctx)
	if c.err != nil {
		return false, c.err
	}
	if kubeconfigValid(r.Root, r.path(render.KubeletKubeconfig)) {
		return false, nil
	}
	return true, c.write(r.Root)
}

// kubeletConfig decodes the kubelet config the bundle carries (or a host
// file, for reset).
func kubeletConfig(b []byte) (*kubeletv1beta1.KubeletConfiguration, error) {
	var kc kubeletv1beta1.KubeletConfiguration
	if err := yaml.Unmarshal(b, &kc); err != nil {
		return nil, fmt.Errorf("reading %s: %w", render.KubeletConfigFile, err)
	}
	return &kc, nil
}

// kubeletHealthzPort reads healthzPort from the bundle's kubelet config.
func kubeletHealthzPort(files map[string][]byte) int32 {
	if kc, err := kubeletConfig(files[render.KubeletConfigFile]); err == nil && kc.HealthzPort != nil && *kc.HealthzPort > 0 {
		return *kc.HealthzPort
	}
	return 10248
}

// kubeletArgs is the command line the kubeadm drop-in gives kubelet:
// kubeconfigs, config file and the flags from kubeadm-flags.env. Under a
// --root other than /, the three files are found under it (the paths
// inside config.yaml stay absolute, as on the host being prepared).
func kubeletArgs(flagsEnv []byte, root string) ([]string, error) {
	args := []string{
		"--bootstrap-kubeconfig=" + hostfs.Path(root, render.BootstrapKubeconfig),
		"--kubeconfig=" + hostfs.Path(root, render.KubeletKubeconfig),
		"--config=" + hostfs.Path(root, render.KubeletConfigFile),
	}
	line := strings.TrimSpace(string(flagsEnv))
	value, ok := strings.CutPrefix(line, "KUBELET_KUBEADM_ARGS=")
	if !ok {
		return nil, fmt.Errorf("%s does not set KUBELET_KUBEADM_ARGS", render.KubeletFlagsFile)
	}
	unq, err := strconv.Unquote(value)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", render.KubeletFlagsFile, err)
	}
	return append(args, strings.Fields(unq)...), nil
}

// writePID records kubelet's PID durably: reset after a crash must find
// the kubelet apply started.
func writePID(path string, pid int) error {
	return atomicfile.Write(path, []byte(strconv.Itoa(pid)+"\n"), 0o600)
}

// runningKubelet reads the PID file and checks that process is a live
// kubelet (PIDs are reused).
func (r *Run) runningKubelet() (int, bool) {
	b, err := os.ReadFile(r.path(kubeletPIDFile))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(filepath.Base(strings.SplitN(string(cmdline), "\x00", 2)[0]), "kubelet") {
		return 0, false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err == nil && strings.Contains(string(stat), ") Z ") {
		return 0, false // a zombie the slow PID 1 has not reaped yet
	}
	return pid, true
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
