package render

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Each testdata/invalid-*.toml declares the exact problems it must produce,
// in order, as "# want:" lines at its top.
func TestInvalidConfigs(t *testing.T) {
	files, err := filepath.Glob("testdata/invalid-*.toml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no fixtures: %v", err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, l := range strings.Split(string(data), "\n") {
				if w, ok := strings.CutPrefix(l, "# want: "); ok {
					want = append(want, w)
				}
			}
			_, err = Parse(filepath.Base(f), data)
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("Parse = %v, want a *ConfigError", err)
			}
			if got := ce.Lines(); !slices.Equal(got, want) {
				t.Errorf("problems:\n got: %s\nwant: %s", strings.Join(got, "\n      "), strings.Join(want, "\n      "))
			}
		})
	}
}

func TestTemplateValidates(t *testing.T) {
	c, err := Parse("template", []byte(Template))
	if err != nil {
		t.Fatalf("the init template does not validate: %v", err)
	}
	if c.Name != "dc1" || len(c.Nodes) != 2 {
		t.Errorf("template cluster = %+v", c)
	}
}

func TestDefaultsMatchKubeadm(t *testing.T) {
	c, err := Parse("min.toml", []byte(`
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
`))
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct{ field, got, want string }{
		{"name", c.Name, "kubernetes"},
		{"kubernetes_version", c.KubernetesVersion, KubernetesVersion},
		{"endpoint", c.Endpoint(), "10.0.0.11:6443"},
		{"service_subnet", c.ServiceSubnet.String(), "10.96.0.0/12"},
		{"pod_subnet set", boolString(c.PodSubnet.IsValid()), "false"},
		{"dns_domain", c.DNSDomain, "cluster.local"},
		{"algorithm", string(c.Algorithm), "RSA-2048"},
		{"cert_validity", c.CertValidity.String(), "8760h0m0s"},
		{"ca_validity", c.CAValidity.String(), "87600h0m0s"},
		{"renew_before", c.RenewBefore.String(), "720h0m0s"},
		{"repository", c.Repository, "registry.k8s.io"},
		{"token_ttl", c.TokenTTL.String(), "24h0m0s"},
		{"dns ip", c.DNSServiceIP().String(), "10.96.0.10"},
		{"apiserver ip", c.APIServerServiceIP().String(), "10.96.0.1"},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s = %q, want %q", ch.field, ch.got, ch.want)
		}
	}
}

func boolString(b bool) string {
	if b {
		return "true"
	}
	return "false"
}

func TestImagesMatchKubeadmList(t *testing.T) {
	c, err := Parse("t.toml", []byte(Template))
	if err != nil {
		t.Fatal(err)
	}
	// `kubeadm config images list` for v1.37.2 (REAL-CLUSTER-NOTES.md).
	want := []string{
		"registry.k8s.io/kube-apiserver:v1.37.2",
		"registry.k8s.io/kube-controller-manager:v1.37.2",
		"registry.k8s.io/kube-scheduler:v1.37.2",
		"registry.k8s.io/kube-proxy:v1.37.2",
		"registry.k8s.io/coredns/coredns:v1.14.6",
		"registry.k8s.io/pause:3.10.2",
		"registry.k8s.io/etcd:3.7.0-0",
	}
	if got := c.Images(); !slices.Equal(got, want) {
		t.Errorf("Images() = %q, want %q", got, want)
	}
	// kubeadm v1.37.2's list for kubernetesVersion v1.36.3: etcd from
	// SupportedEtcdVersion[36], the same tag (TestOracle runs the real one).
	prev, err := Parse("t.toml", []byte(strings.Replace(Template, "\nname = ", "\nkubernetes_version = \"v1.36.3\"\nname = ", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if prev.KubernetesVersion != "v1.36.3" {
		t.Fatalf("template edit did not take: %s", prev.KubernetesVersion)
	}
	for i, w := range want {
		want[i] = strings.Replace(w, ":v1.37.2", ":v1.36.3", 1)
	}
	if got := prev.Images(); !slices.Equal(got, want) {
		t.Errorf("v1.36.3 Images() = %q, want %q", got, want)
	}
	c.Repository = "mirror.example:5000/k8s"
	if got := c.CoreImages()[4].Ref; got != "mirror.example:5000/k8s/coredns:v1.14.6" {
		t.Errorf("coredns on a mirror = %q; kubeadm drops the coredns/ sub-path off registry.k8s.io", got)
	}
}

func TestAddonManifests(t *testing.T) {
	dir := t.TempDir()
	cfg := `
[addons]
manifests = ["cni.yaml", "missing.yaml", "bad.yaml"]
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
`
	os.WriteFile(filepath.Join(dir, "cluster.toml"), []byte(cfg), 0o644)
	os.WriteFile(filepath.Join(dir, "cni.yaml"), []byte("# a CNI\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: cni\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: cni\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte("kind: Namespace\n"), 0o644)
	_, err := Load(filepath.Join(dir, "cluster.toml"))
	var ce *ConfigError
	if !errors.As(err, &ce) || len(ce.Problems) != 2 {
		t.Fatalf("err = %v", err)
	}
	want := []string{
		"addons.manifests[1]: open " + filepath.Join(dir, "missing.yaml") + ": no such file or directory",
		"addons.manifests[2]: bad.yaml: document 1 lacks apiVersion, kind or metadata.name",
	}
	for i, l := range ce.Lines() {
		if !strings.HasSuffix(l, want[i]) || !strings.Contains(l, "cluster.toml:3:") {
			t.Errorf("line %d = %q, want cluster.toml:3: ...%s", i, l, want[i])
		}
	}

	os.WriteFile(filepath.Join(dir, "cluster.toml"), []byte(strings.Replace(cfg, `, "missing.yaml", "bad.yaml"`, "", 1)), 0o644)
	c, err := Load(filepath.Join(dir, "cluster.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.AddonManifests) != 1 || c.AddonManifests[0].Name != "00-cni.yaml" {
		t.Fatalf("manifests = %+v", c.AddonManifests)
	}
	if docs := SplitYAML(c.AddonManifests[0].Data); len(docs) != 2 {
		t.Errorf("SplitYAML found %d documents, want 2", len(docs))
	}
}

func TestKubeletConfigOverrides(t *testing.T) {
	base := `
[kubelet.config]
failCgroupV1 = false
oomScoreAdj = 0
%s
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
`
	c, err := Parse("k.toml", []byte(strings.Replace(base, "%s", "", 1)))
	if err != nil {
		t.Fatal(err)
	}
	kc, err := c.KubeletConfiguration(c.Nodes[0])
	if err != nil || kc.FailCgroupV1 == nil || *kc.FailCgroupV1 || kc.OOMScoreAdj == nil || *kc.OOMScoreAdj != 0 || kc.StaticPodPath != ManifestsDir {
		t.Fatalf("merged = %+v, %v", kc, err)
	}
	_, err = Parse("k.toml", []byte(strings.Replace(base, "%s", "staticPodPaht = \"/x\"", 1)))
	var ce *ConfigError
	if !errors.As(err, &ce) || len(ce.Lines()) != 1 || !strings.Contains(ce.Lines()[0], `k.toml:2: kubelet.config: not a valid KubeletConfiguration: error unmarshaling JSON: while decoding JSON: json: unknown field "staticPodPaht"`) {
		t.Errorf("err = %v", err)
	}
}

// TestSplitYAML: documents keep their own bytes, the last line break of a
// block scalar that ends a document included.
func TestSplitYAML(t *testing.T) {
	cases := []struct {
		in   string
		want []string
	}{
		{"a: 1\n", []string{"a: 1\n"}},
		{"---\na: 1\n---\nb: 2\n", []string{"a: 1\n", "b: 2\n"}},
		{"data:\n  f: |\n    x\n---\nb: 2", []string{"data:\n  f: |\n    x\n", "b: 2"}},
		{"a: 1\n--- # second\nb: 2\n---\n# only a comment\n---\n", []string{"a: 1\n", "b: 2\n"}},
		{"a: 1\r\n---\r\nb: 2\r\n", []string{"a: 1\r\n", "b: 2\r\n"}},
		{"a: |\n  ---x\n", []string{"a: |\n  ---x\n"}},
	}
	for _, c := range cases {
		var got []string
		for _, d := range SplitYAML([]byte(c.in)) {
			got = append(got, string(d))
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("SplitYAML(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestNodeNetworkKeys(t *testing.T) {
	c, err := Parse("net.toml", []byte(`
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
prefix = 16
gateway = "10.0.255.254"
nameservers = ["10.0.0.2", "fd00::53"]
interface = "52:54:00:AB:CD:EF"

[[nodes]]
name = "w1"
role = "worker"
address = "fd00::21"
`))
	if err != nil {
		t.Fatal(err)
	}
	cp, w := c.Nodes[0], c.Nodes[1]
	if cp.Prefix != 16 || cp.Gateway.String() != "10.0.255.254" || len(cp.Nameservers) != 2 || cp.Nameservers[1].String() != "fd00::53" || cp.Interface != "52:54:00:ab:cd:ef" {
		t.Errorf("cp1 network = %d %s %v %q", cp.Prefix, cp.Gateway, cp.Nameservers, cp.Interface)
	}
	// Defaults: /64 for IPv6 (24 for IPv4), no gateway, no nameservers, the
	// first ethernet interface.
	if w.Prefix != 64 || w.Gateway.IsValid() || len(w.Nameservers) != 0 || w.Interface != "" {
		t.Errorf("w1 network = %d %s %v %q", w.Prefix, w.Gateway, w.Nameservers, w.Interface)
	}
}

func TestStaticPods(t *testing.T) {
	dir := t.TempDir()
	cfg := `
[addons]
static_pods = ["kube-vip.yaml", "two.yaml", "etcd.yaml", "cm.yaml"]
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
[[nodes]]
name = "w1"
role = "worker"
address = "10.0.0.21"
`
	pod := "apiVersion: v1\nkind: Pod\nmetadata:\n  name: %s\n  namespace: kube-system\nspec:\n  hostNetwork: true\n  containers:\n  - name: c\n    image: ghcr.io/kube-vip/kube-vip:v1.0.0\n"
	os.WriteFile(filepath.Join(dir, "cluster.toml"), []byte(cfg), 0o644)
	os.WriteFile(filepath.Join(dir, "kube-vip.yaml"), []byte(fmt.Sprintf(pod, "kube-vip")), 0o644)
	os.WriteFile(filepath.Join(dir, "two.yaml"), []byte(fmt.Sprintf(pod, "a")+"---\n"+fmt.Sprintf(pod, "b")), 0o644)
	os.WriteFile(filepath.Join(dir, "etcd.yaml"), []byte(fmt.Sprintf(pod, "etcd")), 0o644)
	os.WriteFile(filepath.Join(dir, "cm.yaml"), []byte("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n"), 0o644)
	_, err := Load(filepath.Join(dir, "cluster.toml"))
	var ce *ConfigError
	if !errors.As(err, &ce) || len(ce.Problems) != 3 {
		t.Fatalf("err = %v", err)
	}
	want := []string{
		"addons.static_pods[1]: two.yaml: holds 2 YAML documents; a static pod file holds one Pod",
		"addons.static_pods[2]: etcd.yaml: a static pod named etcd is already in the bundle",
		"addons.static_pods[3]: cm.yaml: is v1 ConfigMap, not a v1 Pod",
	}
	for i, l := range ce.Lines() {
		if !strings.HasSuffix(l, want[i]) || !strings.Contains(l, "cluster.toml:3:") {
			t.Errorf("line %d = %q, want cluster.toml:3: ...%s", i, l, want[i])
		}
	}

	os.WriteFile(filepath.Join(dir, "cluster.toml"), []byte(strings.Replace(cfg, `, "two.yaml", "etcd.yaml", "cm.yaml"`, "", 1)), 0o644)
	c, err := Load(filepath.Join(dir, "cluster.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.StaticPods) != 1 || c.StaticPods[0].Name != "kube-vip.yaml" || string(c.StaticPods[0].Data) != fmt.Sprintf(pod, "kube-vip") {
		t.Errorf("static pods = %+v", c.StaticPods)
	}
}
