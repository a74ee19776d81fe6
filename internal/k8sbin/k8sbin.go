// Package k8sbin builds and finds the real Kubernetes and etcd binaries of
// the pinned release, which the tests run. They are built from the Go module
// proxy through the scratch modules under hack/k8sbin and cached outside the
// repository, keyed by version, with a SHA256SUMS file checked on every build.
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

// Binary is one program to build: its module directory under hack/k8sbin
// and its package path.
type Binary struct {
	Name    string
	Module  string
	Package string
}

// Binaries lists every binary the tests use.
func Binaries() []Binary {
	k := func(name string) Binary { return Binary{name, "k8s", "k8s.io/kubernetes/cmd/" + name} }
	return []Binary{
		k("kube-apiserver"), k("kube-controller-manager"), k("kube-scheduler"),
		k("kubelet"), k("kube-proxy"), k("kubeadm"), k("kubectl"),
		{"etcd", "etcd", "go.etcd.io/etcd/server/v3"},
		{"etcdctl", "etcd", "go.etcd.io/etcd/etcdctl/v3"},
		{"containerd", "containerd", "github.com/containerd/containerd/v2/cmd/containerd"},
		{"containerd-shim-runc-v2", "containerd", "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"},
		{"ctr", "containerd", "github.com/containerd/containerd/v2/cmd/ctr"},
		{"bridge", "containerd", "github.com/containernetworking/plugins/plugins/main/bridge"},
		{"host-local", "containerd", "github.com/containernetworking/plugins/plugins/ipam/host-local"},
		{"loopback", "containerd", "github.com/containernetworking/plugins/plugins/main/loopback"},
		{"portmap", "containerd", "github.com/containernetworking/plugins/plugins/meta/portmap"},
		{"coredns", "coredns", "github.com/coredns/coredns"},
	}
}

// Dir is where the binaries of the pinned release live: $AIRADM_CACHE, or
// airadm/ under the user cache directory, then k8sbin/<version>.
func Dir() (string, error) {
	base := os.Getenv("AIRADM_CACHE")
	if base == "" {
		c, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("locating cache: %w", err)
		}
		base = filepath.Join(c, "airadm")
	}
	return filepath.Join(base, "k8sbin", render.KubernetesVersion+"-etcd"+EtcdVersion+"-containerd"+ContainerdVersion), nil
}

// BuildHint tells a person how to get the binaries.
const BuildHint = "build them with `go run ./hack/k8sbin` from the repository root (about 10 minutes on 2 cores the first time, seconds after), or run the README's test command, which does it"

// Path returns the cached binary name, or an error saying how to build it.
func Path(name string) (string, error) {
	dir, err := Dir()
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s %s is not built at %s: %s", name, render.KubernetesVersion, p, BuildHint)
	}
	return p, nil
}

// ldflags stamp the version the way upstream release builds do; without
// them the binaries report v0.0.0-master and version-skew checks misfire.
func ldflags() string {
	v := render.KubernetesVersion
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

// Ensure makes every binary present and intact in Dir, building what is
// missing or whose hash does not match SHA256SUMS. repo is the repository
// root; log gets progress lines.
func Ensure(ctx context.Context, repo string, log io.Writer) (string, error) {
	dir, err := Dir()
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
	for _, b := range Binaries() {
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
		if err := build(ctx, filepath.Join(repo, "hack", "k8sbin", m), dir, missing[m], sums, log); err != nil {
			return "", err
		}
	}
	return dir, nil
}

func build(ctx context.Context, moduleDir, dir string, bins []Binary, sums trust.Sums, log io.Writer) error {
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return fmt.Errorf("building binaries: %w", err)
	}
	defer os.RemoveAll(tmp)
	args := []string{"build", "-mod=readonly", "-trimpath", "-tags", "selinux,notest,grpcnotrace", "-ldflags", ldflags(), "-o", tmp + "/"}
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
