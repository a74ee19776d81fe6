package controlplane_test

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	bootstrapapi "k8s.io/cluster-bootstrap/token/api"
	bootstraputil "k8s.io/cluster-bootstrap/token/util"

	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/controlplane"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
)

// userCorefile is a user's CoreDNS override: kubeadm's Corefile plus `log`.
const userCorefile = `.:53 {
    log
    errors
    health
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
    }
    forward . /etc/resolv.conf
    cache 30
    loop
    reload
}
`

// userOverride replaces the CoreDNS Corefile and, partially, the CoreDNS
// Deployment's replica count, as a user's addons.manifests entry would.
var userOverride = `apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
` + indent(userCorefile, "    ") + `---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
spec:
  replicas: 3
`

func indent(s, prefix string) string {
	var b strings.Builder
	for _, l := range strings.SplitAfter(s, "\n") {
		if l != "" {
			b.WriteString(prefix + l)
		}
	}
	return b.String()
}

func rebuildConfig(override string, workers ...string) string {
	cfg := fmt.Sprintf(`
name = "rebuild"
[pki]
algorithm = "ECDSA-P256"
[join]
token_ttl = "1h"
[addons]
manifests = [%q]
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
`, override)
	for i, w := range workers {
		cfg += fmt.Sprintf("[[nodes]]\nname = %q\nrole = \"worker\"\naddress = \"127.0.1.%d\"\n", w, 21+i)
	}
	return cfg
}

// rebuild is what `airadm build` does when the config gains a node: the
// same cluster.toml and secrets/ directory, edited config, secrets kept
// and the new worker's token issued.
func rebuild(t *testing.T, c *clustertest.Cluster, config string) *clustertest.Cluster {
	t.Helper()
	path := filepath.Join(c.Dir, "cluster.toml")
	if err := os.WriteFile(path, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	rc, err := render.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := secrets.Open(filepath.Join(c.Dir, "secrets"), func() time.Time { return clustertest.Now }, clustertest.Seed(t, 2))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s, err := st.Ensure(rc)
	if err != nil {
		t.Fatal(err)
	}
	return &clustertest.Cluster{Cluster: rc, Secrets: s, Dir: c.Dir}
}

// TestRebuiltControlPlaneBundle brings a control plane up from its bundle
// with a user's CoreDNS override among the extra manifests, then adds a
// worker to the config and applies the rebuilt control-plane bundle on the
// running control plane, as docs/airgap.md tells a user to.
func TestRebuiltControlPlaneBundle(t *testing.T) {
	overrideFile := filepath.Join(t.TempDir(), "coredns-override.yaml")
	if err := os.WriteFile(overrideFile, []byte(userOverride), 0o644); err != nil {
		t.Fatal(err)
	}
	c := clustertest.New(t, rebuildConfig(overrideFile, "w1"))
	ctx := context.Background()
	p := controlplane.New(t, c)
	root := p.NodeRoot("cp1")
	var log bytes.Buffer

	// The harness runs the components itself: no images, no kubelet.
	noRuntime := []string{"images", "kubelet"}
	cpBundle, cpDigest := writeBundle(t, c, "cp1")
	o := applyOpts(p, "cp1", cpBundle, cpDigest, &log)
	o.Only = "files"
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	p.Start()
	super, _ := p.Client("super-admin.conf")
	if _, err := super.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "cp1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	o.Only, o.SkipPhases = "", noRuntime
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}

	t.Run("the user's CoreDNS override wins over kubeadm's", func(t *testing.T) {
		cm, err := super.CoreV1().ConfigMaps("kube-system").Get(ctx, "coredns", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if cm.Data["Corefile"] != userCorefile {
			t.Errorf("Corefile is not the user's:\n%s", cm.Data["Corefile"])
		}
		d, err := super.AppsV1().Deployments("kube-system").Get(ctx, "coredns", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
			t.Errorf("coredns replicas = %v, want the user's 3 (kubeadm's is 2)", d.Spec.Replicas)
		}
		// The partial override adds to kubeadm's Deployment; it does not
		// replace it.
		if len(d.Spec.Template.Spec.Containers) != 1 || d.Spec.Template.Spec.Containers[0].Image != c.CoreImages()[4].Ref {
			t.Errorf("coredns containers after the override: %+v", d.Spec.Template.Spec.Containers)
		}
	})

	// A re-apply of the same bundle keeps the user's values too.
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	if cm, err := super.CoreV1().ConfigMaps("kube-system").Get(ctx, "coredns", metav1.GetOptions{}); err != nil || cm.Data["Corefile"] != userCorefile {
		t.Errorf("after a re-apply the Corefile is not the user's: %v", err)
	}

	t.Run("a rebuilt bundle publishes a new worker's token and changes nothing else", func(t *testing.T) {
		c2 := rebuild(t, c, rebuildConfig(overrideFile, "w1", "w2"))
		if c2.Secrets.Tokens["w1"] != c.Secrets.Tokens["w1"] {
			t.Fatal("the rebuild issued w1 a new token")
		}
		// The rebuilt cp1 bundle differs from the running one only in the
		// join file, which now lists w2's token too.
		before, after := c.Files(t, "cp1"), c2.Files(t, "cp1")
		if !slices.Equal(slices.Sorted(maps.Keys(before)), slices.Sorted(maps.Keys(after))) {
			t.Fatalf("the rebuilt cp1 bundle has other files: %v", slices.Sorted(maps.Keys(after)))
		}
		for path, f := range after {
			if differ := !bytes.Equal(f.Data, before[path].Data) || f.Mode != before[path].Mode; differ != (path == render.JoinFile) {
				t.Errorf("%s: differs %v in the rebuilt bundle", path, differ)
			}
		}

		w1Secret := tokenSecret(ctx, t, super, c.Secrets.Tokens["w1"].ID)
		files := hostFiles(t, root)
		// A rewritten file would show a later mtime.
		time.Sleep(10 * time.Millisecond)

		cp2Bundle, cp2Digest := writeBundle(t, c2, "cp1")
		o2 := applyOpts(p, "cp1", cp2Bundle, cp2Digest, &log)
		o2.SkipPhases = noRuntime
		log.Reset()
		if err := phases.Apply(ctx, o2); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		if strings.Contains(log.String(), c2.Secrets.Tokens["w2"].Secret) {
			t.Error("apply output shows the new token's secret")
		}

		now := hostFiles(t, root)
		for path, st := range files {
			switch {
			case runState(path):
			case path == render.JoinFile:
				if now[path].data == st.data {
					t.Errorf("%s not updated", path)
				}
			case now[path] != st:
				t.Errorf("%s rewritten by applying the rebuilt bundle", path)
			}
		}
		for path := range now {
			if _, ok := files[path]; !ok {
				t.Errorf("%s appeared on applying the rebuilt bundle", path)
			}
		}
		if got := tokenSecret(ctx, t, super, c.Secrets.Tokens["w1"].ID); got.ResourceVersion != w1Secret.ResourceVersion || !maps.EqualFunc(got.Data, w1Secret.Data, bytes.Equal) {
			t.Errorf("w1's token Secret was rewritten: expiration %s, was %s",
				got.Data[bootstrapapi.BootstrapTokenExpirationKey], w1Secret.Data[bootstrapapi.BootstrapTokenExpirationKey])
		}

		// The new token is published and the real apiserver takes it.
		w2 := c2.Secrets.Tokens["w2"]
		s := tokenSecret(ctx, t, super, w2.ID)
		if string(s.Data[bootstrapapi.BootstrapTokenSecretKey]) != w2.Secret || string(s.Data[bootstrapapi.BootstrapTokenExtraGroupsKey]) != phases.NodeBootstrapTokenAuthGroup {
			t.Errorf("w2's token Secret does not hold its token or group")
		}
		wBundle, wDigest := writeBundle(t, c2, "w2")
		wo := applyOpts(p, "w2", wBundle, wDigest, &log)
		wo.SkipPhases = []string{"images", "kubelet", "tls-bootstrap"}
		if err := phases.Apply(ctx, wo); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		if cert := kubeletBootstrap(t, p, "w2"); cert.Subject.CommonName != "system:node:w2" {
			t.Errorf("w2 was issued %v", cert.Subject)
		}

		// The bootstrap signer signs cluster-info with the new token, as
		// `kubeadm join --discovery-token` needs.
		var info *corev1.ConfigMap
		eventually(t, 60*time.Second, func() error {
			var err error
			info, err = super.CoreV1().ConfigMaps(metav1.NamespacePublic).Get(ctx, bootstrapapi.ConfigMapClusterInfo, metav1.GetOptions{})
			if err == nil && info.Data[bootstrapapi.JWSSignatureKeyPrefix+w2.ID] == "" {
				err = fmt.Errorf("cluster-info is not signed with w2's token yet")
			}
			return err
		})

		// Applying the rebuilt bundle again changes nothing either, the
		// signatures in cluster-info included.
		w2Secret := tokenSecret(ctx, t, super, w2.ID)
		files = hostFiles(t, root)
		time.Sleep(10 * time.Millisecond)
		if err := phases.Apply(ctx, o2); err != nil {
			t.Fatalf("%v\n%s", err, log.String())
		}
		now = hostFiles(t, root)
		for path, st := range files {
			if !runState(path) && now[path] != st {
				t.Errorf("%s rewritten by a second apply of the rebuilt bundle", path)
			}
		}
		for id, want := range map[string]*corev1.Secret{w2.ID: w2Secret, c.Secrets.Tokens["w1"].ID: w1Secret} {
			if got := tokenSecret(ctx, t, super, id); got.ResourceVersion != want.ResourceVersion {
				t.Errorf("token %s's Secret was rewritten by a second apply", id)
			}
		}
		if got, err := super.CoreV1().ConfigMaps(metav1.NamespacePublic).Get(ctx, bootstrapapi.ConfigMapClusterInfo, metav1.GetOptions{}); err != nil || got.ResourceVersion != info.ResourceVersion {
			t.Errorf("cluster-info was rewritten by a second apply: %v", err)
		}
	})
}

// hostFiles is the node's tree without etcd's data, which the running etcd
// writes to all the time.
func hostFiles(t *testing.T, root string) map[string]fileState {
	files := tree(t, root)
	for path := range files {
		if strings.HasPrefix(path, "/var/lib/etcd/") {
			delete(files, path)
		}
	}
	return files
}

func tokenSecret(ctx context.Context, t *testing.T, cs kubernetes.Interface, id string) *corev1.Secret {
	t.Helper()
	s, err := cs.CoreV1().Secrets(metav1.NamespaceSystem).Get(ctx, bootstraputil.BootstrapTokenSecretName(id), metav1.GetOptions{})
	if err != nil {
		t.Fatalf("token %s: %v", id, err)
	}
	return s
}
