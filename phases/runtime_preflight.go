package phases

import (
	"fmt"
	"os"
	"path"
	"strings"

	"airadm.dev/airadm/render"
)

// checkKernel reports the kernel prerequisites as they are now. A sysctl
// that is off is a failure only when the runtime phase will not set it.
func checkKernel(r *Run, _ map[string][]byte) ([]string, error) {
	var failed []string
	for _, k := range r.kernel(false) {
		r.logf("    kernel: %s", k)
		if k.problem {
			failed = append(failed, k.name+": "+k.state)
		}
	}
	if len(failed) > 0 {
		return nil, fmt.Errorf("%s", strings.Join(failed, "; "))
	}
	return nil, nil
}

// nodeBinaries are what a node runs, by name, with the host directories
// they are looked for in when the bundle does not carry them.
var nodeBinaries = []struct {
	name string
	dirs []string
}{
	{"containerd", []string{"/usr/local/bin", "/usr/bin", "/usr/local/sbin", "/usr/sbin"}},
	{"containerd-shim-runc-v2", []string{"/usr/local/bin", "/usr/bin", "/usr/local/sbin", "/usr/sbin"}},
	{"runc", []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}},
	{"kubelet", []string{"/usr/bin", "/usr/local/bin"}},
	{"bridge", []string{render.CNIBinDir}},
	{"host-local", []string{render.CNIBinDir}},
	{"loopback", []string{render.CNIBinDir}},
	{"portmap", []string{render.CNIBinDir}},
}

// checkBinaries says which of the node's binaries come from the bundle and
// which from the host. A bundle without containerd means the host's
// runtime is used, as the containerd check then verifies; a missing CNI
// plugin is a warning (a CNI addon may install its own).
func checkBinaries(r *Run, _ map[string][]byte) ([]string, error) {
	var warnings []string
	for _, b := range nodeBinaries {
		where := ""
		for _, d := range b.dirs {
			if p := path.Join(d, b.name); r.manifestHas(p) {
				where = "from the bundle (" + p + ")"
				break
			}
		}
		if where == "" && b.name == "kubelet" && r.KubeletBinary != "" {
			where = "from the host (" + r.KubeletBinary + ", --kubelet-binary)"
		}
		for _, d := range b.dirs {
			if where != "" {
				break
			}
			if info, err := os.Stat(r.path(path.Join(d, b.name))); err == nil && info.Mode().IsRegular() {
				where = "from the host (" + path.Join(d, b.name) + ")"
			}
		}
		if where == "" {
			where = "missing"
			warnings = append(warnings, fmt.Sprintf("%s is neither in the bundle nor on the host (%s)", b.name, strings.Join(b.dirs, ", ")))
		}
		r.logf("    %s: %s", b.name, where)
	}
	if r.bundledContainerd() == "" {
		sock, err := r.criSocket(r.files)
		if err != nil {
			return warnings, err
		}
		r.logf("    the bundle carries no container runtime: the host's containerd at %s is used", sock)
	}
	return warnings, nil
}
