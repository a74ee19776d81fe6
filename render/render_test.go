package render_test

import (
	"bytes"
	"crypto/x509"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
)

var update = flag.Bool("update", false, "rewrite testdata/golden")

func goldenCluster(t *testing.T) *clustertest.Cluster {
	t.Helper()
	cfg, err := os.ReadFile("testdata/golden/cluster.toml")
	if err != nil {
		t.Fatal(err)
	}
	return clustertest.New(t, string(cfg))
}

// TestGolden pins every non-secret file byte for byte and every file's path,
// mode and size. Keys and certificates differ per run only through the
// seeded randomness, so they are checked by TestCertificates instead.
func TestGolden(t *testing.T) {
	c := goldenCluster(t)
	for _, node := range []string{"cp1", "cp2", "w1"} {
		t.Run(node, func(t *testing.T) {
			files := c.Files(t, node)
			var listing strings.Builder
			paths := make([]string, 0, len(files))
			for p := range files {
				paths = append(paths, p)
			}
			sort.Strings(paths)
			for _, p := range paths {
				f := files[p]
				fmt.Fprintf(&listing, "%04o %s\n", f.Mode, p)
				if carriesKeyMaterial(p) {
					continue
				}
				data := f.Data
				if strings.HasPrefix(p, render.ManifestsDir+"/") {
					// The inputs digest covers certificates and keys, which
					// differ per run (above): pin its presence, not its value.
					data = inputsDigest.ReplaceAll(data, []byte("${1}<sha256 of the key material it reads>"))
				}
				golden(t, filepath.Join("testdata/golden", node, p), data)
			}
			golden(t, filepath.Join("testdata/golden", node, "LISTING"), []byte(listing.String()))
		})
	}
}

var inputsDigest = regexp.MustCompile(`(` + regexp.QuoteMeta(render.InputsAnnotation) + `: )[0-9a-f]{64}`)

// carriesKeyMaterial names the files whose bytes depend on generated keys.
func carriesKeyMaterial(p string) bool {
	for _, suffix := range []string{".key", ".crt", ".pub", ".conf", "join.json"} {
		if strings.HasSuffix(p, suffix) && !strings.HasSuffix(p, "10-kubeadm.conf") {
			return true
		}
	}
	return false
}

func golden(t *testing.T, path string, got []byte) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./render -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file (review, then go test ./render -update):\n--- got\n%s", path, got)
	}
}

// TestCertificates checks every certificate of a control-plane node with
// crypto/x509 for each algorithm: chain, usages, SANs, key match, validity.
func TestCertificates(t *testing.T) {
	for _, alg := range pki.Algorithms() {
		t.Run(string(alg), func(t *testing.T) {
			if testing.Short() && strings.HasPrefix(string(alg), "RSA-") && alg != pki.RSA2048 {
				t.Log("large RSA keys take seconds to generate; -short covers RSA-2048 only")
				return
			}
			c := clustertest.New(t, fmt.Sprintf(`
name = "x"
control_plane_endpoint = "api.x.example:6443"
[pki]
algorithm = %q
cert_validity = "100h"
extra_sans = ["198.51.100.7", "*.x.example"]
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
`, alg))
			files := c.Files(t, "cp1")
			pair := func(base string) pki.Pair {
				t.Helper()
				cert, err := pki.ParseCert(files["/etc/kubernetes/pki/"+base+".crt"].Data)
				if err != nil {
					t.Fatal(base, err)
				}
				key, err := pki.ParseKey(files["/etc/kubernetes/pki/"+base+".key"].Data)
				if err != nil {
					t.Fatal(base, err)
				}
				if !pki.KeyMatches(cert, key) {
					t.Errorf("%s.key does not match %s.crt", base, base)
				}
				if got := pki.AlgorithmOf(cert.PublicKey); got != alg {
					t.Errorf("%s key is %s, want %s", base, got, alg)
				}
				return pki.Pair{Cert: cert, Key: key}
			}
			cas := map[string]pki.Pair{"ca": pair("ca"), "front-proxy-ca": pair("front-proxy-ca"), "etcd/ca": pair("etcd/ca")}
			for name, ca := range cas {
				if !ca.Cert.IsCA || ca.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
					t.Errorf("%s is not a signing CA", name)
				}
				if want := clustertest.Now.Add(-pki.Backdate); !ca.Cert.NotBefore.Equal(want) {
					t.Errorf("%s NotBefore = %v, want %v", name, ca.Cert.NotBefore, want)
				}
				if want := clustertest.Now.Add(87600 * time.Hour); !ca.Cert.NotAfter.Equal(want) {
					t.Errorf("%s NotAfter = %v, want %v", name, ca.Cert.NotAfter, want)
				}
			}
			server := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			client := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
			both := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
			etcdIPs := []string{"10.0.0.11", "127.0.0.1", "::1"}
			leaves := []struct {
				base, ca, cn string
				usages       []x509.ExtKeyUsage
				dns, ips     []string
			}{
				{"apiserver", "ca", "kube-apiserver", server,
					[]string{"cp1", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "api.x.example", "*.x.example"},
					[]string{"10.96.0.1", "10.0.0.11", "198.51.100.7"}},
				{"apiserver-kubelet-client", "ca", "kube-apiserver-kubelet-client", client, nil, nil},
				{"front-proxy-client", "front-proxy-ca", "front-proxy-client", client, nil, nil},
				{"etcd/server", "etcd/ca", "cp1", both, []string{"cp1", "localhost"}, etcdIPs},
				{"etcd/peer", "etcd/ca", "cp1", both, []string{"cp1", "localhost"}, etcdIPs},
				{"etcd/healthcheck-client", "etcd/ca", "kube-etcd-healthcheck-client", client, nil, nil},
				{"apiserver-etcd-client", "etcd/ca", "kube-apiserver-etcd-client", client, nil, nil},
			}
			for _, l := range leaves {
				p := pair(l.base)
				checkLeaf(t, l.base, p.Cert, cas[l.ca], l.cn, nil, l.usages)
				if !slices.Equal(p.Cert.DNSNames, l.dns) {
					t.Errorf("%s DNS SANs = %q, want %q", l.base, p.Cert.DNSNames, l.dns)
				}
				if got := ipStrings(p.Cert.IPAddresses); !slices.Equal(got, l.ips) {
					t.Errorf("%s IP SANs = %q, want %q", l.base, got, l.ips)
				}
				if want := clustertest.Now.Add(-pki.Backdate); !p.Cert.NotBefore.Equal(want) {
					t.Errorf("%s NotBefore = %v, want %v (backdated like kubeadm)", l.base, p.Cert.NotBefore, want)
				}
				if want := clustertest.Now.Add(100 * time.Hour); !p.Cert.NotAfter.Equal(want) {
					t.Errorf("%s NotAfter = %v, want %v", l.base, p.Cert.NotAfter, want)
				}
			}
			sa, err := pki.ParseKey(files["/etc/kubernetes/pki/sa.key"].Data)
			if err != nil {
				t.Fatal(err)
			}
			if pub, _ := pki.EncodePublicKey(sa.Public()); !bytes.Equal(pub, files["/etc/kubernetes/pki/sa.pub"].Data) {
				t.Error("sa.pub is not the public half of sa.key")
			}

			kubeconfigs := []struct{ file, cn, org, server string }{
				{"admin.conf", "kubernetes-admin", "kubeadm:cluster-admins", "https://api.x.example:6443"},
				{"super-admin.conf", "kubernetes-super-admin", "system:masters", "https://api.x.example:6443"},
				{"kubelet.conf", "system:node:cp1", "system:nodes", "https://10.0.0.11:6443"},
				{"controller-manager.conf", "system:kube-controller-manager", "", "https://10.0.0.11:6443"},
				{"scheduler.conf", "system:kube-scheduler", "", "https://10.0.0.11:6443"},
			}
			for _, kc := range kubeconfigs {
				f := files["/etc/kubernetes/"+kc.file]
				if f.Mode != 0o600 {
					t.Errorf("%s mode %o, want 0600", kc.file, f.Mode)
				}
				cfg, err := clientcmd.Load(f.Data)
				if err != nil {
					t.Fatalf("%s: %v", kc.file, err)
				}
				ctx := cfg.Contexts[cfg.CurrentContext]
				if cfg.CurrentContext != kc.cn+"@x" || ctx == nil || ctx.AuthInfo != kc.cn || ctx.Cluster != "x" {
					t.Errorf("%s context %q = %+v", kc.file, cfg.CurrentContext, ctx)
					continue
				}
				if got := cfg.Clusters["x"].Server; got != kc.server {
					t.Errorf("%s server = %s, want %s", kc.file, got, kc.server)
				}
				if !bytes.Equal(cfg.Clusters["x"].CertificateAuthorityData, files["/etc/kubernetes/pki/ca.crt"].Data) {
					t.Errorf("%s CA data is not ca.crt", kc.file)
				}
				user := cfg.AuthInfos[kc.cn]
				cert, err := pki.ParseCert(user.ClientCertificateData)
				if err != nil {
					t.Fatalf("%s: %v", kc.file, err)
				}
				key, err := pki.ParseKey(user.ClientKeyData)
				if err != nil || !pki.KeyMatches(cert, key) {
					t.Errorf("%s: client key does not match its certificate (%v)", kc.file, err)
				}
				var orgs []string
				if kc.org != "" {
					orgs = []string{kc.org}
				}
				checkLeaf(t, kc.file, cert, cas["ca"], kc.cn, orgs, client)
				// kubeadm leaves NotBefore to the CA's (kubeconfig.go sets only NotAfter).
				if !cert.NotBefore.Equal(cas["ca"].Cert.NotBefore) {
					t.Errorf("%s NotBefore = %v, want the CA's %v", kc.file, cert.NotBefore, cas["ca"].Cert.NotBefore)
				}
			}
		})
	}
}

func checkLeaf(t *testing.T, name string, cert *x509.Certificate, ca pki.Pair, cn string, orgs []string, usages []x509.ExtKeyUsage) {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	for _, u := range usages {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{u}, CurrentTime: clustertest.Now}); err != nil {
			t.Errorf("%s does not verify against its CA for %v: %v", name, u, err)
		}
	}
	if cert.Subject.CommonName != cn || !slices.Equal(cert.Subject.Organization, orgs) {
		t.Errorf("%s subject = %q %q, want %q %q", name, cert.Subject.CommonName, cert.Subject.Organization, cn, orgs)
	}
	if !slices.Equal(cert.ExtKeyUsage, usages) {
		t.Errorf("%s extended usages = %v, want %v", name, cert.ExtKeyUsage, usages)
	}
	if cert.IsCA || cert.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
		t.Errorf("%s IsCA=%v KeyUsage=%v, want a leaf with digital signature and key encipherment", name, cert.IsCA, cert.KeyUsage)
	}
}

func ipStrings(ips []net.IP) []string {
	var out []string
	for _, ip := range ips {
		out = append(out, ip.String())
	}
	return out
}

// TestManifestsDecodeStrictly decodes what kubelet will read with the
// k8s.io types and no unknown fields, and checks the stacked etcd members.
func TestManifestsDecodeStrictly(t *testing.T) {
	c := goldenCluster(t)
	for _, node := range []string{"cp1", "cp2", "cp3"} {
		files := c.Files(t, node)
		for _, name := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"} {
			f, ok := files["/etc/kubernetes/manifests/"+name+".yaml"]
			if !ok || f.Mode != 0o600 {
				t.Fatalf("%s: manifest %s missing or mode %o", node, name, f.Mode)
			}
			var pod corev1.Pod
			if err := yaml.UnmarshalStrict(f.Data, &pod); err != nil {
				t.Fatalf("%s %s: %v", node, name, err)
			}
			if pod.Name != name || pod.Namespace != "kube-system" || !pod.Spec.HostNetwork || len(pod.Spec.Containers) != 1 {
				t.Errorf("%s %s: unexpected pod shape %+v", node, name, pod.ObjectMeta)
			}
			if name == "etcd" {
				want := "--initial-cluster=cp1=https://10.0.0.11:2380,cp2=https://10.0.0.12:2380,cp3=https://10.0.0.13:2380"
				if !slices.Contains(pod.Spec.Containers[0].Command, want) {
					t.Errorf("%s etcd command lacks %s: %q", node, want, pod.Spec.Containers[0].Command)
				}
			}
		}
		var kc kubeletv1beta1.KubeletConfiguration
		if err := yaml.UnmarshalStrict(files["/var/lib/kubelet/config.yaml"].Data, &kc); err != nil {
			t.Fatal(err)
		}
		if kc.StaticPodPath != "/etc/kubernetes/manifests" || kc.ClusterDNS[0] != "10.96.0.10" || !kc.RotateCertificates {
			t.Errorf("kubelet config: %+v", kc)
		}
	}
}

// TestWorkerCarriesNoPrivateKey: a worker learns only the CA certificate and
// its own bootstrap token; its client certificate comes from TLS bootstrap.
func TestWorkerCarriesNoPrivateKey(t *testing.T) {
	c := goldenCluster(t)
	files := c.Files(t, "w1")
	for p, f := range files {
		if bytes.Contains(f.Data, []byte("PRIVATE KEY")) {
			t.Errorf("worker file %s carries a private key", p)
		}
		if strings.HasPrefix(p, "/etc/kubernetes/manifests/") || p == "/var/lib/airadm/join.json" {
			t.Errorf("worker carries control-plane file %s", p)
		}
	}
	boot := files["/etc/kubernetes/bootstrap-kubelet.conf"]
	if boot.Mode != 0o600 {
		t.Errorf("bootstrap-kubelet.conf mode %o, want 0600", boot.Mode)
	}
	cfg, err := clientcmd.Load(boot.Data)
	if err != nil {
		t.Fatal(err)
	}
	tok := c.Secrets.Tokens["w1"]
	if got := cfg.AuthInfos[render.BootstrapTokenUser].Token; got != tok.String() {
		t.Error("bootstrap kubeconfig does not carry w1's token")
	}
	if got := cfg.Clusters["golden"].Server; got != "https://api.golden.example:6443" {
		t.Errorf("bootstrap server = %s", got)
	}
	if c.Secrets.Tokens["w1"] == c.Secrets.Tokens["w2"] {
		t.Error("workers share a bootstrap token")
	}
}

// TestRenderIsPure: the same cluster and secrets give the same bytes.
func TestRenderIsPure(t *testing.T) {
	c := goldenCluster(t)
	a, b := c.Files(t, "cp2"), c.Files(t, "cp2")
	for p := range a {
		if !bytes.Equal(a[p].Data, b[p].Data) || a[p].Mode != b[p].Mode {
			t.Errorf("%s differs between two renders", p)
		}
	}
}

func TestUnknownNode(t *testing.T) {
	c := goldenCluster(t)
	if _, err := render.NodeFiles(c.Cluster, c.Secrets, "nope"); err == nil || !strings.Contains(err.Error(), "no such node") {
		t.Errorf("err = %v", err)
	}
}

// An extra static pod (a VIP, say) goes to every control plane's manifests
// directory as given, and to no worker.
func TestStaticPodsOnControlPlanes(t *testing.T) {
	pod := "apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-vip\n  namespace: kube-system\nspec:\n  hostNetwork: true\n  containers:\n  - name: kube-vip\n    image: ghcr.io/kube-vip/kube-vip:v1.0.0\n"
	file := filepath.Join(t.TempDir(), "kube-vip.yaml")
	if err := os.WriteFile(file, []byte(pod), 0o644); err != nil {
		t.Fatal(err)
	}
	c := clustertest.New(t, fmt.Sprintf(`name = "vip"
control_plane_endpoint = "10.0.0.10:6443"
[addons]
static_pods = [%q]
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
[[nodes]]
name = "cp2"
role = "control-plane"
address = "10.0.0.12"
[[nodes]]
name = "w1"
role = "worker"
address = "10.0.0.21"
`, file))
	for node, want := range map[string]bool{"cp1": true, "cp2": true, "w1": false} {
		f, ok := c.Files(t, node)[render.ManifestsDir+"/kube-vip.yaml"]
		if ok != want || ok && (f.Mode != 0o600 || string(f.Data) != pod) {
			t.Errorf("%s: kube-vip.yaml present %v (mode %v), want %v, as given", node, ok, f.Mode, want)
		}
	}
}
