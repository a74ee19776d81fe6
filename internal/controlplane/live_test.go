package controlplane_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/controlplane"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
)

// TestLiveControlPlane starts the rendered control plane for real and
// checks every credential it was given against the real apiserver.
func TestLiveControlPlane(t *testing.T) {
	for _, alg := range []pki.Algorithm{pki.RSA2048, pki.ECDSAP256} {
		t.Run(string(alg), func(t *testing.T) {
			c := clustertest.New(t, fmt.Sprintf(`
name = "live"
[network]
pod_subnet = "10.244.0.0/16"
[pki]
algorithm = %q
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
[[nodes]]
name = "w1"
role = "worker"
address = "127.0.1.21"
`, alg))
			p := controlplane.Start(t, c)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			super, _ := p.Client("super-admin.conf")

			v, err := super.Discovery().ServerVersion()
			if err != nil || v.GitVersion != render.KubernetesVersion {
				t.Fatalf("server version = %v, %v; want %s", v, err, render.KubernetesVersion)
			}

			t.Run("admin.conf needs the cluster-admins binding", func(t *testing.T) {
				admin, _ := p.Client("admin.conf")
				_, err := admin.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
				if !apierrors.IsForbidden(err) {
					t.Fatalf("admin.conf before the binding: %v, want Forbidden", err)
				}
				if err := phases.EnsureClusterAdmins(ctx, super); err != nil {
					t.Fatal(err)
				}
				if err := phases.EnsureClusterAdmins(ctx, super); err != nil {
					t.Fatalf("second EnsureClusterAdmins (must be idempotent): %v", err)
				}
				eventually(t, 30*time.Second, func() error {
					_, err := admin.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
					return err
				})
			})

			t.Run("component kubeconfigs authenticate", func(t *testing.T) {
				for file, user := range map[string]string{
					"controller-manager.conf": "system:kube-controller-manager",
					"scheduler.conf":          "system:kube-scheduler",
					"kubelet.conf":            "system:node:cp1",
					"super-admin.conf":        "kubernetes-super-admin",
				} {
					cs, _ := p.Client(file)
					r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
					if err != nil {
						t.Fatalf("%s: %v", file, err)
					}
					if r.Status.UserInfo.Username != user {
						t.Errorf("%s authenticates as %q, want %q", file, r.Status.UserInfo.Username, user)
					}
				}
			})

			ca, err := pki.ParseCert(p.File("cp1", render.PKIDir+"/ca.crt"))
			if err != nil {
				t.Fatal(err)
			}

			t.Run("controller-manager signs node CSRs with the rendered CA", func(t *testing.T) {
				cert := signNodeCSR(ctx, t, super, "w9")
				verifyNodeCert(t, cert, ca, "w9")
			})

			t.Run("a real kubelet joins with the worker's bootstrap token", func(t *testing.T) {
				if err := phases.EnsureNodeBootstrapRBAC(ctx, super); err != nil {
					t.Fatal(err)
				}
				if err := phases.EnsureBootstrapToken(ctx, super, c.Secrets.Tokens["w1"], "w1", time.Now(), c.TokenTTL); err != nil {
					t.Fatal(err)
				}
				cert := kubeletBootstrap(t, p, "w1")
				verifyNodeCert(t, cert, ca, "w1")
			})
		})
	}
}

// TestLiveStackedEtcd starts three stacked members from their static
// --initial-cluster and checks they form one cluster behind a working API.
func TestLiveStackedEtcd(t *testing.T) {
	c := clustertest.New(t, `
name = "stacked"
control_plane_endpoint = "127.0.1.11:6443"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
[[nodes]]
name = "cp2"
role = "control-plane"
address = "127.0.1.12"
[[nodes]]
name = "cp3"
role = "control-plane"
address = "127.0.1.13"
`)
	p := controlplane.Start(t, c)
	etcdctl, err := k8sbin.Path("etcdctl")
	if err != nil {
		t.Fatal(err)
	}
	root := p.NodeRoot("cp2")
	out, err := exec.Command(etcdctl,
		"--endpoints=https://127.0.1.12:2379",
		"--cacert="+hostfs.Path(root, render.PKIDir+"/etcd/ca.crt"),
		"--cert="+hostfs.Path(root, render.PKIDir+"/etcd/healthcheck-client.crt"),
		"--key="+hostfs.Path(root, render.PKIDir+"/etcd/healthcheck-client.key"),
		"member", "list", "-w", "json").CombinedOutput()
	if err != nil {
		t.Fatalf("etcdctl member list: %v\n%s", err, out)
	}
	var list struct {
		Members []struct {
			Name     string   `json:"name"`
			PeerURLs []string `json:"peerURLs"`
		} `json:"members"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	var got []string
	for _, m := range list.Members {
		got = append(got, m.Name+"="+strings.Join(m.PeerURLs, ","))
	}
	slices.Sort(got)
	want := []string{"cp1=https://127.0.1.11:2380", "cp2=https://127.0.1.12:2380", "cp3=https://127.0.1.13:2380"}
	if !slices.Equal(got, want) {
		t.Errorf("members = %q, want %q", got, want)
	}
	// Data written through the apiserver (on cp1's member) is readable
	// through another member: the three really share one keyspace.
	super, _ := p.Client("super-admin.conf")
	ctx := context.Background()
	_, err = super.CoreV1().ConfigMaps("default").Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "through-cp1"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(etcdctl,
		"--endpoints=https://127.0.1.13:2379",
		"--cacert="+hostfs.Path(root, render.PKIDir+"/etcd/ca.crt"),
		"--cert="+hostfs.Path(root, render.PKIDir+"/etcd/healthcheck-client.crt"),
		"--key="+hostfs.Path(root, render.PKIDir+"/etcd/healthcheck-client.key"),
		"get", "--keys-only", "/registry/configmaps/default/through-cp1").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "through-cp1") {
		t.Errorf("cp3's member does not see what the apiserver wrote through cp1's: %v %s", err, out)
	}
}

func eventually(t *testing.T, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still failing after %v: %v", d, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func signNodeCSR(ctx context.Context, t *testing.T, cs kubernetes.Interface, node string) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "system:node:" + node, Organization: []string{"system:nodes"}},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := cs.CertificatesV1().CertificateSigningRequests().Create(ctx, &certv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{Name: "node-csr-" + node},
		Spec: certv1.CertificateSigningRequestSpec{
			Request:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
			SignerName: certv1.KubeAPIServerClientKubeletSignerName,
			Usages:     []certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageClientAuth},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	csr.Status.Conditions = append(csr.Status.Conditions, certv1.CertificateSigningRequestCondition{
		Type: certv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: "Test", Message: "approved by the test",
	})
	if _, err := cs.CertificatesV1().CertificateSigningRequests().UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	var cert *x509.Certificate
	// The first CSR waits for the controller-manager's informers (~4 s).
	eventually(t, 60*time.Second, func() error {
		got, err := cs.CertificatesV1().CertificateSigningRequests().Get(ctx, csr.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if len(got.Status.Certificate) == 0 {
			return fmt.Errorf("CSR %s not signed yet", csr.Name)
		}
		cert, err = pki.ParseCert(got.Status.Certificate)
		return err
	})
	return cert
}

func verifyNodeCert(t *testing.T, cert, ca *x509.Certificate, node string) {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("node certificate does not chain to the rendered CA: %v", err)
	}
	if cert.Subject.CommonName != "system:node:"+node || !slices.Equal(cert.Subject.Organization, []string{"system:nodes"}) {
		t.Errorf("node certificate subject = %v", cert.Subject)
	}
}

// kubeletBootstrap runs the real kubelet with nothing but the worker's
// rendered bootstrap-kubelet.conf, CA and kubelet config, and returns the
// client certificate it was issued. There is no container runtime here, so
// --rotate-certificates=false makes kubelet finish the bootstrap before it
// checks for one (REAL-CLUSTER-NOTES.md).
func kubeletBootstrap(t *testing.T, p *controlplane.Plane, node string) *x509.Certificate {
	t.Helper()
	root := p.NodeRoot(node)
	var kc kubeletv1beta1.KubeletConfiguration
	if err := yaml.UnmarshalStrict(p.File(node, render.KubeletConfigFile), &kc); err != nil {
		t.Fatal(err)
	}
	// Test overlay for these hosts: cgroup v1 without systemd as PID 1,
	// paths under the node's root, and no runtime socket to find.
	kc.CgroupDriver = "cgroupfs"
	kc.FailCgroupV1 = ptr.To(false)
	kc.Authentication.X509.ClientCAFile = hostfs.Path(root, kc.Authentication.X509.ClientCAFile)
	kc.StaticPodPath = hostfs.Path(root, kc.StaticPodPath)
	kc.ContainerRuntimeEndpoint = "unix://" + filepath.Join(p.Root, "no-runtime.sock")
	kcYAML, err := yaml.Marshal(&kc)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(p.Root, node+"-kubelet-config.yaml")
	if err := os.WriteFile(cfgPath, kcYAML, 0o600); err != nil {
		t.Fatal(err)
	}
	bin, err := k8sbin.Path("kubelet")
	if err != nil {
		t.Fatal(err)
	}
	kubeletDir := hostfs.Path(root, render.KubeletDir)
	kubeconfig := hostfs.Path(root, render.KubeletKubeconfig)
	proc := p.Run("kubelet-"+node, bin,
		"--bootstrap-kubeconfig="+hostfs.Path(root, render.BootstrapKubeconfig),
		"--kubeconfig="+kubeconfig,
		"--config="+cfgPath,
		"--root-dir="+kubeletDir,
		"--cert-dir="+filepath.Join(kubeletDir, "pki"),
		"--hostname-override="+node,
		"--rotate-certificates=false",
	)
	certPath := filepath.Join(kubeletDir, "pki", "kubelet-client-current.pem")
	deadline := time.Now().Add(90 * time.Second)
	for {
		if _, err := os.Stat(kubeconfig); err == nil {
			if _, err := os.Stat(certPath); err == nil {
				break
			}
		}
		if done, err := proc.Exited(); done {
			if _, serr := os.Stat(certPath); serr == nil {
				break
			}
			b, _ := os.ReadFile(proc.Log)
			t.Fatalf("kubelet exited (%v) before its client certificate was issued:\n%s", err, lastLines(string(b), 30))
		}
		if time.Now().After(deadline) {
			t.Fatal("kubelet's client certificate was not issued within 90s")
		}
		time.Sleep(250 * time.Millisecond)
	}
	cfg, err := clientcmd.LoadFromFile(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range cfg.AuthInfos {
		if u.ClientCertificate != certPath {
			t.Errorf("kubelet.conf points at %q, want %q", u.ClientCertificate, certPath)
		}
	}
	pemBytes, err := os.ReadFile(certPath)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.ParseCert(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
