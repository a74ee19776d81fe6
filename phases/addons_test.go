package phases_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/phases"
)

// TestAddonsDryRunOrder: kubeadm's CoreDNS and kube-proxy come first, then
// the config's extra manifests in the config's order (not their names',
// and with entry 100 after entry 99), so a user's override is applied last.
func TestAddonsDryRunOrder(t *testing.T) {
	dir := t.TempDir()
	var paths []string
	var want []string
	for i := range 101 {
		// Names that sort against the config's order.
		name := fmt.Sprintf("ns-%03d", 100-i)
		p := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(p, []byte("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: "+name+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, fmt.Sprintf("%q", p))
		want = append(want, "would apply Namespace "+name)
	}
	c := clustertest.New(t, cfg+"[addons]\nmanifests = ["+strings.Join(paths, ", ")+"]\n")
	path, digest := c.Bundle(t, "cp1", nil, nil)
	var out bytes.Buffer
	o := phases.Options{Bundle: path, ManifestDigest: digest, Root: t.TempDir(), Node: "cp1", Only: "addons", DryRun: true, Out: &out}
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	var got []string
	for _, l := range strings.Split(out.String(), "\n") {
		if l, ok := strings.CutPrefix(l, "  would apply "); ok {
			got = append(got, "would apply "+l)
		}
	}
	kubeadm := []string{
		"would apply ServiceAccount kube-system/coredns",
		"would apply ClusterRole system:coredns",
		"would apply ClusterRoleBinding system:coredns",
		"would apply ConfigMap kube-system/coredns",
		"would apply Deployment kube-system/coredns",
		"would apply Service kube-system/kube-dns",
		"would apply ServiceAccount kube-system/kube-proxy",
		"would apply ClusterRoleBinding kubeadm:node-proxier",
		"would apply Role kube-system/kube-proxy",
		"would apply RoleBinding kube-system/kube-proxy",
		"would apply ConfigMap kube-system/kube-proxy",
		"would apply DaemonSet kube-system/kube-proxy",
	}
	if want := append(kubeadm, want...); !slices.Equal(got, want) {
		t.Errorf("dry-run order:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
