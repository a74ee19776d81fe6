package render_test

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
)

// TestOracle has the real kubeadm of the pinned version write `kubeadm
// init`'s files for the same cluster into a root of its own (--rootfs), and
// compares every file it writes under /etc/kubernetes and /var/lib/kubelet
// with airadm's: static pod manifests, the kubelet config and
// instance-config.yaml byte for byte, certificates by subject, SANs, usages,
// key type and validity, keys by type, kubeconfigs by cluster, server, user
// and context, and every file's mode. A file kubeadm writes that airadm does
// not, or that this test has no comparison for, fails the test. The
// deliberate differences are the ones docs/kubeadm-compatibility.md lists.
func TestOracle(t *testing.T) {
	kubeadm, err := k8sbin.Path("kubeadm")
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 {
		t.Fatal("TestOracle runs kubeadm --rootfs, which chroots: run it as root (sudo -E go test ./render -run TestOracle)")
	}
	// Each algorithm with the pinned release, and the previous minor
	// (kubeadm v1.37 deploys v1.36 control planes) with one of them.
	for _, tc := range []struct {
		alg     pki.Algorithm
		version string
	}{
		{pki.RSA2048, render.KubernetesVersion},
		{pki.ECDSAP256, render.KubernetesVersion},
		{pki.ECDSAP256, k8sbin.PreviousKubernetesVersion},
	} {
		t.Run(string(tc.alg)+"-"+tc.version, func(t *testing.T) {
			c := clustertest.New(t, fmt.Sprintf(`
name = "oracle"
kubernetes_version = %q
control_plane_endpoint = "api.oracle.example:6443"
[network]
pod_subnet = "10.244.0.0/16"
service_subnet = "10.96.0.0/12"
dns_domain = "cluster.local"
[pki]
algorithm = %q
cert_validity = "4000h"
ca_validity = "40000h"
extra_sans = ["10.0.0.10", "*.oracle.example"]
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
[[nodes]]
name = "w1"
role = "worker"
address = "10.0.0.21"
`, tc.version, tc.alg))
			ours := c.Files(t, "cp1")
			rootfs := t.TempDir()
			// The trust stores airadm mounts (the Debian set, see
			// docs/kubeadm-compatibility.md): kubeadm mounts those it finds.
			for _, d := range []string{"etc/ssl/certs", "etc/ca-certificates", "usr/share/ca-certificates", "usr/local/share/ca-certificates", "dry"} {
				if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			initCfg := `apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint:
  advertiseAddress: 10.0.0.11
  bindPort: 6443
nodeRegistration:
  name: cp1
  criSocket: unix:///var/run/containerd/containerd.sock
---
`
			cfg := "/kubeadm.yaml" // inside rootfs, where kubeadm chroots
			if err := os.WriteFile(filepath.Join(rootfs, cfg), []byte(initCfg+string(ours[render.KubeadmConfigFile].Data)), 0o600); err != nil {
				t.Fatal(err)
			}
			run := func(args ...string) string {
				t.Helper()
				cmd := exec.Command(kubeadm, append([]string{"--rootfs", rootfs}, args...)...)
				cmd.Env = append(os.Environ(), "KUBEADM_INIT_DRYRUN_DIR=/dry")
				out, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("kubeadm %s: %v\n%s", strings.Join(args, " "), err, out)
				}
				return string(out)
			}
			// The ClusterConfiguration that upload-config will store must be
			// one the real kubeadm accepts.
			run("config", "validate", "--config", cfg)
			if !strings.Contains(string(ours[render.KubeadmConfigFile].Data), "kubernetesVersion: "+tc.version+"\n") {
				t.Fatalf("airadm's ClusterConfiguration is not for %s:\n%s", tc.version, ours[render.KubeadmConfigFile].Data)
			}
			images := run("config", "images", "list", "--config", cfg)
			var core []string
			for _, im := range c.CoreImages() {
				core = append(core, im.Ref)
			}
			if got := strings.Fields(images); !slices.Equal(got, core) {
				t.Errorf("kubeadm images %q, ours %q", got, core)
			}
			// Every phase of `kubeadm init` that writes files; the others
			// talk to the cluster (TestOracleAddons, upload-config below).
			run("init", "phase", "certs", "all", "--config", cfg)
			run("init", "phase", "kubeconfig", "all", "--config", cfg)
			run("init", "phase", "etcd", "local", "--config", cfg)
			run("init", "phase", "control-plane", "all", "--config", cfg)
			run("init", "phase", "kubelet-start", "--config", cfg)

			compareTree(t, rootfs, ours)

			// upload-config's kubelet-config ConfigMap (the dry run needs a
			// kubeconfig in its directory to build its fake client).
			admin, err := os.ReadFile(filepath.Join(rootfs, render.KubernetesDir, "admin.conf"))
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(filepath.Join(rootfs, "dry", "admin.conf"), admin, 0o600)
			uploaded := run("init", "phase", "upload-config", "kubelet", "--config", cfg, "--dry-run")
			found := false
			for _, doc := range dryRunObjects(uploaded) {
				var cm corev1.ConfigMap
				if yaml.Unmarshal(doc, &cm) != nil || cm.Name != "kubelet-config" {
					continue
				}
				if theirs, mine := cm.Data["kubelet"], string(ours[render.ClusterKubeletConfigFile].Data); theirs != mine {
					t.Errorf("kubelet-config ConfigMap differs from kubeadm's:\n--- kubeadm\n%s\n--- airadm\n%s", theirs, mine)
				}
				if cm.Annotations[render.ComponentConfigHashAnnotation] == "" {
					t.Error("kubeadm no longer signs the kubelet-config ConfigMap; revisit SignComponentConfig")
				}
				found = true
			}
			if !found {
				t.Errorf("no kubelet-config ConfigMap in kubeadm's dry run:\n%s", uploaded)
			}
		})
	}
}

// oracleDirs are the trees whose every file kubeadm init writes TestOracle
// compares.
var oracleDirs = []string{render.KubernetesDir, render.KubeletDir}

// airadmOnly are files airadm writes under oracleDirs that kubeadm init
// does not (none today); see docs/kubeadm-compatibility.md.
var airadmOnly = map[string]string{}

// compareTree walks kubeadm's files under oracleDirs in rootfs and compares
// each with airadm's file at the same path.
func compareTree(t *testing.T, rootfs string, ours map[string]render.File) {
	t.Helper()
	theirs := map[string]os.FileMode{}
	for _, dir := range oracleDirs {
		err := filepath.WalkDir(filepath.Join(rootfs, dir), func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			info, err := d.Info()
			if err != nil {
				return err
			}
			if !info.Mode().IsRegular() {
				return fmt.Errorf("%s: kubeadm wrote a %v, not a file", p, info.Mode().Type())
			}
			theirs[strings.TrimPrefix(p, rootfs)] = info.Mode().Perm()
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var certs int
	for _, path := range slices.Sorted(maps.Keys(theirs)) {
		mine, ok := ours[path]
		if !ok {
			t.Errorf("kubeadm writes %s, airadm does not", path)
			continue
		}
		if theirs[path] != mine.Mode {
			t.Errorf("%s: kubeadm's mode %v, airadm's %v", path, theirs[path], mine.Mode)
		}
		data, err := os.ReadFile(filepath.Join(rootfs, path))
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case strings.HasPrefix(path, render.ManifestsDir+"/"),
			path == render.KubeletConfigFile,
			path == render.KubeletInstanceConfigFile:
			if mine := withoutInputs(t, path, mine.Data); !bytes.Equal(data, mine) {
				t.Errorf("%s differs from kubeadm's:\n--- kubeadm\n%s\n--- airadm\n%s", path, data, mine)
			}
		case path == render.KubeletFlagsFile:
			compareFlags(t, data, mine.Data)
		case strings.HasPrefix(path, render.PKIDir+"/") && strings.HasSuffix(path, ".crt"):
			certs++
			sameCert(t, path, parseCert(t, path, data), parseCert(t, path, mine.Data))
		case strings.HasPrefix(path, render.PKIDir+"/") && strings.HasSuffix(path, ".key"):
			if a, b := pki.AlgorithmOf(parseKey(t, path, data).Public()), pki.AlgorithmOf(parseKey(t, path, mine.Data).Public()); a != b {
				t.Errorf("%s: kubeadm's key is %s, airadm's %s", path, a, b)
			}
		case path == render.PKIDir+"/sa.pub":
			if a, b := publicKeyAlgorithm(t, path, data), publicKeyAlgorithm(t, path, mine.Data); a != b {
				t.Errorf("%s: kubeadm's key is %s, airadm's %s", path, a, b)
			}
		case filepath.Dir(path) == render.KubernetesDir && strings.HasSuffix(path, ".conf"):
			compareKubeconfig(t, path, data, mine.Data)
		default:
			t.Errorf("kubeadm writes %s and TestOracle has no comparison for it: add one, or list the difference in docs/kubeadm-compatibility.md", path)
		}
	}
	if certs != 10 {
		t.Errorf("kubeadm wrote %d certificates, want 10", certs)
	}
	for path := range ours {
		inTree := slices.ContainsFunc(oracleDirs, func(d string) bool { return strings.HasPrefix(path, d+"/") })
		if _, ok := theirs[path]; inTree && !ok && airadmOnly[path] == "" {
			t.Errorf("airadm writes %s, kubeadm init does not", path)
		}
	}
}

// compareFlags: kubeadm pins the node name only when it differs from the
// hostname; airadm always pins it and the node address.
func compareFlags(t *testing.T, theirs, mine []byte) {
	t.Helper()
	theirFlags, myFlags := envFlags(t, theirs), envFlags(t, mine)
	for _, f := range theirFlags {
		if !slices.Contains(myFlags, f) && !strings.HasPrefix(f, "--hostname-override=") {
			t.Errorf("kubeadm-flags.env lacks kubeadm's %s: %q", f, myFlags)
		}
	}
	for _, f := range myFlags {
		if !slices.Contains(theirFlags, f) && !strings.HasPrefix(f, "--node-ip=") && f != "--hostname-override=cp1" {
			t.Errorf("kubeadm-flags.env has %s, which is neither kubeadm's nor a documented difference", f)
		}
	}
}

func parseCert(t *testing.T, path string, b []byte) *x509.Certificate {
	t.Helper()
	c, err := pki.ParseCert(b)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return c
}

func parseKey(t *testing.T, path string, b []byte) crypto.Signer {
	t.Helper()
	k, err := pki.ParseKey(b)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return k
}

func publicKeyAlgorithm(t *testing.T, path string, b []byte) pki.Algorithm {
	t.Helper()
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s: no PEM block", path)
	}
	k, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return pki.AlgorithmOf(k)
}

func envFlags(t *testing.T, env []byte) []string {
	t.Helper()
	s := strings.TrimSpace(string(env))
	s, ok := strings.CutPrefix(s, "KUBELET_KUBEADM_ARGS=")
	if !ok {
		t.Fatalf("not a kubeadm-flags.env: %q", env)
	}
	return strings.Fields(strings.Trim(s, `"`))
}

// sameCert compares what kubeadm decides about a certificate; serials,
// keys and the exact clock reading differ by nature.
func sameCert(t *testing.T, name string, theirs, mine *x509.Certificate) {
	t.Helper()
	if theirs.Subject.String() != mine.Subject.String() {
		t.Errorf("%s subject: kubeadm %q, airadm %q", name, theirs.Subject, mine.Subject)
	}
	if a, b := sorted(theirs.DNSNames), sorted(mine.DNSNames); !slices.Equal(a, b) {
		t.Errorf("%s DNS SANs: kubeadm %q, airadm %q", name, a, b)
	}
	if a, b := sorted(ipStrings(theirs.IPAddresses)), sorted(ipStrings(mine.IPAddresses)); !slices.Equal(a, b) {
		t.Errorf("%s IP SANs: kubeadm %q, airadm %q", name, a, b)
	}
	if !slices.Equal(theirs.ExtKeyUsage, mine.ExtKeyUsage) || theirs.KeyUsage != mine.KeyUsage || theirs.IsCA != mine.IsCA {
		t.Errorf("%s usages: kubeadm %v/%v/CA=%v, airadm %v/%v/CA=%v", name,
			theirs.KeyUsage, theirs.ExtKeyUsage, theirs.IsCA, mine.KeyUsage, mine.ExtKeyUsage, mine.IsCA)
	}
	if a, b := pki.AlgorithmOf(theirs.PublicKey), pki.AlgorithmOf(mine.PublicKey); a != b {
		t.Errorf("%s key: kubeadm %s, airadm %s", name, a, b)
	}
	// kubeconfig certificates inherit the CA's NotBefore, and kubeadm made
	// its CA in an earlier process, so allow its clock a minute.
	if a, b := theirs.NotAfter.Sub(theirs.NotBefore), mine.NotAfter.Sub(mine.NotBefore); a-b > time.Minute || b-a > time.Minute {
		t.Errorf("%s validity: kubeadm %v, airadm %v", name, a, b)
	}
	if theirs.SignatureAlgorithm != mine.SignatureAlgorithm {
		t.Errorf("%s signature: kubeadm %v, airadm %v", name, theirs.SignatureAlgorithm, mine.SignatureAlgorithm)
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func compareKubeconfig(t *testing.T, name string, theirsData, mineData []byte) {
	t.Helper()
	theirs, err := clientcmd.Load(theirsData)
	if err != nil {
		t.Fatal(err)
	}
	mine, err := clientcmd.Load(mineData)
	if err != nil {
		t.Fatal(err)
	}
	if theirs.CurrentContext != mine.CurrentContext {
		t.Errorf("%s context: kubeadm %q, airadm %q", name, theirs.CurrentContext, mine.CurrentContext)
	}
	for cn, tc := range theirs.Clusters {
		mc, ok := mine.Clusters[cn]
		if !ok {
			t.Errorf("%s: airadm has no cluster %q", name, cn)
		} else if mc.Server != tc.Server {
			t.Errorf("%s cluster %s: kubeadm server %q, airadm %q", name, cn, tc.Server, mc.Server)
		}
	}
	for un, tu := range theirs.AuthInfos {
		mu, ok := mine.AuthInfos[un]
		if !ok {
			t.Errorf("%s: airadm has no user %q", name, un)
			continue
		}
		tc, err1 := pki.ParseCert(tu.ClientCertificateData)
		mc, err2 := pki.ParseCert(mu.ClientCertificateData)
		if err1 != nil || err2 != nil {
			t.Fatalf("%s: %v %v", name, err1, err2)
		}
		sameCert(t, name, tc, mc)
	}
	if len(theirs.AuthInfos) != len(mine.AuthInfos) || len(theirs.Contexts) != len(mine.Contexts) {
		t.Errorf("%s: kubeadm has %d users/%d contexts, airadm %d/%d", name,
			len(theirs.AuthInfos), len(theirs.Contexts), len(mine.AuthInfos), len(mine.Contexts))
	}
}

// TestOracleAddons compares the CoreDNS and kube-proxy objects with what
// the real kubeadm's `init phase addon all --dry-run` would create.
func TestOracleAddons(t *testing.T) {
	for _, v := range []string{render.KubernetesVersion, k8sbin.PreviousKubernetesVersion} {
		t.Run(v, func(t *testing.T) { oracleAddons(t, v) })
	}
}

func oracleAddons(t *testing.T, version string) {
	kubeadm, err := k8sbin.Path("kubeadm")
	if err != nil {
		t.Fatal(err)
	}
	c := clustertest.New(t, `
name = "oracle"
kubernetes_version = "`+version+`"
[network]
pod_subnet = "10.244.0.0/16"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
`)
	ours := c.Files(t, "cp1")
	dir := t.TempDir()
	dry := filepath.Join(dir, "dry")
	os.MkdirAll(dry, 0o755)
	// The dry run reads admin.conf from its directory to build a client.
	os.WriteFile(filepath.Join(dry, "admin.conf"), ours[render.KubernetesDir+"/admin.conf"].Data, 0o600)
	cfgPath := filepath.Join(dir, "kubeadm.yaml")
	os.WriteFile(cfgPath, []byte(`apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint:
  advertiseAddress: 10.0.0.11
  bindPort: 6443
nodeRegistration:
  name: cp1
---
`+string(ours[render.KubeadmConfigFile].Data)), 0o600)
	cmd := exec.Command(kubeadm, "init", "phase", "addon", "all", "--config", cfgPath, "--dry-run")
	cmd.Env = append(os.Environ(), "KUBEADM_INIT_DRYRUN_DIR="+dry)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubeadm: %v\n%s", err, out)
	}
	theirs := map[string]map[string]any{}
	for _, doc := range dryRunObjects(string(out)) {
		var m map[string]any
		if err := yaml.Unmarshal(doc, &m); err != nil {
			t.Fatalf("kubeadm object: %v\n%s", err, doc)
		}
		theirs[objectKey(m)] = m
	}
	mine := map[string]map[string]any{}
	for _, doc := range render.SplitYAML(ours[render.AddonsFile].Data) {
		var m map[string]any
		if err := yaml.Unmarshal(doc, &m); err != nil {
			t.Fatal(err)
		}
		mine[objectKey(m)] = m
	}
	if len(theirs) != len(mine) {
		t.Errorf("kubeadm creates %d addon objects, airadm %d: %v / %v", len(theirs), len(mine), keys(theirs), keys(mine))
	}
	for k, want := range theirs {
		got, ok := mine[k]
		if !ok {
			t.Errorf("airadm lacks %s", k)
			continue
		}
		normalize(want)
		normalize(got)
		wj, _ := json.MarshalIndent(want, "", " ")
		gj, _ := json.MarshalIndent(got, "", " ")
		if string(wj) != string(gj) {
			t.Errorf("%s differs from kubeadm's:\n--- kubeadm\n%s\n--- airadm\n%s", k, wj, gj)
		}
	}
}

// dryRunObjects picks the objects out of kubeadm's --dry-run output: each
// follows an "Attached object:" line and ends at the first blank line.
func dryRunObjects(out string) [][]byte {
	var docs [][]byte
	for _, chunk := range strings.Split(out, "[dryrun] Attached object:\n")[1:] {
		doc, _, _ := strings.Cut(chunk, "\n\n")
		docs = append(docs, []byte(doc))
	}
	return docs
}

func objectKey(m map[string]any) string {
	meta, _ := m["metadata"].(map[string]any)
	return fmt.Sprintf("%v %v/%v", m["kind"], meta["namespace"], meta["name"])
}

func keys(m map[string]map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// normalize drops what only a server or kubeadm's own bookkeeping sets,
// and decodes the kube-proxy ConfigMap's embedded documents so they compare
// by content, not by formatting.
func normalize(m map[string]any) {
	meta, _ := m["metadata"].(map[string]any)
	delete(meta, "creationTimestamp")
	delete(meta, "resourceVersion")
	// The checksum covers the stored bytes, which differ in formatting
	// (kubeadm templates its kubeconfig.conf); TestComponentConfigSigned
	// checks airadm's is right for its own bytes.
	if ann, ok := meta["annotations"].(map[string]any); ok {
		delete(ann, "kubeadm.kubernetes.io/component-config.hash")
		if len(ann) == 0 {
			delete(meta, "annotations")
		}
	}
	delete(m, "status")
	if spec, ok := m["spec"].(map[string]any); ok {
		if tmpl, ok := spec["template"].(map[string]any); ok {
			if tm, ok := tmpl["metadata"].(map[string]any); ok {
				delete(tm, "creationTimestamp")
			}
		}
	}
	if data, ok := m["data"].(map[string]any); ok {
		for k, v := range data {
			if s, ok := v.(string); ok && (k == "config.conf" || k == "kubeconfig.conf") {
				var doc any
				if yaml.Unmarshal([]byte(s), &doc) == nil {
					data[k] = doc
				}
			}
		}
	}
}

// TestComponentConfigSigned: the kube-proxy ConfigMap carries kubeadm's
// checksum annotation, computed as kubeadm computes it, so `kubeadm upgrade`
// treats it as generated rather than user-edited.
func TestComponentConfigSigned(t *testing.T) {
	cm := &corev1.ConfigMap{Data: map[string]string{"b": "2", "a": "1"}}
	render.SignComponentConfig(cm)
	sum := sha256.Sum256([]byte("12"))
	if got, want := cm.Annotations[render.ComponentConfigHashAnnotation], fmt.Sprintf("sha256:%x", sum); got != want {
		t.Errorf("checksum %s, want %s (values in key order)", got, want)
	}
}

// withoutInputs drops airadm's inputs digest from a static pod manifest
// (docs/kubeadm-compatibility.md); other files pass as they are.
func withoutInputs(t *testing.T, path string, b []byte) []byte {
	t.Helper()
	if !strings.HasPrefix(path, render.ManifestsDir+"/") {
		return b
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(b, &pod); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if pod.Annotations[render.InputsAnnotation] == "" {
		t.Errorf("%s has no %s annotation", path, render.InputsAnnotation)
	}
	delete(pod.Annotations, render.InputsAnnotation)
	if len(pod.Annotations) == 0 {
		pod.Annotations = nil
	}
	out, err := yaml.Marshal(&pod)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
