package render_test

import (
	"bytes"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
)

// TestInputsDigestFollowsWhatEachComponentReads: replacing one certificate
// or kubeconfig changes the manifest of exactly the components that read
// it, so kubelet restarts exactly those; the kubelet's own kubeconfig
// changes no manifest.
func TestInputsDigestFollowsWhatEachComponentReads(t *testing.T) {
	c := clustertest.New(t, `
name = "inputs"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
`)
	before := c.Files(t, "cp1")
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(before[render.ManifestsDir+"/kube-apiserver.yaml"].Data, &pod); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"/etc/kubernetes/pki/apiserver.crt", "/etc/kubernetes/pki/apiserver-etcd-client.key", "/etc/kubernetes/pki/sa.pub", "/etc/kubernetes/pki/front-proxy-client.crt"} {
		if !slices.Contains(render.PodInputs(&pod), want) {
			t.Errorf("kube-apiserver's inputs %q lack %s", render.PodInputs(&pod), want)
		}
	}

	manifests := []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
	for _, tc := range []struct {
		leaf    string
		changes []string
	}{
		{"apiserver", []string{"kube-apiserver"}},
		{"apiserver-etcd-client", []string{"kube-apiserver"}},
		{"etcd/server", []string{"etcd"}},
		{"etcd/peer", []string{"etcd"}},
		{"kubeconfig/controller-manager.conf", []string{"kube-controller-manager"}},
		{"kubeconfig/scheduler.conf", []string{"kube-scheduler"}},
		{"kubeconfig/kubelet.conf", nil},
		{"kubeconfig/admin.conf", nil},
	} {
		t.Run(tc.leaf, func(t *testing.T) {
			old := c.Secrets.Leaves["cp1"][tc.leaf]
			defer func() { c.Secrets.Leaves["cp1"][tc.leaf] = old }()
			// The same certificate under a new key is enough to change
			// the file.
			key, err := pki.GenerateKey(pki.ECDSAP256)
			if err != nil {
				t.Fatal(err)
			}
			c.Secrets.Leaves["cp1"][tc.leaf] = pki.Pair{Cert: old.Cert, Key: key}
			after := c.Files(t, "cp1")
			for _, m := range manifests {
				p := render.ManifestsDir + "/" + m + ".yaml"
				if changed := !bytes.Equal(before[p].Data, after[p].Data); changed != slices.Contains(tc.changes, m) {
					t.Errorf("%s changed: %v", m, changed)
				}
			}
		})
	}
}
