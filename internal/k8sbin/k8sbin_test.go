package k8sbin

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"airadm.dev/airadm/render"
)

// TestPinnedVersionsAgree keeps the one pin, render.KubernetesVersion, and
// the go.mod files that must follow it in step.
func TestPinnedVersionsAgree(t *testing.T) {
	staging := "v0" + strings.TrimPrefix(render.KubernetesVersion, "v1") // v1.37.2 -> v0.37.2
	read := func(p string) string {
		b, err := os.ReadFile(filepath.Join("..", "..", p))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	for _, m := range []struct{ path, version string }{
		{"hack/k8sbin/k8s/go.mod", render.KubernetesVersion},
		{"hack/k8sbin/k8s-v1.36/go.mod", PreviousKubernetesVersion},
	} {
		scratch := read(m.path)
		if !regexp.MustCompile(`(?m)^\s*k8s\.io/kubernetes ` + regexp.QuoteMeta(m.version) + `\b`).MatchString(scratch) {
			t.Errorf("%s does not require k8s.io/kubernetes %s", m.path, m.version)
		}
		replaces := regexp.MustCompile(`(?m)^\s*(k8s\.io/\S+) => (\S+) (\S+)$`).FindAllStringSubmatch(scratch, -1)
		if len(replaces) != 33 {
			t.Errorf("%s has %d staging replaces, want 33", m.path, len(replaces))
		}
		for _, r := range replaces {
			if want := "v0" + strings.TrimPrefix(m.version, "v1"); r[1] != r[2] || r[3] != want {
				t.Errorf("%s: %s => %s %s, want %s", m.path, r[1], r[2], r[3], want)
			}
		}
	}
	// The previous release is the one an upgrade starts from: render must
	// know it, and it must be one minor older.
	prev, ok1 := render.ReleaseOf(PreviousKubernetesVersion)
	pinned, ok2 := render.ReleaseOf(render.KubernetesVersion)
	if !ok1 || !ok2 || prev.Minor != pinned.Minor-1 {
		t.Errorf("PreviousKubernetesVersion %s is not the minor before %s in render.Releases", PreviousKubernetesVersion, render.KubernetesVersion)
	}
	for _, m := range regexp.MustCompile(`(?m)^\s*(k8s\.io/(?:api|apimachinery|client-go|cluster-bootstrap|kubelet|kube-proxy)) (\S+)`).FindAllStringSubmatch(read("go.mod"), -1) {
		if m[2] != staging {
			t.Errorf("go.mod: %s %s, want %s", m[1], m[2], staging)
		}
	}
	if !strings.Contains(read("hack/k8sbin/containerd/go.mod"), "github.com/containerd/containerd/v2 "+ContainerdVersion) {
		t.Errorf("hack/k8sbin/containerd/go.mod is not at containerd %s", ContainerdVersion)
	}
	if !strings.Contains(read("hack/k8sbin/etcd/go.mod"), "go.etcd.io/etcd/server/v3 "+EtcdVersion) {
		t.Errorf("hack/k8sbin/etcd/go.mod is not at etcd %s", EtcdVersion)
	}
}

func TestLdflagsStampVersion(t *testing.T) {
	f := ldflags(render.KubernetesVersion)
	for _, want := range []string{
		"k8s.io/component-base/version.gitVersion=" + render.KubernetesVersion,
		"k8s.io/client-go/pkg/version.gitMinor=37",
		"k8s.io/component-base/version.gitMajor=1",
		"gitTreeState=clean",
	} {
		if !strings.Contains(f, want) {
			t.Errorf("ldflags lack %s: %s", want, f)
		}
	}
}

// TestPathFor: the previous release has its own Kubernetes binaries and
// shares the pinned release's etcd and runtime; other versions are refused.
func TestPathFor(t *testing.T) {
	cache := t.TempDir()
	t.Setenv("AIRADM_CACHE", cache)
	pinned, _ := DirFor(render.KubernetesVersion)
	prev, _ := DirFor(PreviousKubernetesVersion)
	for _, f := range []string{filepath.Join(pinned, "etcd"), filepath.Join(pinned, "kubelet"), filepath.Join(prev, "kubelet")} {
		os.MkdirAll(filepath.Dir(f), 0o755)
		os.WriteFile(f, nil, 0o755)
	}
	for _, c := range []struct{ version, name, want string }{
		{render.KubernetesVersion, "kubelet", filepath.Join(pinned, "kubelet")},
		{PreviousKubernetesVersion, "kubelet", filepath.Join(prev, "kubelet")},
		{PreviousKubernetesVersion, "etcd", filepath.Join(pinned, "etcd")},
	} {
		if got, err := PathFor(c.version, c.name); err != nil || got != c.want {
			t.Errorf("PathFor(%s, %s) = %q, %v; want %q", c.version, c.name, got, err, c.want)
		}
	}
	if _, err := PathFor(PreviousKubernetesVersion, "kubeadm"); err == nil || !strings.Contains(err.Error(), "go run ./hack/k8sbin") {
		t.Errorf("a missing binary: %v, want the build hint", err)
	}
	if _, err := PathFor("v1.35.0", "kubelet"); err == nil {
		t.Error("PathFor(v1.35.0) found a binary")
	}
}
