package phases

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/errdefs"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

// ErrNoRoot means reset's --root is not an existing directory: bad usage,
// and nothing was touched.
var ErrNoRoot = errors.New("--root must name an existing directory")

// ResetOptions configure Reset.
type ResetOptions struct {
	Root string
	Out  io.Writer
	// CRISocket is the unix:// endpoint of the runtime whose k8s.io
	// containers to remove. Empty means DefaultCRISocket when Root is "/",
	// and leaving the runtime alone under any other root: that runtime
	// belongs to the host, not to the tree under Root.
	CRISocket string
}

// DefaultCRISocket is the runtime reset cleans on a real host.
const DefaultCRISocket = render.DefaultCRISocket

// Reset undoes apply, best effort, like `kubeadm reset`: it stops kubelet,
// removes the containers kubelet started, the files the journal lists and
// the state kubelet and etcd made, and the leftovers REAL-CLUSTER-NOTES.md
// lists (mounts under /var/lib/kubelet, pod logs, kubepods cgroups). It
// keeps going after an error and reports them all at the end.
func Reset(ctx context.Context, o ResetOptions) error {
	if o.Root == "" {
		o.Root = "/"
	}
	// A mistyped --root must not be created and "reset".
	if info, err := os.Stat(o.Root); err != nil || !info.IsDir() {
		if err == nil {
			err = fmt.Errorf("%s is not a directory", o.Root)
		}
		return fmt.Errorf("resetting %s: %w: %v", o.Root, ErrNoRoot, err)
	}
	logf := func(format string, args ...any) {
		if o.Out != nil {
			fmt.Fprintf(o.Out, format+"\n", args...)
		}
	}
	unlock, err := lockHost(o.Root)
	if err != nil {
		return err
	}
	defer unlock()
	j, err := LoadJournal(o.Root)
	if err != nil {
		return err
	}
	// Read before the file goes: kubelet nests kubepods under cgroupRoot.
	cgroupRoot := "/"
	if b, err := os.ReadFile(hostfs.Path(o.Root, render.KubeletConfigFile)); err == nil {
		if kc, err := kubeletConfig(b); err == nil && kc.CgroupRoot != "" {
			cgroupRoot = kc.CgroupRoot
		}
	}
	var errs []error
	keep := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}

	if o.Root == "/" {
		// Before etcd stops, while it can still step down as a member.
		leaveEtcd(ctx, o.Root, logf)
	}
	r := &Run{Options: Options{Root: o.Root}}
	if pid, ok := r.runningKubelet(); ok {
		keep(stopProcess(pid))
		logf("stopped kubelet (pid %d)", pid)
	} else if o.Root == "/" {
		if _, err := os.Stat("/run/systemd/system"); err == nil {
			if out, err := exec.CommandContext(ctx, "systemctl", "stop", "kubelet").CombinedOutput(); err != nil {
				keep(fmt.Errorf("systemctl stop kubelet: %w: %s", err, strings.TrimSpace(string(out))))
			} else {
				logf("stopped kubelet (systemd)")
			}
		}
	}
	// A containerd that apply installed (the journal lists its config)
	// is apply's: its containers go whatever the root, then it stops.
	ours := ownContainerd(o.Root, j)
	socket := o.CRISocket
	if socket == "" && ours != nil {
		socket = "unix://" + ours.socket
	}
	if socket == "" && o.Root == "/" {
		socket = DefaultCRISocket
	}
	if socket != "" {
		n, err := removeContainers(ctx, strings.TrimPrefix(socket, "unix://"))
		keep(err)
		logf("removed %d containers", n)
	} else {
		logf("left the container runtime alone: %s is not the host's /, and no --cri-socket was given", o.Root)
	}
	if ours != nil {
		keep(ours.stop(ctx, o.Root, j, logf))
	}
	keep(unmountUnder(hostfs.Path(o.Root, render.KubeletDir)))

	files := append([]string(nil), j.Files...)
	sort.Strings(files)
	for _, f := range files {
		if err := os.Remove(hostfs.Path(o.Root, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			keep(err)
		}
	}
	logf("removed %d files apply wrote", len(files))
	if ours != nil && ours.systemd {
		// The unit file is gone: let systemd forget it.
		exec.CommandContext(ctx, "systemctl", "daemon-reload").Run()
	}
	// What kubelet and etcd made, as kubeadm reset removes it.
	for _, dir := range []string{render.ManifestsDir, render.KubeletDir, render.EtcdDataDir, "/var/log/pods", "/var/log/containers",
		render.KubeletKubeconfig, render.BootstrapKubeconfig, render.PKIDir, filepath.Dir(kubeletLogFile)} {
		keep(removeAll(hostfs.Path(o.Root, dir)))
	}
	if o.Root == "/" {
		keep(removeKubepodsCgroups(cgroupRoot))
	}
	if len(errs) > 0 {
		// The journal stays, so a second reset still knows what is ours.
		return fmt.Errorf("resetting: %w", errors.Join(errs...))
	}
	if err := removeAll(hostfs.Path(o.Root, render.AiradmStateDir)); err != nil {
		return fmt.Errorf("resetting: %w", err)
	}
	logf("reset done")
	return nil
}

// removeAll removes path and what it holds, but keeps a directory that is a
// mount point (a disk mounted at /var/lib/etcd, say) and only empties it.
func removeAll(path string) error {
	entries, err := os.ReadDir(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err // a file that cannot go
		}
		return nil
	}
	var errs []error
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(path, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, syscall.EBUSY) && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func stopProcess(pid int) error {
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return nil // already gone
	}
	if stopped(pid, 50) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return nil
	}
	// SIGKILL is delivered asynchronously: wait until it took, so that
	// what reset removes next is no longer in use.
	if !stopped(pid, 50) {
		return fmt.Errorf("stopping process %d: still running after SIGKILL", pid)
	}
	return nil
}

// stopped waits up to tries×100 ms for pid to exit or become a zombie (a
// zombie is stopped; its parent reaps it, slowly on these hosts).
func stopped(pid, tries int) bool {
	for i := 0; i < tries; i++ {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || strings.Contains(string(stat), ") Z ") {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// removeContainers kills and deletes every container in CRI's namespace.
func removeContainers(ctx context.Context, sock string) (int, error) {
	if _, err := os.Stat(sock); err != nil {
		return 0, nil // no runtime: nothing to remove
	}
	c, err := containerd.New(sock, containerd.WithDefaultNamespace(criNamespace), containerd.WithTimeout(10*time.Second))
	if err != nil {
		return 0, fmt.Errorf("connecting to containerd: %w", err)
	}
	defer c.Close()
	containers, err := c.Containers(ctx)
	if err != nil {
		return 0, fmt.Errorf("listing containers: %w", err)
	}
	var errs []error
	for _, ctr := range containers {
		var taskErr error
		if task, err := ctr.Task(ctx, nil); err == nil {
			task.Kill(ctx, syscall.SIGKILL)
			if ch, err := task.Wait(ctx); err == nil {
				select {
				case <-ch:
				case <-time.After(10 * time.Second):
				}
			}
			if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
				taskErr = fmt.Errorf("deleting task %s: %w", ctr.ID(), err)
			}
		}
		// kubelet, still winding down, may have deleted it first. A task
		// error matters only if the container then cannot go (its shim
		// may have died with the task, closing the connection).
		if err := ctr.Delete(ctx, containerd.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting container %s: %w", ctr.ID(), errors.Join(err, taskErr)))
		}
	}
	return len(containers), errors.Join(errs...)
}

// unmountUnder lazily unmounts every mount below dir, deepest first,
// including dir mounted onto itself.
func unmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 {
			p := unescapeMount(f[1])
			if p == dir || strings.HasPrefix(p, dir+"/") {
				points = append(points, p)
			}
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	var errs []error
	for _, p := range points {
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMount decodes the octal escapes /proc/self/mounts uses.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeKubepodsCgroups removes the kubepods hierarchy kubelet leaves in
// every cgroup controller below root, children first.
func removeKubepodsCgroups(root string) error {
	roots, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup/*", root, "kubepods*"))
	more, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", root, "kubepods*"))
	var dirs []string
	for _, r := range append(roots, more...) {
		filepath.WalkDir(r, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
	var errs []error
	for _, d := range dirs {
		if err := syscall.Rmdir(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}
