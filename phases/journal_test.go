package phases_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
)

// leftFiles lists the regular files under root, as host paths.
func leftFiles(t *testing.T, root string) []string {
	t.Helper()
	var left []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			left = append(left, strings.TrimPrefix(p, root))
		}
		return nil
	})
	return left
}

// resetLeavesNothing resets root and fails the test for any file left.
func resetLeavesNothing(t *testing.T, root string) {
	t.Helper()
	if err := phases.Reset(context.Background(), phases.ResetOptions{Root: root}); err != nil {
		t.Fatal(err)
	}
	if left := leftFiles(t, root); len(left) != 0 {
		t.Errorf("reset left %q", left)
	}
}

// TestResetAfterCrashRemovesEveryBundleFile: a crash in the files phase
// (here: the state a kill -9 leaves, half the files in place and no
// journal saved) is followed by a re-run and a reset. The re-run finds half
// the files already in place and must still record them, so the reset
// removes admin.conf and every other file the bundle put there.
func TestResetAfterCrashRemovesEveryBundleFile(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	root := t.TempDir()
	files, _ := render.NodeFiles(c.Cluster, c.Secrets, "cp1")
	if err := hostfs.WriteTree(root, files[:len(files)/2]); err != nil {
		t.Fatal(err)
	}
	if err := phases.Apply(context.Background(), opts(path, digest, root)); err != nil {
		t.Fatal(err)
	}
	j, err := phases.LoadJournal(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !slices.Contains(j.Files, f.Path) {
			t.Errorf("the journal does not list %s", f.Path)
		}
	}
	resetLeavesNothing(t, root)
}

// TestJournalIsWrittenAheadOfAFullDisk fills the disk in the middle of the
// files phase (a small tmpfs as the root): the journal must already list
// every file, so that a reset right after the failure removes all that
// was written; and after room is made, a re-run converges and a reset
// again leaves nothing.
func TestJournalIsWrittenAheadOfAFullDisk(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	files, _ := render.NodeFiles(c.Cluster, c.Secrets, "cp1")
	pages := 0
	for _, f := range files {
		pages += (len(f.Data) + 4095) / 4096
	}
	root := mountTmpfs(t, 4096*(2+pages/2))

	err := phases.Apply(context.Background(), opts(path, digest, root))
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("err = %v, want the disk to be full", err)
	}
	written := 0
	for _, f := range files {
		if _, err := os.Stat(hostfs.Path(root, f.Path)); err == nil {
			written++
		}
	}
	if written == 0 || written == len(files) {
		t.Fatalf("%d of %d files written before the disk was full; the test wants a failure part way", written, len(files))
	}
	j, err := phases.LoadJournal(root)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(j.Phases, "files") {
		t.Error("the journal says the failed files phase finished")
	}
	for _, f := range files {
		if !slices.Contains(j.Files, f.Path) {
			t.Errorf("after the failure, the journal does not list %s", f.Path)
		}
	}

	// Make room, re-run, reset.
	if out, err := exec.Command("mount", "-o", "remount,size=16m", root).CombinedOutput(); err != nil {
		t.Fatalf("growing the tmpfs: %v: %s", err, out)
	}
	if err := phases.Apply(context.Background(), opts(path, digest, root)); err != nil {
		t.Fatal(err)
	}
	resetLeavesNothing(t, root)
}

// mountTmpfs mounts a tmpfs of size bytes for the test: the way to fill a
// disk without filling the machine's.
func mountTmpfs(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+strconv.Itoa(size), "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mounting a tmpfs (this test runs as root, like ./hack/test): %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	return dir
}

const otherCfg = `
name = "other"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
`

// TestAnotherClustersFilesAreNeverClaimed: with the cluster check ignored,
// a bundle of cluster r on a host of cluster other is still refused, the
// journal still names cluster other with its own files, nothing of other's
// is overwritten, and the refusal's reset hint carries --root.
func TestAnotherClustersFilesAreNeverClaimed(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	other := clustertest.New(t, otherCfg)
	otherPath, otherDigest, _ := writeBundle(t, other)

	apply := func(root, path, digest string) error {
		o := opts(path, digest, root)
		o.Only = ""
		o.IgnorePreflight = []string{"cluster", "ports", "sandbox-image"}
		o.SkipPhases = []string{"images", "kubelet", "wait-etcd", "wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons"}
		return phases.Apply(context.Background(), o)
	}
	t.Run("journal of another cluster", func(t *testing.T) {
		root := t.TempDir()
		if err := apply(root, otherPath, otherDigest); err != nil {
			t.Fatal(err)
		}
		before := snapshot(t, root)
		jBefore, _ := phases.LoadJournal(root)
		err := apply(root, path, digest)
		if err == nil || !strings.Contains(err.Error(), "airadm reset --root "+root+"`") {
			t.Fatalf("err = %v, want a refusal with a reset hint naming --root %s", err, root)
		}
		j, err := phases.LoadJournal(root)
		if err != nil || j.Cluster != "other" || j.ManifestDigest != otherDigest || !slices.Equal(j.Files, jBefore.Files) {
			t.Errorf("journal = %+v, %v; want cluster other's, unchanged: %+v", j, err, jBefore)
		}
		if after := snapshot(t, root); !mapsEqual(before, after) {
			t.Error("the refused bundle changed files")
		}
	})
	t.Run("no journal", func(t *testing.T) {
		// Another cluster's kubeconfig is there but nothing says whose:
		// no journal and no CA (a host set up by hand, say).
		root := t.TempDir()
		if err := apply(root, otherPath, otherDigest); err != nil {
			t.Fatal(err)
		}
		os.Remove(hostfs.Path(root, render.AiradmStateDir+"/journal.json"))
		os.Remove(hostfs.Path(root, render.PKIDir+"/ca.crt"))
		admin := hostfs.Path(root, "/etc/kubernetes/admin.conf")
		theirs, _ := os.ReadFile(admin)
		err := apply(root, path, digest)
		if err == nil || !strings.Contains(err.Error(), "/etc/kubernetes/admin.conf") || !strings.Contains(err.Error(), "--root "+root) {
			t.Fatalf("err = %v, want a refusal naming admin.conf", err)
		}
		if now, _ := os.ReadFile(admin); !bytes.Equal(now, theirs) {
			t.Error("another cluster's admin.conf was overwritten")
		}
		j, _ := phases.LoadJournal(root)
		if slices.Contains(j.Files, "/etc/kubernetes/admin.conf") || j.Cluster == "r" {
			t.Errorf("the journal claims another cluster's files: %+v", j)
		}
	})
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestCancelStopsAtASafePoint cancels the context (what SIGINT and SIGTERM
// do in main) as the files phase starts: apply stops with the
// cancellation, records no finished phase, and a re-run and a reset still
// converge.
func TestCancelStopsAtASafePoint(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	root := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	o := opts(path, digest, root)
	o.Out = cancelOn{"[files]", cancel}
	err := phases.Apply(ctx, o)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want the cancellation", err)
	}
	var be *bundle.EntryError
	if errors.As(err, &be) {
		t.Errorf("a cancellation is blamed on the bundle: %v", err)
	}
	j, err := phases.LoadJournal(root)
	if err != nil || len(j.Phases) != 0 {
		t.Errorf("journal = %+v, %v; want no finished phase", j, err)
	}
	o.Out = nil
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	resetLeavesNothing(t, root)
}

// cancelOn cancels when a line containing s is written.
type cancelOn struct {
	s      string
	cancel func()
}

func (c cancelOn) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte(c.s)) {
		c.cancel()
	}
	return len(p), nil
}

// TestResetRootRules: reset under a root other than / refuses a root that
// does not exist (creating nothing), and leaves the container runtime
// alone unless a socket is given.
func TestResetRootRules(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "does-not-exist")
	err := phases.Reset(context.Background(), phases.ResetOptions{Root: missing})
	if !errors.Is(err, phases.ErrNoRoot) {
		t.Errorf("err = %v, want ErrNoRoot", err)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("reset created %s", missing)
	}
	var out bytes.Buffer
	if err := phases.Reset(context.Background(), phases.ResetOptions{Root: t.TempDir(), Out: &out}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "left the container runtime alone") || strings.Contains(out.String(), "removed 0 containers") {
		t.Errorf("output:\n%s", out.String())
	}
}

// TestDryRunSaysWhatItDidNotCheck: on a host with no containerd, a dry run
// says the containerd check was skipped instead of claiming it passed, and
// a --containerd-config that does not exist is a failure.
func TestDryRunSaysWhatItDidNotCheck(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	var out bytes.Buffer
	o := opts(path, digest, t.TempDir())
	o.Only, o.DryRun, o.Out = "", true, &out
	o.IgnorePreflight = []string{"ports"}
	o.CRISocket = "unix://" + filepath.Join(t.TempDir(), "no-containerd.sock")
	o.ContainerdConfig = filepath.Join(t.TempDir(), "nonexistent.toml")
	err := phases.Apply(context.Background(), o)
	if err == nil || !strings.Contains(err.Error(), "sandbox-image: reading containerd's config") || !strings.Contains(err.Error(), "nonexistent.toml") {
		t.Errorf("err = %v, want the missing containerd config to fail", err)
	}
	s := out.String()
	if !strings.Contains(s, "skipped: containerd (dry run)") || strings.Contains(s, "ok: containerd") || strings.Contains(s, "ok: sandbox-image") {
		t.Errorf("dry-run output:\n%s", s)
	}
}

// TestResetCommandUnderRoot runs the real `airadm reset`: a --root that
// does not exist is bad usage (exit 2) and is not created, and under an
// existing root other than / the host's default containerd socket is not
// touched unless --cri-socket is given.
func TestResetCommandUnderRoot(t *testing.T) {
	airadm := filepath.Join(t.TempDir(), "airadm")
	if out, err := exec.Command("go", "build", "-o", airadm, "..").CombinedOutput(); err != nil {
		t.Fatalf("building airadm: %v\n%s", err, out)
	}
	missing := filepath.Join(t.TempDir(), "does-not-exist")
	out, err := exec.Command(airadm, "reset", "--force", "--root", missing).CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(string(out), "--root must name an existing directory") {
		t.Errorf("reset --root %s: %v\n%s", missing, err, out)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("reset created %s", missing)
	}
	out, err = exec.Command(airadm, "reset", "--force", "--root", t.TempDir()).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "left the container runtime alone") || strings.Contains(string(out), "removed 0 containers") {
		t.Errorf("reset --root DIR: %v\n%s", err, out)
	}
}

// TestSIGTERMStopsApplyAtASafePoint sends SIGTERM (what systemd and
// cloud-init send) to a real `airadm apply` while its kubelet phase waits
// for a kubelet that never gets healthy: apply stops at once with exit 1,
// the journal records the phases that finished and not the interrupted
// one, and a reset then leaves nothing, the kubelet stopped too.
func TestSIGTERMStopsApplyAtASafePoint(t *testing.T) {
	c := clustertest.New(t, cfg+`
[[nodes]]
name = "w1"
role = "worker"
address = "127.0.1.21"
`)
	path, digest := c.Bundle(t, "w1", nil, nil)
	dir := t.TempDir()
	airadm := filepath.Join(dir, "airadm")
	if out, err := exec.Command("go", "build", "-o", airadm, "..").CombinedOutput(); err != nil {
		t.Fatalf("building airadm: %v\n%s", err, out)
	}
	// A kubelet that runs but never answers /healthz; argv[0] "kubelet"
	// so that reset recognises it by its PID file.
	kubelet := filepath.Join(dir, "kubelet")
	if err := os.WriteFile(kubelet, []byte("#!/bin/bash\nexec -a kubelet sleep 300\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	cmd := exec.Command(airadm, "apply", "--root", root, "--node", "w1", "--manifest-digest", digest,
		"--skip-phases", "images", "--ignore-preflight-errors", "ports,sandbox-image,swap",
		"--kubelet", "exec", "--kubelet-binary", kubelet, path)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var seen bytes.Buffer
	buf := make([]byte, 4096)
	for !bytes.Contains(seen.Bytes(), []byte("[kubelet]")) {
		n, err := stdout.Read(buf)
		seen.Write(buf[:n])
		if err != nil {
			cmd.Wait()
			t.Fatalf("apply ended before its kubelet phase: %v\n%s\n%s", err, seen.String(), stderr.String())
		}
	}
	// Signal once the fake kubelet is running as "kubelet": before its
	// exec, bash's own argv would not be recognised as a kubelet by anyone.
	pidFile := hostfs.Path(root, render.AiradmStateDir+"/kubelet.pid")
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(pidFile)
		argv, _ := os.ReadFile("/proc/" + strings.TrimSpace(string(b)) + "/cmdline")
		if strings.HasPrefix(string(argv), "kubelet\x00") {
			break
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	err = cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(stderr.String(), "phase kubelet: stopped before it finished") {
		t.Errorf("apply after SIGTERM: %v\n%s", err, stderr.String())
	}
	j, err := phases.LoadJournal(root)
	if err != nil || !slices.Equal(j.Phases, []string{"preflight", "files", "runtime"}) || len(j.Files) == 0 {
		t.Errorf("journal = %+v, %v; want preflight, files and runtime finished", j, err)
	}
	b, _ := os.ReadFile(hostfs.Path(root, render.AiradmStateDir+"/kubelet.pid"))
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	t.Cleanup(func() {
		if pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	resetLeavesNothing(t, root)
	if pid > 0 {
		if stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil && !strings.Contains(string(stat), ") Z ") {
			t.Errorf("the kubelet apply started (pid %d) still runs after reset", pid)
		}
	}
}
