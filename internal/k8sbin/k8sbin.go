// Package k8sbin builds and finds the real Kubernetes and etcd binaries of
// the pinned release, and the Kubernetes binaries of the previous minor
// (what an upgrade starts from), which the tests run. They are built from the
// Go module proxy through the scratch modules under hack/k8sbin and cached
// outside the repository, keyed by version, with a SHA256SUMS file checked on
// every build.
package k8sbin

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

// EtcdVersion is the etcd release built for the tests. kubeadm asks for
// image tag 3.7.0-0; v3.7.3 is that line's current patch release.
// ContainerdVersion is the runtime the image tests import into (module
// versions in hack/k8sbin/containerd/go.mod).
const (
	EtcdVersion       = "v3.7.3"
	ContainerdVersion = "v2.4.2"
)

// PreviousKubernetesVersion is the release of the previous minor the
// upgrade tests start from (hack/k8sbin/k8s-v1.36/go.mod). Only the
// Kubernetes binaries are built for it: kubeadm v1.37.2 pins the same etcd
// (3.7.0-0) for 1.36 as for 1.37, and the runtime and CNI plugins do not
// depend on the Kubernetes version, so PathFor serves those from the pinned
// set.
const PreviousKubernetesVersion = "v1.36.3"

// KubernetesVersions are the releases whose binaries Ensure builds, the
// pinned one first.
func KubernetesVersions() []string {
	return []string{render.KubernetesVersion, PreviousKubernetesVersion}
}

// Binary is one program to build: its module directory under hack/k8sbin
// and its package path.
type Binary struct {
	Name    string
	Module  string
	Package string
}

// Binaries lists every binary the tests use of the pinned release.
func Binaries() []Binary {
	return append(kubernetesBinaries("k8s"),
		Binary{"etcd", "etcd", "go.etcd.io/etcd/server/v3"},
		Binary{"etcdctl", "etcd", "go.etcd.io/etcd/etcdctl/v3"},
		Binary{"containerd", "containerd", "github.com/containerd/containerd/v2/cmd/containerd"},
		Binary{"containerd-shim-runc-v2", "containerd", "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"},
		Binary{"ctr", "containerd", "github.com/containerd/containerd/v2/cmd/ctr"},
		Binary{"bridge", "containerd", "github.com/containernetworking/plugins/plugins/main/bridge"},
		Binary{"host-local", "containerd", "github.com/containernetworking/plugins/plugins/ipam/host-local"},
		Binary{"loopback", "containerd", "github.com/containernetworking/plugins/plugins/main/loopback"},
		Binary{"portmap", "containerd", "github.com/containernetworking/plugins/plugins/meta/portmap"},
		Binary{"coredns", "coredns", "github.com/coredns/coredns"},
	)
}

// kubernetesBinaries are the k8s.io/kubernetes commands, built in module.
func kubernetesBinaries(module string) []Binary {
	var out []Binary
	for _, name := range []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubeadm", "kubectl"} {
		out = append(out, Binary{name, module, "k8s.io/kubernetes/cmd/" + name})
	}
	return out
}

// binariesFor lists what is built for version: everything for the pinned
// release, the Kubernetes commands for the previous one.
func binariesFor(version string) ([]Binary, error) {
	switch version {
	case render.KubernetesVersion:
		return Binaries(), nil
	case PreviousKubernetesVersion:
		return kubernetesBinaries("k8s-v1.36"), nil
	}
	return nil, fmt.Errorf("no binaries of Kubernetes %s: the tests use %s", version, strings.Join(KubernetesVersions(), " and "))
}

// Dir is where the binaries of the pinned release live: $AIRADM_CACHE, or
// airadm/ under the user cache directory, then k8sbin/<version>.
func Dir() (string, error) {
	return DirFor(render.KubernetesVersion)
}

// DirFor is where the binaries of version live.
func DirFor(version string) (string, error) {
	if _, err := binariesFor(version); err != nil {
		return "", err
	}
	base := os.Getenv("AIRADM_CACHE")
	if base == "" {
		c, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("locating cache: %w", err)
		}
		base = filepath.Join(c, "airadm")
	}
	if version != render.KubernetesVersion {
		return filepath.Join(base, "k8sbin", version), nil
	}
	return filepath.Join(base, "k8sbin", render.KubernetesVersion+"-etcd"+EtcdVersion+"-containerd"+ContainerdVersion), nil
}

// BuildHint tells a person how to get the binaries.
const BuildHint = "build them with `go run ./hack/k8sbin` from the repository root (about 10 minutes on 2 cores the first time for each Kubernetes version, seconds after), or run the README's test command, which does it"

// Path returns the cached binary name of the pinned release, or an error
// saying how to build it.
func Path(name string) (string, error) {
	return PathFor(render.KubernetesVersion, name)
}

// PathFor returns the cached binary name of Kubernetes version. A binary
// that is not built per version (etcd, containerd, the CNI plugins, coredns)
// is the pinned release's.
func PathFor(version, name string) (string, error) {
	bins, err := binariesFor(version)
	if err != nil {
		return "", err
	}
	if !slices.ContainsFunc(bins, func(b Binary) bool { return b.Name == name }) {
		if version == render.KubernetesVersion {
			return "", fmt.Errorf("k8sbin builds no binary named %s", name)
		}
		return PathFor(render.KubernetesVersion, name)
	}
	dir, err := DirFor(version)
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s %s is not built at %s: %s", name, version, p, BuildHint)
	}
	return p, nil
}

// ldflags stamp the version the way upstream release builds do; without
// them the binaries report v0.0.0-master and version-skew checks misfire.
func ldflags(v string) string {
	major, minor, _ := strings.Cut(strings.TrimPrefix(v, "v"), ".")
	minor, _, _ = strings.Cut(minor, ".")
	flags := []string{"-s", "-w"}
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		flags = append(flags,
			"-X", pkg+".gitVersion="+v,
			"-X", pkg+".gitMajor="+major,
			"-X", pkg+".gitMinor="+minor,
			"-X", pkg+".gitTreeState=clean")
	}
	return strings.Join(flags, " ")
}

// Ensure makes every binary of every version in KubernetesVersions present
// and intact, building what is missing or whose hash does not match its
// directory's SHA256SUMS. repo is the repository root; log gets progress
// lines. It returns the pinned release's directory.
func Ensure(ctx context.Context, repo string, log io.Writer) (string, error) {
	var pinned string
	for _, v := range KubernetesVersions() {
		dir, err := ensure(ctx, repo, v, log)
		if err != nil {
			return "", err
		}
		if v == render.KubernetesVersion {
			pinned = dir
		}
	}
	return pinned, nil
}

func ensure(ctx context.Context, repo, version string, log io.Writer) (string, error) {
	bins, err := binariesFor(version)
	if err != nil {
		return "", err
	}
	dir, err := DirFor(version)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating %s: %w", dir, err)
	}
	sums, err := trust.ReadSums(filepath.Join(dir, trust.SumsFile))
	if errors.Is(err, fs.ErrNotExist) {
		sums = trust.Sums{}
	} else if err != nil {
		return "", err
	}
	missing := map[string][]Binary{}
	for _, b := range bins {
		got, err := fileSHA256(filepath.Join(dir, b.Name))
		if err == nil && got == sums[b.Name].File {
			continue
		}
		if err == nil {
			fmt.Fprintf(log, "k8sbin: %s does not match SHA256SUMS; rebuilding\n", b.Name)
		}
		missing[b.Module] = append(missing[b.Module], b)
	}
	if len(missing) == 0 {
		return dir, nil
	}
	modules := make([]string, 0, len(missing))
	for m := range missing {
		modules = append(modules, m)
	}
	sort.Strings(modules)
	for _, m := range modules {
		if err := build(ctx, filepath.Join(repo, "hack", "k8sbin", m), dir, version, missing[m], sums, log); err != nil {
			return "", err
		}
	}
	return dir, nil
}

func build(ctx context.Context, moduleDir, dir, version string, bins []Binary, sums trust.Sums, log io.Writer) error {
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return fmt.Errorf("building binaries: %w", err)
	}
	defer os.RemoveAll(tmp)
	args := []string{"build", "-mod=readonly", "-trimpath", "-tags", "selinux,notest,grpcnotrace", "-ldflags", ldflags(version), "-o", tmp + "/"}
	var names []string
	for _, b := range bins {
		args = append(args, b.Package)
		names = append(names, b.Name)
	}
	fmt.Fprintf(log, "k8sbin: building %s into %s\n", strings.Join(names, ", "), dir)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = moduleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=readonly")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("building %s in %s: %w", strings.Join(names, ", "), moduleDir, err)
	}
	for _, b := range bins {
		built := filepath.Join(tmp, b.Name)
		if b.Module == "etcd" {
			// go build names a binary after the last path element that is
			// not a major-version suffix: server/v3 -> server.
			built = filepath.Join(tmp, strings.Split(strings.TrimPrefix(b.Package, "go.etcd.io/etcd/"), "/")[0])
		}
		sum, err := fileSHA256(built)
		if err != nil {
			return fmt.Errorf("building %s: %w", b.Name, err)
		}
		if err := os.Rename(built, filepath.Join(dir, b.Name)); err != nil {
			return fmt.Errorf("installing %s: %w", b.Name, err)
		}
		sums[b.Name] = trust.Sum{File: sum}
	}
	return sums.Write(filepath.Join(dir, trust.SumsFile))
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hashing %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
