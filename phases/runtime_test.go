package phases_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
)

// runtimeSources are the host files of a bundle that carries a runtime:
// the pinned containerd and its shim and CNI plugins, and Debian's runc.
func runtimeSources(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{"/usr/local/sbin/runc": "/usr/sbin/runc"}
	for path, name := range map[string]string{
		"/usr/local/bin/containerd":              "containerd",
		"/usr/local/bin/containerd-shim-runc-v2": "containerd-shim-runc-v2",
		"/opt/cni/bin/bridge":                    "bridge",
		"/opt/cni/bin/host-local":                "host-local",
		"/opt/cni/bin/loopback":                  "loopback",
		"/opt/cni/bin/portmap":                   "portmap",
	} {
		p, err := k8sbin.Path(name)
		if err != nil {
			t.Fatal(err)
		}
		out[path] = p
	}
	if _, err := os.Stat("/usr/sbin/runc"); err != nil {
		t.Fatal("runc is not installed: apt-get install runc (./hack/test installs it)")
	}
	return out
}

// runtimeConfig is a worker whose bundle carries the runtime, with the
// settings these VMs need (no CAP_SYS_RESOURCE, cgroup v1, no systemd)
// and containerd's paths under dir, as [containerd.config] overrides.
func runtimeConfig(t *testing.T, dir string, sources map[string]string, extra string) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, `name = "rt"
[pki]
algorithm = "ECDSA-P256"

[kubelet]
cgroup_driver = "cgroupfs"
cri_socket = "unix://%[1]s/run/containerd/containerd.sock"

[containerd.config]
root = "%[1]s/var/lib/containerd"
state = "%[1]s/run/containerd"
imports = []

[containerd.config.plugins.'io.containerd.internal.v1.opt']
path = "%[1]s/opt/containerd"

[containerd.config.plugins.'io.containerd.nri.v1.nri']
disable = true

[containerd.config.plugins.'io.containerd.cri.v1.runtime']
restrict_oom_score_adj = true
%[2]s
[containerd.config.plugins.'io.containerd.cri.v1.runtime'.cni]
bin_dirs = ["%[1]s/opt/cni/bin"]
conf_dir = "%[1]s/etc/cni/net.d"

[containerd.config.plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
Root = "%[1]s/run/runc"

[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"

[[nodes]]
name = "w1"
role = "worker"
address = "127.0.1.21"
`, dir, extra)
	for path, src := range sources {
		f, err := os.Open(src)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		_, err = f.WriteTo(h)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "\n[[host.files]]\npath = %q\nsource = %q\nsha256 = %q\n", path, src, hex.EncodeToString(h.Sum(nil)))
	}
	return b.String()
}

// runtimeBundle writes w1's bundle with its host files.
func runtimeBundle(t *testing.T, c *clustertest.Cluster, sources map[string]string) (string, string) {
	t.Helper()
	files, err := render.NodeFiles(c.Cluster, c.Secrets, "w1")
	if err != nil {
		t.Fatal(err)
	}
	for path, src := range sources {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, render.File{Path: path, Mode: 0o755, Data: b})
	}
	path := filepath.Join(t.TempDir(), "w1.bundle")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, digest, err := bundle.Write(f, bundle.Contents{Cluster: c.Name, Node: "w1", Role: "worker",
		KubernetesVersion: c.KubernetesVersion, BuildTime: clustertest.Now, Files: files}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return path, digest
}

var phaseTime = regexp.MustCompile(`containerd answers CRI at \S+, ([0-9.]+)s after the phase started`)

// TestRuntimePhase applies a bundle carrying containerd, its shim, runc
// and the CNI plugins into a --root: the runtime phase installs the
// rendered config and starts the bundle's containerd, whose CRI plugin
// then reports ok. A re-run changes nothing and leaves the same process; a
// bundle with a changed config restarts it; reset stops it and removes
// everything apply installed. Run it under the live lock:
// flock /tmp/airadm-live.lock go test -p 1 ./phases -run TestRuntimePhase
func TestRuntimePhase(t *testing.T) {
	dir, err := os.MkdirTemp("", "rt-") // short: containerd's socket path
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Whatever failed, nothing of this test may keep running.
		phases.Reset(context.Background(), phases.ResetOptions{Root: dir})
		if b, err := os.ReadFile(filepath.Join(dir, "var/lib/airadm/containerd.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		os.RemoveAll(dir)
	})
	sources := runtimeSources(t)
	c := clustertest.New(t, runtimeConfig(t, dir, sources, ""))
	path, digest := runtimeBundle(t, c, sources)
	apply := func(path, digest string) string {
		t.Helper()
		var out bytes.Buffer
		err := phases.Apply(context.Background(), phases.Options{Bundle: path, ManifestDigest: digest, Root: dir, Node: "w1",
			SkipPhases: []string{"images", "kubelet", "tls-bootstrap"}, IgnorePreflight: []string{"ports", "swap", "sandbox-image"},
			Kubelet: phases.KubeletExec, Out: &out})
		if err != nil {
			b, _ := os.ReadFile(filepath.Join(dir, "var/log/airadm/containerd.log"))
			t.Fatalf("apply: %v\n%s\ncontainerd log:\n%s", err, out.String(), b)
		}
		return out.String()
	}
	out := apply(path, digest)
	for _, want := range []string{
		"containerd: from the bundle (/usr/local/bin/containerd)",
		"runc: from the bundle (/usr/local/sbin/runc)",
		"loopback: from the bundle (/opt/cni/bin/loopback)",
		"portmap: from the bundle (/opt/cni/bin/portmap)",
		"wrote /etc/containerd/config.toml",
		"started containerd (pid ",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("apply's output lacks %q:\n%s", want, out)
		}
	}
	m := phaseTime.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("the runtime phase did not report containerd answering:\n%s", out)
	}
	t.Logf("runtime phase, from its start to containerd answering CRI status: %ss", m[1])
	sock := filepath.Join(dir, "run/containerd/containerd.sock")
	criOK(t, sock)
	cfg, err := os.ReadFile(hostfs.Path(dir, render.ContainerdConfigFile))
	if err != nil || !bytes.Contains(cfg, []byte(`sandbox = "`+c.PauseImage()+`"`)) {
		t.Errorf("installed config (%v) does not pin the bundle's pause %s:\n%s", err, c.PauseImage(), cfg)
	}
	pid := readPID(t, dir)

	// A re-run changes nothing: same files, same process.
	before := snapshot(t, dir+"/etc")
	out = apply(path, digest)
	if !strings.Contains(out, fmt.Sprintf("containerd already running (pid %d), its config unchanged", pid)) {
		t.Errorf("a re-run did not find containerd running:\n%s", out)
	}
	if after := snapshot(t, dir+"/etc"); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("a re-run changed files under /etc")
	}

	// A changed config restarts it.
	c2 := clustertest.New(t, runtimeConfig(t, dir, sources, "max_container_log_line_size = 8192\n"))
	c2.Secrets = c.Secrets
	path2, digest2 := runtimeBundle(t, c2, sources)
	out = apply(path2, digest2)
	if !strings.Contains(out, "stopping containerd (pid "+strconv.Itoa(pid)+"): its config changed") || readPID(t, dir) == pid {
		t.Errorf("a changed config did not restart containerd:\n%s", out)
	}
	criOK(t, sock)
	pid = readPID(t, dir)

	// A containerd apply did not start (no PID file of its own) is not
	// replaced by a second one on the same socket.
	pidFile := filepath.Join(dir, "var/lib/airadm/containerd.pid")
	os.Rename(pidFile, pidFile+".away")
	var refused bytes.Buffer
	err = phases.Apply(context.Background(), phases.Options{Bundle: path, ManifestDigest: digest, Root: dir, Node: "w1",
		SkipPhases: []string{"images", "kubelet", "tls-bootstrap"}, IgnorePreflight: []string{"ports", "swap", "sandbox-image"},
		Kubelet: phases.KubeletExec, Out: &refused})
	if err == nil || !strings.Contains(err.Error(), "a containerd that airadm did not start already answers at "+sock) {
		t.Errorf("apply beside a foreign containerd = %v\n%s", err, refused.String())
	}
	os.Rename(pidFile+".away", pidFile)
	criOK(t, sock)

	resetLeavesNothing(t, dir)
	if stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil && !strings.Contains(string(stat), ") Z ") {
		t.Errorf("the containerd apply started (pid %d) still runs after reset", pid)
	}
}

func readPID(t *testing.T, root string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "var/lib/airadm/containerd.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// criOK asks containerd at sock for its CRI plugin's status.
func criOK(t *testing.T, sock string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := containerd.New(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	resp, err := c.IntrospectionService().Plugins(ctx, `type=="io.containerd.grpc.v1",id=="cri"`)
	if err != nil || len(resp.Plugins) != 1 {
		t.Fatalf("asking containerd for its CRI plugin: %v %v", resp, err)
	}
	if e := resp.Plugins[0].GetInitErr(); e != nil {
		t.Errorf("containerd's CRI plugin failed: %s", e.GetMessage())
	}
}

// TestRuntimePhaseLeavesTheHostRuntime: a bundle without containerd
// installs no runtime config and starts nothing; preflight and the phase
// say the host's runtime is used. The kernel's persisted settings are
// journaled, so reset removes them; a dry run writes nothing.
func TestRuntimePhaseLeavesTheHostRuntime(t *testing.T) {
	c := clustertest.New(t, cfg+`
[[nodes]]
name = "w1"
role = "worker"
address = "127.0.1.21"
`)
	path, digest := c.Bundle(t, "w1", nil, nil)
	root := t.TempDir()
	o := phases.Options{Bundle: path, ManifestDigest: digest, Root: root, Node: "w1",
		SkipPhases: []string{"images", "kubelet", "tls-bootstrap"}, IgnorePreflight: []string{"ports", "swap", "sandbox-image"}}
	var out bytes.Buffer
	o.Out, o.DryRun = &out, true
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if left := leftFiles(t, root); len(left) != 0 {
		t.Errorf("a dry run wrote %q", left)
	}
	if !strings.Contains(out.String(), "would write "+render.SysctlFile) {
		t.Errorf("the dry run does not say it would persist the sysctls:\n%s", out.String())
	}
	out.Reset()
	o.DryRun = false
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"the bundle carries no container runtime: the host's containerd at /var/run/containerd/containerd.sock is used",
		"the bundle carries no containerd: the host's runtime at /var/run/containerd/containerd.sock is used as it is",
		"ok: module overlay: ",
		"wrote " + render.ModulesLoadFile,
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("apply's output lacks %q:\n%s", want, out.String())
		}
	}
	if _, err := os.Stat(hostfs.Path(root, render.ContainerdConfigFile)); err == nil {
		t.Error("a bundle without containerd installed a containerd config")
	}
	j, err := phases.LoadJournal(root)
	if err != nil || !slices.Contains(j.Files, render.SysctlFile) || !slices.Contains(j.Files, render.ModulesLoadFile) {
		t.Errorf("the journal (%v) lacks the kernel's persisted settings: %v", err, j.Files)
	}
	resetLeavesNothing(t, root)
}

// fakeSystemctl is a systemctl for a host without systemd: it records its
// arguments and runs the unit's containerd itself, so the systemd path of
// the runtime phase can run here.
const fakeSystemctl = `#!/bin/sh
echo "$@" >> "$FAKE_SYSTEMD/calls"
case "$1" in
is-active) [ -f "$FAKE_SYSTEMD/pid" ] && kill -0 "$(cat "$FAKE_SYSTEMD/pid")"; exit ;;
start|restart)
	[ -f "$FAKE_SYSTEMD/pid" ] && kill "$(cat "$FAKE_SYSTEMD/pid")" && sleep 0.2
	exec=$(sed -n 's/^ExecStart=//p' "$FAKE_ROOT/etc/systemd/system/containerd.service")
	PATH="$FAKE_ROOT/usr/local/sbin:$PATH" setsid "$FAKE_ROOT$exec" --config "$FAKE_ROOT/etc/containerd/config.toml" >>"$FAKE_SYSTEMD/log" 2>&1 &
	echo $! > "$FAKE_SYSTEMD/pid" ;;
esac
exit 0
`

// TestRuntimePhaseSystemd runs the systemd path (a fake systemctl that
// starts the unit's ExecStart): the upstream unit is installed pointing at
// the bundle's containerd (here /usr/bin/containerd, not upstream's
// /usr/local/bin), enabled and started, and a drop-in points the kubelet
// unit at the bundle's /usr/local/bin/kubelet; a re-run finds it active and
// starts nothing. Under the live lock, like TestRuntimePhase.
func TestRuntimePhaseSystemd(t *testing.T) {
	dir, err := os.MkdirTemp("", "rts-")
	if err != nil {
		t.Fatal(err)
	}
	fake := t.TempDir()
	t.Cleanup(func() {
		if b, err := os.ReadFile(filepath.Join(fake, "pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		phases.Reset(context.Background(), phases.ResetOptions{Root: dir})
		os.RemoveAll(dir)
	})
	if err := os.WriteFile(filepath.Join(fake, "systemctl"), []byte(fakeSystemctl), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", fake+":"+os.Getenv("PATH"))
	t.Setenv("FAKE_SYSTEMD", fake)
	t.Setenv("FAKE_ROOT", dir)
	sources := runtimeSources(t)
	sources["/usr/bin/containerd"] = sources["/usr/local/bin/containerd"]
	delete(sources, "/usr/local/bin/containerd")
	// kubelet where upstream's package-less install puts it; nothing runs
	// it here, so a small binary stands in.
	sources["/usr/local/bin/kubelet"] = sources["/opt/cni/bin/loopback"]
	c := clustertest.New(t, runtimeConfig(t, dir, sources, ""))
	path, digest := runtimeBundle(t, c, sources)
	o := phases.Options{Bundle: path, ManifestDigest: digest, Root: dir, Node: "w1",
		SkipPhases: []string{"images", "kubelet", "tls-bootstrap"}, IgnorePreflight: []string{"ports", "swap", "sandbox-image"},
		Kubelet: phases.KubeletSystemd}
	var out bytes.Buffer
	o.Out = &out
	if err := phases.Apply(context.Background(), o); err != nil {
		log, _ := os.ReadFile(filepath.Join(fake, "log"))
		t.Fatalf("apply: %v\n%s\ncontainerd log:\n%s", err, out.String(), log)
	}
	unit, err := os.ReadFile(hostfs.Path(dir, render.ContainerdUnitFile))
	if err != nil || !bytes.Contains(unit, []byte("\nExecStart=/usr/bin/containerd\n")) || !bytes.Contains(unit, []byte("Delegate=yes")) {
		t.Errorf("installed unit (%v) does not start the bundle's /usr/bin/containerd:\n%s", err, unit)
	}
	dropIn, err := os.ReadFile(hostfs.Path(dir, render.KubeletBinaryDropInFile))
	if err != nil || !bytes.Contains(dropIn, []byte("\nExecStart=\nExecStart=/usr/local/bin/kubelet $KUBELET_KUBECONFIG_ARGS")) {
		t.Errorf("no drop-in (%v) points the kubelet unit at the bundle's /usr/local/bin/kubelet:\n%s", err, dropIn)
	}
	if j, err := phases.LoadJournal(dir); err != nil || !slices.Contains(j.Files, render.KubeletBinaryDropInFile) {
		t.Errorf("the journal (%v) lacks the kubelet drop-in, so reset would leave it", err)
	}
	calls, _ := os.ReadFile(filepath.Join(fake, "calls"))
	if want := "daemon-reload\nenable containerd\nis-active --quiet containerd\nstart containerd\n"; string(calls) != want {
		t.Errorf("systemctl calls:\n%s\nwant:\n%s", calls, want)
	}
	if !strings.Contains(out.String(), "containerd: from the bundle (/usr/bin/containerd)") || !phaseTime.MatchString(out.String()) {
		t.Errorf("apply's output:\n%s", out.String())
	}
	criOK(t, filepath.Join(dir, "run/containerd/containerd.sock"))

	os.Remove(filepath.Join(fake, "calls"))
	out.Reset()
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	calls, _ = os.ReadFile(filepath.Join(fake, "calls"))
	if want := "daemon-reload\nenable containerd\nis-active --quiet containerd\n"; string(calls) != want {
		t.Errorf("a re-run's systemctl calls:\n%s\nwant:\n%s", calls, want)
	}
	if !strings.Contains(out.String(), "containerd already running (systemd), its config unchanged") {
		t.Errorf("a re-run's output:\n%s", out.String())
	}
}

// TestRuntimePhaseDryRun: with a bundle that carries containerd, a dry run
// says what it would install and start, and writes and starts nothing.
func TestRuntimePhaseDryRun(t *testing.T) {
	root := t.TempDir()
	sources := runtimeSources(t)
	c := clustertest.New(t, runtimeConfig(t, root, sources, ""))
	path, digest := runtimeBundle(t, c, sources)
	var out bytes.Buffer
	err := phases.Apply(context.Background(), phases.Options{Bundle: path, ManifestDigest: digest, Root: root, Node: "w1",
		SkipPhases: []string{"images", "kubelet", "tls-bootstrap"}, IgnorePreflight: []string{"ports", "swap", "sandbox-image"},
		Kubelet: phases.KubeletExec, DryRun: true, Out: &out})
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{
		// No pause image here: the check reads the config the phase installs.
		"ignored: sandbox-image: the bundle carries no pause image, and containerd needs " + c.PauseImage() + " (the bundle's containerd config)",
		"would write /usr/local/bin/containerd",
		"would write " + render.ContainerdConfigFile,
		"would write " + render.ContainerdUnitFile,
		"would start containerd /usr/local/bin/containerd (exec) and wait for it at " + root + "/run/containerd/containerd.sock",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the dry run's output lacks %q:\n%s", want, out.String())
		}
	}
	if left := leftFiles(t, root); len(left) != 0 {
		t.Errorf("a dry run wrote %q", left)
	}
}
