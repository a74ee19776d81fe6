package controlplane_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"airadm.dev/airadm/expiry"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/controlplane"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
)

// convergeConfig has two-hour certificates (so pki.renew_before defaults
// to 40 minutes), and optionally an extra SAN and a kubelet setting.
func convergeConfig(extraSAN string, maxPods int) string {
	cfg := `
name = "converge"
[pki]
algorithm = "ECDSA-P256"
cert_validity = "2h"
`
	if extraSAN != "" {
		cfg += fmt.Sprintf("extra_sans = [%q]\n", extraSAN)
	}
	if maxPods != 0 {
		cfg += fmt.Sprintf("[kubelet.config]\nmaxPods = %d\n", maxPods)
	}
	return cfg + `
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
`
}

// issueAt is `airadm build` at clock reading now: the config written to
// dir/cluster.toml and the secrets in dir/secrets ensured.
func issueAt(t *testing.T, dir, config string, now time.Time, seed uint64) (*clustertest.Cluster, []string) {
	t.Helper()
	path := filepath.Join(dir, "cluster.toml")
	if err := os.WriteFile(path, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	rc, err := render.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := secrets.Open(filepath.Join(dir, "secrets"), func() time.Time { return now }, clustertest.Seed(t, seed))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var log []string
	st.Log = func(l string) { log = append(log, strings.TrimPrefix(l, dir+"/")) }
	s, err := st.Ensure(rc)
	if err != nil {
		t.Fatal(err)
	}
	return &clustertest.Cluster{Cluster: rc, Secrets: s, Dir: dir}, log
}

// servingCert is the certificate the apiserver presents over TLS.
func servingCert(t *testing.T) *x509.Certificate {
	t.Helper()
	conn, err := tls.Dial("tcp", "127.0.1.11:6443", &tls.Config{InsecureSkipVerify: true}) // only the presented certificate is read
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

// changedFiles lists the paths whose content, mode or mtime differ between
// two snapshots of a node's tree (airadm's journal and kept hashes aside).
func changedFiles(before, after map[string]fileState) []string {
	var out []string
	for _, p := range slices.Sorted(maps.Keys(after)) {
		if runState(p) {
			continue
		}
		if st, ok := before[p]; !ok || st != after[p] {
			out = append(out, p)
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			out = append(out, p+" (removed)")
		}
	}
	return out
}

// TestLiveRenewalAndConverge brings a control plane up from its bundle
// with two-hour certificates issued 90 minutes ago, then, as an operator
// would: rebuilds (every leaf is within pki.renew_before, so each is
// renewed) and applies the rebuilt bundle on the running node; applies it
// again; then adds an extra SAN and a kubelet setting, rebuilds and applies.
// The harness plays kubelet's part for static pods (Sync restarts a
// component whose manifest changed).
func TestLiveRenewalAndConverge(t *testing.T) {
	kubeadm, err := k8sbin.Path("kubeadm")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c, _ := issueAt(t, dir, convergeConfig("", 0), time.Now().Add(-90*time.Minute), 1)
	ctx := context.Background()
	p := controlplane.New(t, c)
	root := p.NodeRoot("cp1")
	var log bytes.Buffer
	noRuntime := []string{"images", "kubelet"}
	apply := func(c *clustertest.Cluster) string {
		t.Helper()
		b, d := writeBundle(t, c, "cp1")
		o := applyOpts(p, "cp1", b, d, &log)
		o.SkipPhases = noRuntime
		log.Reset()
		if err := phases.Apply(ctx, o); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		return log.String()
	}

	b, d := writeBundle(t, c, "cp1")
	o := applyOpts(p, "cp1", b, d, &log)
	o.Only = "files"
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	p.Start()
	super, _ := p.Client("super-admin.conf")
	if _, err := super.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "cp1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	apply(c)
	if got, want := servingCert(t).SerialNumber, c.Secrets.Leaves["cp1"]["apiserver"].Cert.SerialNumber; got.Cmp(want) != 0 {
		t.Fatalf("the apiserver serves serial %x, want the bundle's %x", got, want)
	}

	// Rebuilt now: every leaf has 30 minutes left, inside the 40-minute window.
	c2, buildLog := issueAt(t, dir, convergeConfig("", 0), time.Now(), 2)
	t.Run("a rebuild renews every leaf and kubeconfig certificate in the window", func(t *testing.T) {
		if len(buildLog) != 12 {
			t.Fatalf("the rebuild logged %d lines, want the 12 leaves:\n%s", len(buildLog), strings.Join(buildLog, "\n"))
		}
		for _, l := range buildLog {
			if !strings.Contains(l, "within pki.renew_before 40m0s") {
				t.Errorf("unexpected build line %q", l)
			}
		}
	})

	t.Run("applying the renewed bundle replaces them and restarts every component", func(t *testing.T) {
		before := hostFiles(t, root)
		time.Sleep(10 * time.Millisecond)
		out := apply(c2)
		changed := changedFiles(before, hostFiles(t, root))
		var want []string
		for _, leaf := range c.Leaves(mustNode(t, c, "cp1")) {
			if file, ok := strings.CutPrefix(leaf.Name, "kubeconfig/"); ok {
				want = append(want, render.KubernetesDir+"/"+file)
			} else {
				want = append(want, render.PKIDir+"/"+leaf.Name+".crt", render.PKIDir+"/"+leaf.Name+".key")
			}
		}
		for _, m := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"} {
			want = append(want, render.ManifestsDir+"/"+m+".yaml")
		}
		slices.Sort(want)
		if !slices.Equal(changed, want) {
			t.Errorf("apply changed\n  %s\nwant\n  %s", strings.Join(changed, "\n  "), strings.Join(want, "\n  "))
		}
		for _, line := range []string{
			"replaced /etc/kubernetes/pki/apiserver.crt",
			"kubelet restart kube-apiserver: it reads ",
			"kubelet restart etcd: it reads ",
			"kubelet restart kube-controller-manager: it reads /etc/kubernetes/controller-manager.conf",
			"kubelet restart kube-scheduler: it reads /etc/kubernetes/scheduler.conf",
			"/etc/kubernetes/kubelet.conf changed: restart the kubelet",
		} {
			if !strings.Contains(out, line) {
				t.Errorf("apply did not say %q:\n%s", line, out)
			}
		}
		if strings.Contains(out, "PRIVATE KEY") {
			t.Error("apply printed key material")
		}

		restarted := p.Sync()
		if want := []string{"etcd-cp1", "kube-apiserver-cp1", "kube-controller-manager-cp1", "kube-scheduler-cp1"}; !slices.Equal(restarted, want) {
			t.Errorf("restarted %q, want %q", restarted, want)
		}
		renewed := c2.Secrets.Leaves["cp1"]["apiserver"].Cert
		if got := servingCert(t); got.SerialNumber.Cmp(renewed.SerialNumber) != 0 || !got.NotAfter.Equal(renewed.NotAfter) {
			t.Errorf("the apiserver serves serial %x until %v, want the renewed %x until %v", got.SerialNumber, got.NotAfter, renewed.SerialNumber, renewed.NotAfter)
		}
		// Every renewed kubeconfig authenticates against the restarted apiserver.
		for file, user := range map[string]string{"super-admin.conf": "kubernetes-super-admin", "controller-manager.conf": "system:kube-controller-manager", "scheduler.conf": "system:kube-scheduler", "kubelet.conf": "system:node:cp1"} {
			cs, _ := p.Client(file)
			r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
			if err != nil || r.Status.UserInfo.Username != user {
				t.Errorf("%s: %v %v", file, r, err)
			}
		}
	})

	t.Run("kubeadm certs check-expiration and airadm status show the new dates", func(t *testing.T) {
		// kubeadm reads kubeconfigs from /etc/kubernetes only: give it the
		// node's, through an overlay in a mount namespace of its own.
		cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
			`mount -t overlay overlay -o lowerdir="$1"/etc:/etc /etc && exec "$2" certs check-expiration --cert-dir "$1"/etc/kubernetes/pki --kubeconfig /nonexistent -o json`,
			"sh", root, kubeadm)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("kubeadm certs check-expiration: %v\n%s%s", err, out, stderrOf(err))
		}
		var info struct {
			Certificates []struct {
				Name           string    `json:"name"`
				ExpirationDate time.Time `json:"expirationDate"`
				Missing        bool      `json:"missing"`
			} `json:"certificates"`
		}
		if err := json.Unmarshal(out, &info); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		leaves := map[string]string{
			"admin.conf": "kubeconfig/admin.conf", "super-admin.conf": "kubeconfig/super-admin.conf",
			"controller-manager.conf": "kubeconfig/controller-manager.conf", "scheduler.conf": "kubeconfig/scheduler.conf",
			"apiserver": "apiserver", "apiserver-etcd-client": "apiserver-etcd-client", "apiserver-kubelet-client": "apiserver-kubelet-client",
			"etcd-healthcheck-client": "etcd/healthcheck-client", "etcd-peer": "etcd/peer", "etcd-server": "etcd/server",
			"front-proxy-client": "front-proxy-client",
		}
		seen := 0
		for _, ci := range info.Certificates {
			leaf, ok := leaves[ci.Name]
			if !ok {
				t.Errorf("kubeadm lists %s, which this test does not know", ci.Name)
				continue
			}
			seen++
			renewed, old := c2.Secrets.Leaves["cp1"][leaf].Cert.NotAfter, c.Secrets.Leaves["cp1"][leaf].Cert.NotAfter
			if ci.Missing || !ci.ExpirationDate.Equal(renewed) {
				t.Errorf("kubeadm: %s expires %v (missing %v), want the renewed %v (was %v)", ci.Name, ci.ExpirationDate, ci.Missing, renewed, old)
			}
		}
		if seen != len(leaves) {
			t.Errorf("kubeadm listed %d of the %d certificates:\n%s", seen, len(leaves), out)
		}

		certs, err := expiry.Host(root, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		for _, ce := range certs {
			if ce.IsCA || ce.Path == render.PKIDir+"/sa.pub" {
				continue
			}
			if ce.Residual < 90*time.Minute {
				t.Errorf("airadm status: %s has %v left after renewal", ce.Path, ce.Residual)
			}
		}
	})

	t.Run("applying the same bundle again changes and restarts nothing", func(t *testing.T) {
		before := hostFiles(t, root)
		time.Sleep(10 * time.Millisecond)
		out := apply(c2)
		if changed := changedFiles(before, hostFiles(t, root)); len(changed) > 0 {
			t.Errorf("a second apply changed %q", changed)
		}
		if !strings.Contains(out, "nothing changed: all ") || strings.Contains(out, "restart") {
			t.Errorf("a second apply said:\n%s", out)
		}
		if restarted := p.Sync(); len(restarted) > 0 {
			t.Errorf("restarted %q", restarted)
		}
	})

	t.Run("a new SAN and a new kubelet setting change exactly those files and restart the apiserver", func(t *testing.T) {
		c3, buildLog := issueAt(t, dir, convergeConfig("api.converge.example", 42), time.Now(), 3)
		if len(buildLog) != 1 || !strings.HasPrefix(buildLog[0], "reissued (names in the config changed) ") || !strings.HasSuffix(buildLog[0], "secrets/nodes/cp1/apiserver.crt") {
			t.Errorf("the rebuild logged %q", buildLog)
		}
		before := hostFiles(t, root)
		time.Sleep(10 * time.Millisecond)
		out := apply(c3)
		want := []string{
			render.KubernetesDir + "/manifests/kube-apiserver.yaml",
			render.PKIDir + "/apiserver.crt", render.PKIDir + "/apiserver.key",
			render.AiradmStateDir + "/kubeadm-config.yaml", render.ClusterKubeletConfigFile,
			render.KubeletConfigFile,
		}
		slices.Sort(want)
		if changed := changedFiles(before, hostFiles(t, root)); !slices.Equal(changed, want) {
			t.Errorf("apply changed %q, want %q", changed, want)
		}
		if !strings.Contains(out, "kubelet restart kube-apiserver: it reads /etc/kubernetes/pki/apiserver.crt, /etc/kubernetes/pki/apiserver.key") ||
			!strings.Contains(out, render.KubeletConfigFile+" changed: restart the kubelet") ||
			strings.Contains(out, "restart etcd") || strings.Contains(out, "restart kube-scheduler") || strings.Contains(out, "restart kube-controller-manager") {
			t.Errorf("apply said:\n%s", out)
		}
		if restarted := p.Sync(); !slices.Equal(restarted, []string{"kube-apiserver-cp1"}) {
			t.Errorf("restarted %q, want only the apiserver", restarted)
		}
		if got := servingCert(t); !slices.Contains(got.DNSNames, "api.converge.example") {
			t.Errorf("the apiserver serves %v, without the new SAN", got.DNSNames)
		}
		// upload-config published the new kubelet setting for kubeadm's tooling.
		cm, err := super.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubelet-config", metav1.GetOptions{})
		if err != nil || !strings.Contains(cm.Data["kubelet"], "maxPods: 42") {
			t.Errorf("kubelet-config ConfigMap: %v\n%v", err, cm.Data)
		}
	})
}

func mustNode(t *testing.T, c *clustertest.Cluster, name string) render.Node {
	n, ok := c.Node(name)
	if !ok {
		t.Fatalf("no node %s", name)
	}
	return n
}

func stderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}
