package phases_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
)

func TestPlan(t *testing.T) {
	names := func(ps []phases.Phase) string {
		var out []string
		for _, p := range ps {
			out = append(out, p.Name)
		}
		return strings.Join(out, ",")
	}
	cases := []struct {
		role       render.Role
		skip       []string
		only, want string
		err        string
	}{
		{render.ControlPlane, nil, "", "preflight,files,runtime,images,etcd-join,kubelet,wait-etcd,wait-control-plane,upload-config,mark-control-plane,bootstrap-token,addons", ""},
		{render.Worker, nil, "", "preflight,files,runtime,images,kubelet,tls-bootstrap", ""},
		{render.ControlPlane, []string{"preflight", "mark-control-plane", "images", "kubelet", "etcd-join"}, "", "files,runtime,wait-etcd,wait-control-plane,upload-config,bootstrap-token,addons", ""},
		{render.Worker, nil, "tls-bootstrap", "tls-bootstrap", ""},
		{render.Worker, nil, "runtime", "runtime", ""},
		{render.ControlPlane, []string{"bogus"}, "", "", `unknown phase "bogus"`},
		{render.Worker, nil, "upload-config", "", "phase upload-config does not apply to a worker node"},
		{render.Worker, nil, "nope", "", `unknown phase "nope"`},
	}
	for _, c := range cases {
		got, err := phases.Plan(c.role, c.skip, c.only)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("Plan(%s, %v, %q) err = %v, want %q", c.role, c.skip, c.only, err, c.err)
			}
			continue
		}
		if err != nil || names(got) != c.want {
			t.Errorf("Plan(%s, %v, %q) = %s, %v; want %s", c.role, c.skip, c.only, names(got), err, c.want)
		}
	}
}

const cfg = `
name = "r"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
`

func writeBundle(t *testing.T, c *clustertest.Cluster) (string, string, []byte) {
	t.Helper()
	path, digest := c.Bundle(t, "cp1", nil, nil)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, digest, b
}

func opts(path, digest, root string) phases.Options {
	return phases.Options{Bundle: path, ManifestDigest: digest, Root: root, Node: "cp1", Only: "files"}
}

func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, _ := d.Info()
		b := []byte{}
		if !d.IsDir() {
			b, _ = os.ReadFile(p)
		}
		out[strings.TrimPrefix(p, root)] = info.Mode().String() + " " + string(b)
		return nil
	})
	delete(out, render.AiradmStateDir+"/journal.json")
	delete(out, render.AiradmStateDir+"/lock")
	return out
}

func TestTamperedOrTruncatedBundleWritesNothing(t *testing.T) {
	c := clustertest.New(t, cfg)
	_, digest, data := writeBundle(t, c)
	for name, bad := range map[string][]byte{
		"flipped":   flip(data, bytes.Index(data, []byte("BEGIN CERTIFICATE"))),
		"truncated": data[:len(data)/2],
	} {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			path := filepath.Join(t.TempDir(), "cp1.bundle")
			os.WriteFile(path, bad, 0o600)
			err := phases.Apply(context.Background(), opts(path, digest, root))
			if err == nil || !strings.Contains(err.Error(), "verifying") {
				t.Fatalf("err = %v", err)
			}
			if entries, _ := os.ReadDir(root); len(entries) != 0 {
				t.Errorf("a bad bundle wrote %d entries under the root", len(entries))
			}
		})
	}
	t.Run("unauthenticated", func(t *testing.T) {
		root := t.TempDir()
		path, _, _ := writeBundle(t, c)
		err := phases.Apply(context.Background(), opts(path, "sha256:"+strings.Repeat("0", 64), root))
		if !errors.Is(err, phases.ErrUntrusted) || !strings.Contains(err.Error(), "is not the one that was built") {
			t.Fatalf("err = %v", err)
		}
		if entries, _ := os.ReadDir(root); len(entries) != 0 {
			t.Error("an unauthenticated bundle wrote files")
		}
	})
}

func flip(b []byte, i int) []byte {
	b = bytes.Clone(b)
	b[i] ^= 0xff
	return b
}

// TestRerunAfterCrashConverges starts from what a kill -9 in the middle of
// the files phase leaves (some files written, one temp file half written,
// the rest missing) and checks that a re-run gives the clean run's tree.
func TestRerunAfterCrashConverges(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	clean := t.TempDir()
	if err := phases.Apply(context.Background(), opts(path, digest, clean)); err != nil {
		t.Fatal(err)
	}
	want := snapshot(t, clean)

	crashed := t.TempDir()
	files, _ := render.NodeFiles(c.Cluster, c.Secrets, "cp1")
	half := files[:len(files)/2]
	if err := hostfs.WriteTree(crashed, half); err != nil {
		t.Fatal(err)
	}
	next := files[len(files)/2]
	dir := hostfs.Path(crashed, filepath.Dir(next.Path))
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "."+filepath.Base(next.Path)+".tmp-123"), next.Data[:len(next.Data)/2], 0o600)
	if err := phases.Apply(context.Background(), opts(path, digest, crashed)); err != nil {
		t.Fatal(err)
	}
	got := snapshot(t, crashed)
	for p, v := range want {
		if got[p] != v {
			t.Errorf("%s differs after the re-run", p)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("%s is left over after the re-run", p)
		}
	}
	j, err := phases.LoadJournal(crashed)
	if err != nil || !slices.Contains(j.Phases, "files") || len(j.Files) == 0 {
		t.Errorf("journal = %+v, %v", j, err)
	}
}

func TestDryRunWritesNothingAndShowsNoSecret(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	root := t.TempDir()
	var out bytes.Buffer
	o := opts(path, digest, root)
	o.Only, o.DryRun, o.Out = "", true, &out
	o.IgnorePreflight = []string{"sandbox-image", "ports"}
	o.SkipPhases = []string{"images"} // no runtime in this test; TestImagesIntoRealContainerd covers it
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(root); len(entries) != 0 {
		t.Error("dry run wrote files")
	}
	s := out.String()
	if !strings.Contains(s, "would write /etc/kubernetes/pki/ca.key (0600,") || strings.Contains(s, "PRIVATE KEY") {
		t.Errorf("dry-run output:\n%s", s)
	}
	for _, phase := range []string{"[kubelet]", "[wait-control-plane]", "[upload-config]", "[mark-control-plane]", "[bootstrap-token]", "[addons]"} {
		if !strings.Contains(s, phase) {
			t.Errorf("dry run does not describe %s", phase)
		}
	}
}

// TestKubeletExecReportsAnEarlyExit starts the real kubelet from a worker's
// files under a temp root. Its config points at /etc/kubernetes, which this
// host lacks, and (on these cgroup v1 machines) refuses the host, so it
// stops at once, and the phase must say so with the end of its log.
func TestKubeletExecReportsAnEarlyExit(t *testing.T) {
	c := clustertest.New(t, cfg+`
[[nodes]]
name = "w1"
role = "worker"
address = "127.0.1.21"
`)
	kubelet, err := k8sbin.Path("kubelet")
	if err != nil {
		t.Fatal(err)
	}
	path, digest := c.Bundle(t, "w1", nil, nil)
	root := t.TempDir()
	o := phases.Options{Bundle: path, ManifestDigest: digest, Root: root, Node: "w1", Kubelet: phases.KubeletExec, KubeletBinary: kubelet}
	o.Only = "files"
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	o.Only = "kubelet"
	err = phases.Apply(context.Background(), o)
	if err == nil || !strings.Contains(err.Error(), "kubelet exited at once") || !strings.Contains(err.Error(), `"command failed"`) {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(hostfs.Path(root, "/var/log/airadm/kubelet.log")); err != nil {
		t.Errorf("no kubelet log: %v", err)
	}
}

func TestResetRemovesWhatApplyWrote(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	root := t.TempDir()
	if err := phases.Apply(context.Background(), opts(path, digest, root)); err != nil {
		t.Fatal(err)
	}
	// kubelet's own state, which apply did not write.
	os.MkdirAll(hostfs.Path(root, "/var/lib/kubelet/pki"), 0o755)
	os.WriteFile(hostfs.Path(root, "/var/lib/kubelet/pki/kubelet-client-current.pem"), []byte("x"), 0o600)
	os.MkdirAll(hostfs.Path(root, "/var/lib/etcd/member"), 0o700)
	var out bytes.Buffer
	if err := phases.Reset(context.Background(), phases.ResetOptions{Root: root, Out: &out}); err != nil {
		t.Fatal(err)
	}
	var left []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			left = append(left, strings.TrimPrefix(p, root))
		}
		return nil
	})
	if len(left) != 0 {
		t.Errorf("reset left %q", left)
	}
	for _, d := range []string{"/var/lib/etcd", "/var/lib/kubelet", "/var/lib/airadm"} {
		if _, err := os.Stat(hostfs.Path(root, d)); !os.IsNotExist(err) {
			t.Errorf("%s still exists", d)
		}
	}
	if !strings.Contains(out.String(), "files apply wrote") {
		t.Errorf("output: %s", out.String())
	}
	// A second reset finds nothing to do and succeeds.
	if err := phases.Reset(context.Background(), phases.ResetOptions{Root: root}); err != nil {
		t.Fatal(err)
	}
}

// TestPreflightRefusesWrongNodeAndClock: a bundle for another host, and a
// clock behind the certificates, are both reported, at once, and nothing
// is written.
func TestPreflightRefusesWrongNodeAndClock(t *testing.T) {
	c := clustertest.New(t, cfg)
	path, digest, _ := writeBundle(t, c)
	root := t.TempDir()
	var out bytes.Buffer
	err := phases.Apply(context.Background(), phases.Options{
		Bundle: path, ManifestDigest: digest, Root: root, Node: "cp9", Out: &out,
		IgnorePreflight: []string{"ports", "sandbox-image"},
		Now:             func() time.Time { return clustertest.Now.Add(-time.Hour) },
		SkipPhases:      []string{"images", "kubelet", "wait-etcd", "wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons"},
	})
	if err == nil {
		t.Fatal("preflight passed")
	}
	for _, want := range []string{
		"2 checks failed",
		"node: the bundle is for node cp1, not cp9",
		"clock: the clock reads 2026-01-02T02:04:05Z, before the cluster CA's NotBefore 2026-01-02T02:59:05Z",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("err = %v\nwant it to contain %q", err, want)
		}
	}
	if entries, _ := os.ReadDir(root); len(entries) > 1 { // the lock's directory only
		t.Errorf("preflight failure left %d entries", len(entries))
	}
	if _, err := os.Stat(hostfs.Path(root, "/etc/kubernetes")); !os.IsNotExist(err) {
		t.Error("files were written despite failed preflight")
	}
}

// TestUpgradeDryRunAndRefusal: a node whose files are v1.36.3's, given a
// v1.37.2 bundle with --dry-run, prints the upgrade plan per component
// and changes nothing; a bundle older than the node is refused as bad
// input (phases.ErrRefused, exit 2) before any phase runs.
func TestUpgradeDryRunAndRefusal(t *testing.T) {
	root := t.TempDir()
	c := clustertest.New(t, cfg)
	c.KubernetesVersion = "v1.36.3"
	path, digest, _ := writeBundle(t, c)
	if err := phases.Apply(context.Background(), opts(path, digest, root)); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, root)

	c.KubernetesVersion = "v1.37.2"
	path, digest, _ = writeBundle(t, c)
	var out bytes.Buffer
	o := phases.Options{Bundle: path, ManifestDigest: digest, Root: root, Node: "cp1", DryRun: true, Out: &out, IgnorePreflight: []string{"all"}}
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatalf("dry run: %v\n%s", err, out.String())
	}
	for _, want := range []string{
		"upgrade of node cp1: Kubernetes v1.36.3 -> v1.37.2",
		"plan: kube-apiserver           registry.k8s.io/kube-apiserver:v1.36.3 -> registry.k8s.io/kube-apiserver:v1.37.2",
		"plan: etcd                     registry.k8s.io/etcd:3.7.0-0 (unchanged)",
		"plan: kube-proxy               -> registry.k8s.io/kube-proxy:v1.37.2",
		"plan: kubelet                  v1.36.3 -> v1.37.2",
		"[upgrade-control-plane]",
		"would back up /etc/kubernetes/manifests and /var/lib/etcd under /etc/kubernetes/tmp, then swap kube-apiserver, kube-controller-manager, kube-scheduler one at a time",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the dry run does not say %q:\n%s", want, out.String())
		}
	}
	if after := snapshot(t, root); !maps.Equal(before, after) {
		t.Error("the dry run changed the host")
	}

	c.KubernetesVersion = "v1.35.9"
	path, digest, _ = writeBundle(t, c)
	o = phases.Options{Bundle: path, ManifestDigest: digest, Root: root, Node: "cp1", Out: io.Discard, IgnorePreflight: []string{"all"}}
	if err := phases.Apply(context.Background(), o); !errors.Is(err, phases.ErrRefused) || !strings.Contains(err.Error(), "does not downgrade") {
		t.Errorf("an older bundle: %v, want refused as a downgrade", err)
	}
	if after := snapshot(t, root); !maps.Equal(before, after) {
		t.Error("the refused apply changed the host")
	}
}
