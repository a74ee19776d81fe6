package phases

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"

	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
)

// Check is one preflight check: a name to ignore it by, and a result.
type Check struct {
	Name string
	Run  func(r *Run, files map[string][]byte) (warnings []string, err error)
}

// Checks lists the preflight checks, gathered all at once like kubeadm's.
func Checks() []Check {
	return []Check{
		{"root", checkRoot},
		{"node", checkNode},
		{"clock", checkClock},
		{"cluster", func(r *Run, files map[string][]byte) ([]string, error) { return nil, r.sameCluster(files) }},
		{"ports", checkPorts},
		{"endpoint", checkEndpoint},
		{"swap", checkSwap},
		{"hosts", checkHosts},
		{"kernel", checkKernel},
		{"binaries", checkBinaries},
		{"sandbox-image", checkSandboxImage},
		{"containerd", checkContainerd},
	}
}

func runPreflight(ctx context.Context, r *Run) error {
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	ignore := func(name string) bool {
		return slices.Contains(r.IgnorePreflight, name) || slices.Contains(r.IgnorePreflight, "all")
	}
	var failed []string
	for _, c := range Checks() {
		warnings, err := c.Run(r, files)
		for _, w := range warnings {
			r.logf("  warning: %s: %s", c.Name, w)
		}
		var skip skipped
		switch {
		case errors.As(err, &skip):
			r.logf("  skipped: %s (%s)", c.Name, string(skip))
		case err != nil && ignore(c.Name):
			r.logf("  ignored: %s: %v", c.Name, err)
		case err != nil:
			r.logf("  failed: %s: %v", c.Name, err)
			failed = append(failed, fmt.Sprintf("%s: %v", c.Name, err))
		default:
			r.logf("  ok: %s", c.Name)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d checks failed (ignore one with --ignore-preflight-errors=NAME): %s", len(failed), strings.Join(failed, "; "))
	}
	if r.upgrade != nil {
		return r.upgradePreflight(ctx)
	}
	return nil
}

// skipped is what a check returns when it did not run, with why: the
// output must not claim a check it did not make.
type skipped string

func (s skipped) Error() string { return "skipped: " + string(s) }

func checkRoot(r *Run, _ map[string][]byte) ([]string, error) {
	if r.Root == "/" && os.Geteuid() != 0 {
		return nil, fmt.Errorf("apply writes /etc/kubernetes and must run as root")
	}
	return nil, nil
}

func checkNode(r *Run, _ map[string][]byte) ([]string, error) {
	if r.Node != "" {
		if r.Node != r.Manifest.Node {
			return nil, fmt.Errorf("the bundle is for node %s, not %s", r.Manifest.Node, r.Node)
		}
		return nil, nil
	}
	host, err := os.Hostname()
	if err != nil {
		return nil, fmt.Errorf("reading host name: %w", err)
	}
	if short, _, _ := strings.Cut(host, "."); short != r.Manifest.Node {
		return nil, fmt.Errorf("the bundle is for node %s but this host is %s; pass --node %s if this is the right host", r.Manifest.Node, host, r.Manifest.Node)
	}
	return nil, nil
}

// checkClock catches a host whose clock is behind the certificates: TLS
// would fail in confusing ways until it catches up.
func checkClock(r *Run, files map[string][]byte) ([]string, error) {
	b, ok := files[render.PKIDir+"/ca.crt"]
	if !ok {
		return nil, fmt.Errorf("the bundle has no %s/ca.crt", render.PKIDir)
	}
	ca, err := pki.ParseCert(b)
	if err != nil {
		return nil, err
	}
	now := r.Now()
	if now.Before(ca.NotBefore) {
		return nil, fmt.Errorf("the clock reads %s, before the cluster CA's NotBefore %s; set the time (NTP) first", now.UTC().Format("2006-01-02T15:04:05Z"), ca.NotBefore.Format("2006-01-02T15:04:05Z"))
	}
	if now.After(ca.NotAfter) {
		return nil, fmt.Errorf("the cluster CA expired at %s", ca.NotAfter.Format("2006-01-02T15:04:05Z"))
	}
	return nil, nil
}

func checkPorts(r *Run, _ map[string][]byte) ([]string, error) {
	if r.upgrade != nil {
		return nil, skipped("an upgrade: the node's running components hold them")
	}
	ports := []int{10250}
	if r.Manifest.Role == string(render.ControlPlane) {
		ports = append(ports, 6443, 2379, 2380, 2381, 10257, 10259)
	}
	var busy []string
	for _, p := range ports {
		l, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err != nil {
			busy = append(busy, strconv.Itoa(p))
			continue
		}
		l.Close()
	}
	if len(busy) > 0 {
		return nil, fmt.Errorf("ports %s are in use", strings.Join(busy, ", "))
	}
	return nil, nil
}

// checkHosts catches a host without /etc/hosts (a minimal image, say):
// containerd copies it into every pod sandbox and fails the sandbox, so
// the node would join and be Ready but start no pod. It is the hosts file
// of the mount namespace airadm runs in, which is containerd's, whatever
// --root is.
func checkHosts(_ *Run, _ map[string][]byte) ([]string, error) {
	fi, err := os.Stat("/etc/hosts")
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, errors.New("/etc/hosts is missing: containerd copies it into every pod sandbox, so no pod could start on this node; create it (at least \"127.0.0.1 localhost\")")
	case err != nil:
		return nil, fmt.Errorf("checking /etc/hosts: %w", err)
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("/etc/hosts is a %s, not a file: containerd copies it into every pod sandbox", fi.Mode().Type())
	}
	return nil, nil
}

func checkSwap(_ *Run, _ map[string][]byte) ([]string, error) {
	b, err := os.ReadFile("/proc/swaps")
	if err != nil {
		return nil, nil
	}
	if lines := strings.Split(strings.TrimSpace(string(b)), "\n"); len(lines) > 1 {
		return nil, fmt.Errorf("swap is on and kubelet refuses it by default (failSwapOn); turn it off with swapoff -a")
	}
	return nil, nil
}

// checkSandboxImage: an air-gapped containerd cannot pull, so the pause
// image its config names must be one the bundle carries, or no pod starts.
func checkSandboxImage(r *Run, _ map[string][]byte) ([]string, error) {
	want, from, err := r.sandboxImage()
	if err != nil {
		return nil, err
	}
	var pauses []string
	for _, im := range r.Manifest.Images {
		if im.Ref == want {
			return nil, nil
		}
		if strings.Contains(im.Ref, "/pause:") {
			pauses = append(pauses, im.Ref)
		}
	}
	if len(pauses) == 0 {
		return nil, fmt.Errorf("the bundle carries no pause image, and containerd needs %s (%s) for every pod sandbox", want, from)
	}
	return nil, fmt.Errorf("containerd will use %s (%s) for pod sandboxes but the bundle carries %s; set pinned_images.sandbox in containerd's config to it", want, from, strings.Join(pauses, ", "))
}

// containerdDefaultSandbox is containerd 2.4's built-in pinned sandbox.
const containerdDefaultSandbox = "registry.k8s.io/pause:3.10.2"

// sandboxImage reads the pod sandbox image from containerd's config file:
// pinned_images.sandbox (containerd 2) or sandbox_image (containerd 1.x),
// else containerd's default.
func (r *Run) sandboxImage() (image, from string, err error) {
	if b, ok := r.files[render.BundledContainerdConfig]; ok && r.bundledContainerd() != "" && r.ContainerdConfig == "" {
		// The runtime phase installs this config.
		return sandboxFrom(b, "the bundle's containerd config")
	}
	path := r.ContainerdConfig
	if path == "" {
		path = r.path("/etc/containerd/config.toml")
	}
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) && r.ContainerdConfig == "" {
		return containerdDefaultSandbox, "containerd's default; no " + path, nil
	}
	if err != nil {
		return "", "", fmt.Errorf("reading containerd's config: %w", err)
	}
	return sandboxFrom(b, path)
}

// sandboxFrom reads the sandbox image of containerd's config b.
func sandboxFrom(b []byte, path string) (image, from string, err error) {
	var cfg map[string]any
	if _, err := toml.Decode(string(b), &cfg); err != nil {
		return "", "", fmt.Errorf("reading containerd's config %s: %w", path, err)
	}
	plugins, _ := cfg["plugins"].(map[string]any)
	if images, ok := plugins["io.containerd.cri.v1.images"].(map[string]any); ok {
		if pinned, ok := images["pinned_images"].(map[string]any); ok {
			if s, ok := pinned["sandbox"].(string); ok && s != "" {
				return s, path, nil
			}
		}
	}
	if cri, ok := plugins["io.containerd.grpc.v1.cri"].(map[string]any); ok {
		if s, ok := cri["sandbox_image"].(string); ok && s != "" {
			return s, path, nil
		}
	}
	return containerdDefaultSandbox, "containerd's default", nil
}

// checkContainerd: the images phase needs the runtime answering.
func checkContainerd(r *Run, files map[string][]byte) ([]string, error) {
	if !r.planned("images") {
		return nil, skipped("the images phase does not run")
	}
	if r.bundledContainerd() != "" && r.planned("runtime") {
		return nil, skipped("the bundle carries containerd; the runtime phase starts it")
	}
	if r.DryRun {
		// Connecting changes nothing, but a dry run may be made on a
		// machine other than the node; say the check was not made.
		return nil, skipped("dry run")
	}
	c, err := r.containerd(context.Background(), files)
	if err != nil {
		return nil, err
	}
	return nil, c.Close()
}
