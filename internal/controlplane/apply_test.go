package controlplane_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/certificate"
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
[[nodes]]
name = "w3"
role = "worker"
address = "127.0.1.23"
[[nodes]]
name = "w4"
role = "worker"
address = "127.0.1.24"
`)
	ctx := context.Background()
	p := controlplane.New(t, c)
	cpBundle, cpDigest := writeBundle(t, c, "cp1")
	var log bytes.Buffer

	// preflight and files: the tree is exactly the rendered one.
	o := applyOpts(p, "cp1", cpBundle, cpDigest, &log)
	o.SkipPhases = []string{"images", "kubelet", "wait-etcd", "wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons"}
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
		if runState(path) {
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
	// preflight, files and the five API phases (which run at once, so in
	// any order), each recorded once.
	if err != nil || j.ManifestDigest != cpDigest {
		t.Errorf("journal = %+v, %v", j, err)
	} else {
		for _, p := range []string{"preflight", "files", "wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons"} {
			if n := slices.Index(j.Phases, p); n < 0 || slices.Index(j.Phases[n+1:], p) >= 0 {
				t.Errorf("journal phases %v: %s not recorded exactly once", j.Phases, p)
			}
		}
	}

	node, err := super.CoreV1().Nodes().Get(ctx, "cp1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Exactly one control-plane taint (however often the phase ran), and
	// whatever the controller-manager adds beside it kept (this Node has no
	// kubelet, so the node lifecycle controller may taint it not-ready).
	cpTaints := 0
	for _, tn := range node.Spec.Taints {
		if tn.Key == phases.ControlPlaneLabel && tn.Effect == corev1.TaintEffectNoSchedule {
			cpTaints++
		}
	}
	if _, ok := node.Labels[phases.ControlPlaneLabel]; !ok || cpTaints != 1 {
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

	t.Run("airadm issues the kubelet's credential before kubelet starts", func(t *testing.T) {
		wBundle, wDigest := writeBundle(t, c, "w3")
		wo := applyOpts(p, "w3", wBundle, wDigest, &log)
		wo.SkipPhases = []string{"images", "kubelet", "tls-bootstrap"}
		if err := phases.Apply(ctx, wo); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		root := p.NodeRoot("w3")
		issued, err := phases.BootstrapKubelet(ctx, root, "w3", 90*time.Second)
		if err != nil || !issued {
			t.Fatalf("BootstrapKubelet: issued %v, %v", issued, err)
		}
		pki := hostfs.Path(root, phases.KubeletPKIDir)
		// Laid out as kubelet lays it out: a dated pair behind the
		// kubelet-client-current.pem symlink, and kubelet.conf naming the
		// symlink (by its host path) for certificate and key.
		target, err := os.Readlink(filepath.Join(pki, "kubelet-client-current.pem"))
		if err != nil || !strings.HasPrefix(filepath.Base(target), "kubelet-client-2") {
			t.Fatalf("kubelet-client-current.pem -> %q, %v", target, err)
		}
		if info, err := os.Stat(hostfs.Path(root, render.KubeletKubeconfig)); err != nil || info.Mode().Perm() != 0o600 {
			t.Fatalf("kubelet.conf: %v %v", info, err)
		}
		kc, err := clientcmd.LoadFromFile(hostfs.Path(root, render.KubeletKubeconfig))
		if err != nil {
			t.Fatal(err)
		}
		auth := kc.AuthInfos["default-auth"]
		if kc.CurrentContext != "default-context" || auth == nil || auth.ClientCertificate != "/var/lib/kubelet/pki/kubelet-client-current.pem" || auth.ClientKey != auth.ClientCertificate {
			t.Fatalf("kubelet.conf is not as kubelet writes it: %+v", kc)
		}
		store, err := certificate.NewFileStore("kubelet-client", pki, pki, "", "")
		if err != nil {
			t.Fatal(err)
		}
		pair, err := store.Current()
		if err != nil {
			t.Fatalf("the kubelet's certificate store cannot load the pair: %v", err)
		}
		if cn, o := pair.Leaf.Subject.CommonName, pair.Leaf.Subject.Organization; cn != "system:node:w3" || len(o) != 1 || o[0] != "system:nodes" {
			t.Errorf("issued to %s %v", cn, o)
		}
		// Again: a valid kubelet.conf means nothing to do.
		if issued, err := phases.BootstrapKubelet(ctx, root, "w3", 90*time.Second); err != nil || issued {
			t.Errorf("second BootstrapKubelet: issued %v, %v", issued, err)
		}
		// The kubelet registers its Node with that credential, and
		// tls-bootstrap sees it and drops the token.
		cs := rootedKubeletClientset(t, root, pair)
		if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "w3"}}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("w3 cannot register itself with the issued certificate: %v", err)
		}
		wo.Only, wo.SkipPhases = "tls-bootstrap", nil
		if err := phases.Apply(ctx, wo); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		if _, err := os.Stat(hostfs.Path(root, render.BootstrapKubeconfig)); !os.IsNotExist(err) {
			t.Errorf("bootstrap-kubelet.conf still there after tls-bootstrap: %v", err)
		}
		// kubelet's own rotation (client-go's certificate manager, which
		// kubelet runs with rotateCertificates) renews it from there, with
		// the node's own credential and the same store.
		m, err := certificate.NewManager(&certificate.Config{
			ClientsetFn: func(current *tls.Certificate) (kubernetes.Interface, error) {
				return rootedKubeletClientset(t, root, current), nil
			},
			Template:         &x509.CertificateRequest{Subject: pkix.Name{CommonName: "system:node:w3", Organization: []string{"system:nodes"}}},
			SignerName:       certificatesv1.KubeAPIServerClientKubeletSignerName,
			Usages:           []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageClientAuth},
			CertificateStore: store,
		})
		if err != nil {
			t.Fatal(err)
		}
		rotator, ok := m.(interface{ RotateCerts() (bool, error) })
		if !ok {
			t.Fatal("client-go's certificate manager has no RotateCerts")
		}
		if ok, err := rotator.RotateCerts(); err != nil || !ok {
			t.Fatalf("rotating the kubelet's client certificate: %v %v", ok, err)
		}
		rotated, err := store.Current()
		if err != nil || rotated.Leaf.SerialNumber.Cmp(pair.Leaf.SerialNumber) == 0 {
			t.Fatalf("after rotation: %v (same serial: %v)", err, err == nil)
		}
		if _, err := rootedKubeletClientset(t, root, rotated).CoreV1().Nodes().Get(ctx, "w3", metav1.GetOptions{}); err != nil {
			t.Errorf("the rotated certificate does not work: %v", err)
		}
	})

	t.Run("the kubelet phase's certificate is requested while the bundle is verified", func(t *testing.T) {
		wBundle, wDigest := writeBundle(t, c, "w4")
		wo := applyOpts(p, "w4", wBundle, wDigest, &log)
		wo.SkipPhases = []string{"images", "kubelet", "tls-bootstrap"}
		if err := phases.Apply(ctx, wo); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		csrs := func() int {
			l, err := super.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return len(l.Items)
		}
		before := csrs()
		// No kubelet can run here: the phase fails at its start, after it
		// wrote the credential.
		log.Reset()
		wo.Only, wo.SkipPhases = "kubelet", nil
		wo.Kubelet, wo.KubeletBinary = phases.KubeletExec, "/nonexistent/kubelet"
		err := phases.Apply(ctx, wo)
		if err == nil || !strings.Contains(err.Error(), "/nonexistent/kubelet") {
			t.Fatalf("err = %v\n%s", err, log.String())
		}
		if !strings.Contains(log.String(), "requested while the bundle was verified") {
			t.Errorf("the certificate was not requested during verification:\n%s", log.String())
		}
		if n := csrs(); n != before+1 {
			t.Errorf("%d CSRs made, want 1", n-before)
		}
		root := p.NodeRoot("w4")
		pki := hostfs.Path(root, phases.KubeletPKIDir)
		store, err := certificate.NewFileStore("kubelet-client", pki, pki, "", "")
		if err != nil {
			t.Fatal(err)
		}
		pair, err := store.Current()
		if err != nil || pair.Leaf.Subject.CommonName != "system:node:w4" {
			t.Fatalf("the kubelet's pair: %v", err)
		}
		if _, err := rootedKubeletClientset(t, root, pair).CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "w4"}}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("w4 cannot register itself with the certificate: %v", err)
		}
		// With a valid kubelet.conf, a run asks the cluster for nothing.
		log.Reset()
		if err := phases.Apply(ctx, wo); err == nil {
			t.Fatal("the kubelet phase started /nonexistent/kubelet")
		}
		if n := csrs(); n != before+1 || strings.Contains(log.String(), "client certificate") {
			t.Errorf("a second run made %d more CSRs:\n%s", n-before-1, log.String())
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
		// The kubelet phase, which asks for the kubelet's certificate with
		// the token before starting it, says the same and starts nothing.
		wo.Only, wo.SkipPhases = "kubelet", nil
		wo.Kubelet, wo.KubeletBinary = phases.KubeletExec, "/nonexistent/kubelet"
		err = phases.Apply(ctx, wo)
		if err == nil || !strings.Contains(err.Error(), "rejects this node's bootstrap token: it has expired") || strings.Contains(err.Error(), c.Secrets.Tokens["w2"].Secret) {
			t.Fatalf("kubelet phase with an expired token: %v", err)
		}
	})
}

// rootedKubeletClientset is a client with kubelet.conf's cluster and the
// given pair (kubelet.conf names the pair by its host path, not under root).
func rootedKubeletClientset(t *testing.T, root string, pair *tls.Certificate) kubernetes.Interface {
	t.Helper()
	kc, err := clientcmd.LoadFromFile(hostfs.Path(root, render.KubeletKubeconfig))
	if err != nil {
		t.Fatal(err)
	}
	cluster := kc.Clusters[kc.Contexts[kc.CurrentContext].Cluster]
	var certPEM []byte
	for _, der := range pair.Certificate {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(pair.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(&rest.Config{Host: cluster.Server, TLSClientConfig: rest.TLSClientConfig{
		CAData: cluster.CertificateAuthorityData, CertData: certPEM,
		KeyData: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}})
	if err != nil {
		t.Fatal(err)
	}
	return cs
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

// runState says whether path is apply's record of its own runs (the
// journal, the kept host-file hashes), which every apply may rewrite, as
// opposed to a file it lays down on the host.
func runState(path string) bool {
	return strings.HasSuffix(path, "/journal.json") || strings.HasSuffix(path, "/file-hashes.json")
}
