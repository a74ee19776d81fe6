package controlplane_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/controlplane"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
)

// startEtcd runs node's etcd from the manifest on its root, as the
// kubelet would; members after the first leave 127.0.0.1 to the first.
func startEtcd(t *testing.T, p *controlplane.Plane, n render.Node, first bool) *controlplane.Process {
	t.Helper()
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(p.File(n.Name, render.ManifestsDir+"/etcd.yaml"), &pod); err != nil {
		t.Fatal(err)
	}
	bin, err := k8sbin.Path("etcd")
	if err != nil {
		t.Fatal(err)
	}
	root := p.NodeRoot(n.Name)
	var args []string
	for _, a := range pod.Spec.Containers[0].Command[1:] {
		a = strings.ReplaceAll(a, render.KubernetesDir+"/", root+render.KubernetesDir+"/")
		a = strings.ReplaceAll(a, "="+render.EtcdDataDir, "="+root+render.EtcdDataDir)
		if !first {
			a = strings.ReplaceAll(a, "https://127.0.0.1:2379,", "")
			a = strings.ReplaceAll(a, "http://127.0.0.1:2381", "http://"+n.Address.String()+":2381")
		}
		args = append(args, a)
	}
	return p.Run("etcd-"+n.Name, bin, args...)
}

// A stacked member whose data is gone rejoins through airadm's etcd-join
// and wait-etcd phases, with no etcdctl: removed, added back as a learner,
// started with --initial-cluster-state existing, promoted.
func TestEtcdMemberRejoins(t *testing.T) {
	c := clustertest.New(t, `name = "rejoin"
control_plane_endpoint = "127.0.1.31:6443"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.31"
[[nodes]]
name = "cp2"
role = "control-plane"
address = "127.0.1.32"
[[nodes]]
name = "cp3"
role = "control-plane"
address = "127.0.1.33"
`)
	p := controlplane.New(t, c)
	p.Render()
	cps := c.ControlPlanes()
	ctx := context.Background()
	apply := func(node, phase string) string {
		t.Helper()
		path, digest := c.Bundle(t, node, nil, nil)
		var log bytes.Buffer
		o := phases.Options{Bundle: path, ManifestDigest: digest, Root: p.NodeRoot(node), Node: node, Out: &log, Only: phase, Timeout: controlplane.StartTimeout}
		if err := phases.Apply(ctx, o); err != nil {
			t.Fatalf("%s on %s: %v\n%s", phase, node, err, log.String())
		}
		return log.String()
	}

	// A first start: nobody answers yet, so the static cluster is used.
	if out := apply("cp3", "etcd-join"); !strings.Contains(out, "a first start") {
		t.Errorf("etcd-join before any member runs:\n%s", out)
	}
	procs := map[string]*controlplane.Process{}
	for i, n := range cps {
		procs[n.Name] = startEtcd(t, p, n, i == 0)
	}
	if out := apply("cp1", "wait-etcd"); !strings.Contains(out, "etcd quorum after") {
		t.Errorf("wait-etcd on cp1:\n%s", out)
	}

	// cp3 loses power and its disk.
	procs["cp3"].Kill()
	if err := os.RemoveAll(hostfs.Path(p.NodeRoot("cp3"), render.EtcdDataDir)); err != nil {
		t.Fatal(err)
	}
	out := apply("cp3", "etcd-join")
	t.Logf("etcd-join on cp3 after losing its data:\n%s", out)
	if !strings.Contains(out, "ran before and its data is gone") || !strings.Contains(out, "rejoins as a learner") {
		t.Errorf("etcd-join on cp3 after losing its data:\n%s", out)
	}
	manifest := string(p.File("cp3", render.ManifestsDir+"/etcd.yaml"))
	if !strings.Contains(manifest, "--initial-cluster-state=existing") {
		t.Errorf("cp3's manifest does not join the existing cluster:\n%s", manifest)
	}
	startEtcd(t, p, cps[2], false)
	out = apply("cp3", "wait-etcd")
	t.Logf("wait-etcd on cp3 after the rejoin:\n%s", out)
	if !strings.Contains(out, "promoted cp3") || !strings.Contains(out, "cp3 rejoined") {
		t.Errorf("wait-etcd on cp3:\n%s", out)
	}
	// Once it has data, a re-run leaves it alone.
	if out := apply("cp3", "etcd-join"); !strings.Contains(out, "holds member cp3's data") {
		t.Errorf("etcd-join on a member with data:\n%s", out)
	}

	etcdctl, err := k8sbin.Path("etcdctl")
	if err != nil {
		t.Fatal(err)
	}
	root := p.NodeRoot("cp1")
	b, err := exec.Command(etcdctl, "--endpoints=https://127.0.1.31:2379",
		"--cacert="+hostfs.Path(root, render.PKIDir+"/etcd/ca.crt"),
		"--cert="+hostfs.Path(root, render.PKIDir+"/etcd/healthcheck-client.crt"),
		"--key="+hostfs.Path(root, render.PKIDir+"/etcd/healthcheck-client.key"),
		"member", "list", "-w", "json").CombinedOutput()
	if err != nil {
		t.Fatalf("etcdctl member list: %v\n%s", err, b)
	}
	var list struct {
		Members []struct {
			Name       string   `json:"name"`
			ClientURLs []string `json:"clientURLs"`
			IsLearner  bool     `json:"isLearner"`
		} `json:"members"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	started := 0
	for _, m := range list.Members {
		if m.Name != "" && len(m.ClientURLs) > 0 && !m.IsLearner {
			started++
		}
	}
	if len(list.Members) != 3 || started != 3 {
		t.Errorf("members after the rejoin: %s", b)
	}
}
