package controlplane_test

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	bootstrapapi "k8s.io/cluster-bootstrap/token/api"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/controlplane"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
)

// writeBundle writes node's bundle without images: containerd is not part
// of these tests.
func writeBundle(t *testing.T, c *clustertest.Cluster, node string) (string, string) {
	return c.Bundle(t, node, nil, nil)
}

func applyOpts(p *controlplane.Plane, node, path, digest string, log *bytes.Buffer) phases.Options {
	return phases.Options{
		Bundle: path, ManifestDigest: digest, Root: p.NodeRoot(node), Node: node, Out: log,
		// No images in these bundles; the harness owns the ports.
		IgnorePreflight: []string{"sandbox-image", "ports"},
		Timeout:         90 * time.Second,
	}
}

type fileState struct {
	mode    fs.FileMode
	data    string
	modTime time.Time
}

func tree(t *testing.T, root string) map[string]fileState {
	t.Helper()
	out := map[string]fileState{}
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, _ := d.Info()
		b, _ := os.ReadFile(p)
		out[strings.TrimPrefix(p, root)] = fileState{info.Mode(), string(b), info.ModTime()}
		return nil
	})
	return out
}

// TestApply brings up a control plane and a worker from their bundles with
// the phase runner, against the real binaries.
func TestApply(t *testing.T) {
	c := clustertest.New(t, `
name = "apply"
[pki]
algorithm = "ECDSA-P256"
[join]
token_ttl = "1h"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
[[nodes]]
name = "w1"
role = "worker"
address = "127.0.1.21"
[[nodes]]
name = "w2"
role = "worker"
address = "127.0.1.22"
`)
	ctx := context.Background()
	p := controlplane.New(t, c)
	cpBundle, cpDigest := writeBundle(t, c, "cp1")
	var log bytes.Buffer

	// preflight and files: the tree is exactly the rendered one.
	o := applyOpts(p, "cp1", cpBundle, cpDigest, &log)
	o.SkipPhases = []string{"images", "kubelet", "wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons"}
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	root := p.NodeRoot("cp1")
	for path, f := range c.Files(t, "cp1") {
		info, err := os.Stat(hostfs.Path(root, path))
		if err != nil {
			t.Fatalf("%s not written: %v", path, err)
		}
		b, _ := os.ReadFile(hostfs.Path(root, path))
		if info.Mode().Perm() != f.Mode || !bytes.Equal(b, f.Data) {
			t.Errorf("%s: mode %v, content equal %v", path, info.Mode(), bytes.Equal(b, f.Data))
		}
	}
	if info, _ := os.Stat(hostfs.Path(root, render.ManifestsDir)); info.Mode().Perm() != 0o700 {
		t.Errorf("manifests dir mode %v, want 0700", info.Mode())
	}
	if strings.Contains(log.String(), "PRIVATE KEY") || strings.Contains(log.String(), c.Secrets.Tokens["w1"].Secret) {
		t.Error("apply output shows a secret")
	}

	// A second apply changes nothing, mtimes included.
	before := tree(t, root)
	time.Sleep(10 * time.Millisecond)
	o.Only, o.SkipPhases = "files", nil
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatal(err)
	}
	after := tree(t, root)
	for path, st := range before {
		if strings.HasSuffix(path, "journal.json") {
			continue
		}
		if after[path] != st {
			t.Errorf("%s changed on the second apply", path)
		}
	}

	// A bundle of another cluster is refused and changes nothing.
	other := clustertest.New(t, `
name = "other"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
`)
	otherBundle, otherDigest := writeBundle(t, other, "cp1")
	oo := applyOpts(p, "cp1", otherBundle, otherDigest, &log)
	oo.Only = "files"
	if err := phases.Apply(ctx, oo); err == nil || !strings.Contains(err.Error(), "belongs to another cluster") && !strings.Contains(err.Error(), "holds node cp1 of cluster apply") {
		t.Fatalf("foreign bundle: %v", err)
	}
	for path, st := range before {
		if after := tree(t, root)[path]; after.data != st.data {
			t.Errorf("%s changed by a refused bundle", path)
		}
	}

	// Start the control plane from the applied files, then the API phases.
	p.Start()
	super, _ := p.Client("super-admin.conf")
	// The harness runs no kubelet on cp1; register its Node as kubelet would.
	if _, err := super.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "cp1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	o.Only, o.SkipPhases = "", []string{"preflight", "files", "images", "kubelet"}
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	// Again: every API step is idempotent.
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("second run of the API phases: %v", err)
	}
	j, err := phases.LoadJournal(root)
	if err != nil || j.ManifestDigest != cpDigest || len(j.Phases) != 7 {
		// preflight, files and the five API phases
		t.Errorf("journal = %+v, %v", j, err)
	}

	node, err := super.CoreV1().Nodes().Get(ctx, "cp1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := node.Labels[phases.ControlPlaneLabel]; !ok || len(node.Spec.Taints) != 1 || node.Spec.Taints[0].Effect != corev1.TaintEffectNoSchedule {
		t.Errorf("cp1 labels %v taints %v", node.Labels, node.Spec.Taints)
	}
	cm, err := super.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubeadm-config", metav1.GetOptions{})
	if err != nil || !strings.Contains(cm.Data["ClusterConfiguration"], "kind: ClusterConfiguration") {
		t.Errorf("kubeadm-config: %v %v", cm, err)
	}
	info, err := super.CoreV1().ConfigMaps("kube-public").Get(ctx, bootstrapapi.ConfigMapClusterInfo, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ci, err := clientcmd.Load([]byte(info.Data[bootstrapapi.KubeConfigKey])); err != nil || len(ci.AuthInfos) != 0 {
		t.Errorf("cluster-info kubeconfig: %v (it must carry no credential)", err)
	}

	if d, err := super.AppsV1().Deployments("kube-system").Get(ctx, "coredns", metav1.GetOptions{}); err != nil || d.Spec.Template.Spec.Containers[0].Image != c.CoreImages()[4].Ref {
		t.Errorf("coredns deployment: %v", err)
	}
	if ds, err := super.AppsV1().DaemonSets("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{}); err != nil || ds.ManagedFields[0].Manager != "airadm" {
		t.Errorf("kube-proxy daemonset: %v", err)
	}
	if svc, err := super.CoreV1().Services("kube-system").Get(ctx, "kube-dns", metav1.GetOptions{}); err != nil || svc.Spec.ClusterIP != "10.96.0.10" {
		t.Errorf("kube-dns service: %v %v", svc, err)
	}

	// The real kubeadm reads the tokens as its own.
	kubeadm, err := k8sbin.Path("kubeadm")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(kubeadm, "token", "list", "--kubeconfig", hostfs.Path(root, render.KubernetesDir+"/admin.conf")).CombinedOutput()
	if err != nil {
		t.Fatalf("kubeadm token list: %v\n%s", err, out)
	}
	for _, w := range []string{"w1", "w2"} {
		if !strings.Contains(string(out), c.Secrets.Tokens[w].ID+".") || !strings.Contains(string(out), "system:bootstrappers:kubeadm:default-node-token") {
			t.Errorf("kubeadm token list lacks %s's token:\n%s", w, out)
		}
	}

	t.Run("worker joins with its token alone", func(t *testing.T) {
		wBundle, wDigest := writeBundle(t, c, "w1")
		wo := applyOpts(p, "w1", wBundle, wDigest, &log)
		wo.SkipPhases = []string{"images", "kubelet", "tls-bootstrap"}
		if err := phases.Apply(ctx, wo); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		cert := kubeletBootstrap(t, p, "w1")
		// This kubelet has no runtime and stops before registering; do
		// what it would do next, with its own issued credential.
		cs := kubeletClientset(t, p, "w1")
		if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "w1"}}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("w1 cannot register itself with its issued certificate: %v", err)
		}
		wo.Only, wo.SkipPhases = "tls-bootstrap", nil
		if err := phases.Apply(ctx, wo); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		if _, err := os.Stat(hostfs.Path(p.NodeRoot("w1"), render.BootstrapKubeconfig)); !os.IsNotExist(err) {
			t.Errorf("bootstrap-kubelet.conf still there after tls-bootstrap: %v", err)
		}
		if cert.Subject.CommonName != "system:node:w1" {
			t.Errorf("issued %v", cert.Subject)
		}
	})

	t.Run("an expired token fails fast", func(t *testing.T) {
		// Expire w2's token where the cluster keeps it. (Re-applying the
		// bundle leaves a valid token alone, so it cannot do this.)
		s := phases.BootstrapTokenSecret(c.Secrets.Tokens["w2"], "w2", time.Now().Add(-time.Hour))
		live, err := super.CoreV1().Secrets(metav1.NamespaceSystem).Get(ctx, s.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.ResourceVersion = live.ResourceVersion
		if _, err := super.CoreV1().Secrets(metav1.NamespaceSystem).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		wBundle, wDigest := writeBundle(t, c, "w2")
		wo := applyOpts(p, "w2", wBundle, wDigest, &log)
		wo.SkipPhases = []string{"images", "kubelet"}
		start := time.Now()
		err = phases.Apply(ctx, wo)
		if err == nil || !strings.Contains(err.Error(), "rejects this node's bootstrap token: it has expired") {
			t.Fatalf("err = %v", err)
		}
		if d := time.Since(start); d > 30*time.Second {
			t.Errorf("took %v to notice", d)
		}
		if strings.Contains(err.Error(), c.Secrets.Tokens["w2"].Secret) {
			t.Error("the error shows the token")
		}
	})
}

func kubeletClientset(t *testing.T, p *controlplane.Plane, node string) kubernetes.Interface {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", hostfs.Path(p.NodeRoot(node), render.KubeletKubeconfig))
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}
