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
	scratch := read("hack/k8sbin/k8s/go.mod")
	if !regexp.MustCompile(`(?m)^\s*k8s\.io/kubernetes ` + regexp.QuoteMeta(render.KubernetesVersion) + `\b`).MatchString(scratch) {
		t.Errorf("hack/k8sbin/k8s/go.mod does not require k8s.io/kubernetes %s", render.KubernetesVersion)
	}
	replaces := regexp.MustCompile(`(?m)^\s*(k8s\.io/\S+) => (\S+) (\S+)$`).FindAllStringSubmatch(scratch, -1)
	if len(replaces) != 33 {
		t.Errorf("hack/k8sbin/k8s/go.mod has %d staging replaces, want 33", len(replaces))
	}
	for _, r := range replaces {
		if r[1] != r[2] || r[3] != staging {
			t.Errorf("hack/k8sbin/k8s/go.mod: %s => %s %s, want %s", r[1], r[2], r[3], staging)
		}
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
	f := ldflags()
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
