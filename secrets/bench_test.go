package secrets_test

import (
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
)

func benchConfig(alg pki.Algorithm, controlPlanes, workers int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "name = \"bench\"\ncontrol_plane_endpoint = \"10.0.0.10:6443\"\n[pki]\nalgorithm = %q\n", alg)
	for i := 1; i <= controlPlanes; i++ {
		fmt.Fprintf(&b, "[[nodes]]\nname = \"cp%d\"\nrole = \"control-plane\"\naddress = \"10.0.0.%d\"\n", i, 10+i)
	}
	for i := 0; i < workers; i++ {
		fmt.Fprintf(&b, "[[nodes]]\nname = \"w%d\"\nrole = \"worker\"\naddress = \"10.1.%d.%d\"\n", i, i/250, 1+i%250)
	}
	return b.String()
}

// airadmPKI is airadm's equivalent of kubeadm's `certs all` + `kubeconfig
// all` for one control-plane node: issue everything into a fresh secrets
// directory, render the node and write its tree.
func airadmPKI(b *testing.B, c *render.Cluster, dir string) {
	st, err := secrets.Open(filepath.Join(dir, "secrets"), time.Now, rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	s, err := st.Ensure(c)
	if err != nil {
		b.Fatal(err)
	}
	files, err := render.NodeFiles(c, s, "cp1")
	if err != nil {
		b.Fatal(err)
	}
	for _, f := range files {
		p := filepath.Join(dir, "out", f.Path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(p, f.Data, f.Mode); err != nil {
			b.Fatal(err)
		}
	}
}

func kubeadmPKI(b *testing.B, kubeadm, cfg, dir string) {
	for _, args := range [][]string{
		{"init", "phase", "certs", "all", "--config", cfg},
		{"init", "phase", "kubeconfig", "all", "--config", cfg, "--kubeconfig-dir", filepath.Join(dir, "kc")},
	} {
		if out, err := exec.Command(kubeadm, args...).CombinedOutput(); err != nil {
			b.Fatalf("kubeadm %v: %v\n%s", args, err, out)
		}
	}
}

// BenchmarkPKIvsKubeadm times one control plane's PKI and kubeconfigs, ours
// and the real kubeadm's, in the same run; "ratio" is airadm/kubeadm.
func BenchmarkPKIvsKubeadm(b *testing.B) {
	kubeadm, err := k8sbin.Path("kubeadm")
	if err != nil {
		b.Fatal(err)
	}
	for _, alg := range []pki.Algorithm{pki.RSA2048, pki.ECDSAP256} {
		b.Run(string(alg), func(b *testing.B) {
			c, err := render.Parse("bench.toml", []byte(benchConfig(alg, 1, 0)))
			if err != nil {
				b.Fatal(err)
			}
			var ours, theirs time.Duration
			for i := 0; b.Loop(); i++ {
				dir := b.TempDir()
				cfg := filepath.Join(dir, "kubeadm.yaml")
				kc := c.KubeadmClusterConfiguration()
				kc.CertificatesDir = filepath.Join(dir, "pki")
				cfgYAML := fmt.Sprintf(`apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint: {advertiseAddress: 10.0.0.11, bindPort: 6443}
nodeRegistration: {name: cp1}
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
certificatesDir: %s
clusterName: bench
controlPlaneEndpoint: 10.0.0.10:6443
encryptionAlgorithm: %s
kubernetesVersion: %s
`, kc.CertificatesDir, alg, render.KubernetesVersion)
				if err := os.WriteFile(cfg, []byte(cfgYAML), 0o600); err != nil {
					b.Fatal(err)
				}
				t0 := time.Now()
				kubeadmPKI(b, kubeadm, cfg, dir)
				t1 := time.Now()
				airadmPKI(b, c, dir)
				theirs += t1.Sub(t0)
				ours += time.Since(t1)
			}
			b.ReportMetric(float64(ours)/float64(theirs), "ratio")
			b.ReportMetric(float64(ours.Milliseconds())/float64(b.N), "airadm-ms/op")
			b.ReportMetric(float64(theirs.Milliseconds())/float64(b.N), "kubeadm-ms/op")
		})
	}
}

// BenchmarkRenderCluster renders every node of a 3 control-plane, 1,000
// worker cluster from issued secrets; workers need no keys, so they cost
// little.
func BenchmarkRenderCluster(b *testing.B) {
	c, err := render.Parse("bench.toml", []byte(benchConfig(pki.ECDSAP256, 3, 1000)))
	if err != nil {
		b.Fatal(err)
	}
	st, err := secrets.Open(filepath.Join(b.TempDir(), "secrets"), time.Now, rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	s, err := st.Ensure(c)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		for _, n := range c.Nodes {
			if _, err := render.NodeFiles(c, s, n.Name); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/float64(len(c.Nodes)), "µs/node")
}

// BenchmarkIssueWorkers issues bootstrap tokens for 1,000 new workers.
func BenchmarkIssueWorkers(b *testing.B) {
	c, err := render.Parse("bench.toml", []byte(benchConfig(pki.ECDSAP256, 3, 1000)))
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		st, err := secrets.Open(filepath.Join(b.TempDir(), "secrets"), time.Now, rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := st.Ensure(c); err != nil {
			b.Fatal(err)
		}
		st.Close()
	}
}
