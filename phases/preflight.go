package phases

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"

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
		{"swap", checkSwap},
		{"sandbox-image", checkSandboxImage},
		{"containerd", checkContainerd},
	}
}

func runPreflight(_ context.Context, r *Run) error {
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
		switch {
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
	return nil
}

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

// checkSandboxImage: without the pause image in the bundle, an air-gapped
// containerd cannot start any pod.
func checkSandboxImage(r *Run, _ map[string][]byte) ([]string, error) {
	for _, im := range r.Manifest.Images {
		if strings.Contains(im.Ref, "/pause:") {
			return nil, nil
		}
	}
	return nil, fmt.Errorf("the bundle carries no pause image, which containerd needs for every pod sandbox")
}

// checkContainerd: the images phase needs the runtime answering.
func checkContainerd(r *Run, files map[string][]byte) ([]string, error) {
	if !r.planned("images") || r.DryRun {
		return nil, nil
	}
	c, err := r.containerd(context.Background(), files)
	if err != nil {
		return nil, err
	}
	return nil, c.Close()
}
