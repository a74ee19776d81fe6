package phases

import (
	"bytes"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
)

const stackedConfig = `name = "stacked"
control_plane_endpoint = "10.0.0.10:6443"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
[[nodes]]
name = "cp2"
role = "control-plane"
address = "10.0.0.12"
[[nodes]]
name = "cp3"
role = "control-plane"
address = "10.0.0.13"
`

func bundleFiles(t *testing.T, c *clustertest.Cluster, node string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for p, f := range c.Files(t, node) {
		files[p] = f.Data
	}
	return files
}

func TestEtcdLayoutOfABundle(t *testing.T) {
	c := clustertest.New(t, stackedConfig)
	l, err := etcdLayoutOf(bundleFiles(t, c, "cp2"))
	if err != nil {
		t.Fatal(err)
	}
	if l.name != "cp2" || l.peerURL != "https://10.0.0.12:2380" || l.clientURL != "https://10.0.0.12:2379" {
		t.Errorf("layout = %s %s %s", l.name, l.peerURL, l.clientURL)
	}
	want := []etcdMember{{"cp1", "https://10.0.0.11:2380"}, {"cp2", "https://10.0.0.12:2380"}, {"cp3", "https://10.0.0.13:2380"}}
	if !slices.Equal(l.members, want) {
		t.Errorf("members = %v, want %v", l.members, want)
	}
	if got := l.others(); len(got) != 2 || got[0].Name != "cp1" || got[1].clientURL() != "https://10.0.0.13:2379" {
		t.Errorf("others = %v", got)
	}
	if l, err := etcdLayoutOf(map[string][]byte{}); l != nil || err != nil {
		t.Errorf("no manifest: %v, %v", l, err)
	}
}

// The rejoin manifest is the bundle's with only the initial cluster
// changed, as kubeadm's join writes it.
func TestRejoinManifest(t *testing.T) {
	c := clustertest.New(t, stackedConfig)
	files := bundleFiles(t, c, "cp2")
	l, err := etcdLayoutOf(files)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	r := fakeRun(t, &out)
	if err := os.MkdirAll(hostfs.Path(r.Root, "/etc/kubernetes/manifests"), 0o700); err != nil {
		t.Fatal(err)
	}
	members := []etcdMember{{"cp1", "https://10.0.0.11:2380"}, {"cp2", "https://10.0.0.12:2380"}, {"cp3", "https://10.0.0.13:2380"}}
	if err := r.writeRejoinManifest(l, members); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(hostfs.Path(r.Root, etcdManifest))
	if err != nil {
		t.Fatal(err)
	}
	var got, orig corev1.Pod
	if err := yaml.UnmarshalStrict(b, &got); err != nil {
		t.Fatal(err)
	}
	yaml.Unmarshal(files[etcdManifest], &orig)
	var added, removed []string
	for _, a := range got.Spec.Containers[0].Command {
		if !slices.Contains(orig.Spec.Containers[0].Command, a) {
			added = append(added, a)
		}
	}
	for _, a := range orig.Spec.Containers[0].Command {
		if !slices.Contains(got.Spec.Containers[0].Command, a) {
			removed = append(removed, a)
		}
	}
	// The static list holds the same members here, so only the state is new.
	if !slices.Equal(added, []string{"--initial-cluster-state=existing"}) || len(removed) != 0 {
		t.Errorf("added %q, removed %q", added, removed)
	}
	got.Spec.Containers[0].Command, orig.Spec.Containers[0].Command = nil, nil
	a, _ := yaml.Marshal(got)
	o, _ := yaml.Marshal(orig)
	if !bytes.Equal(a, o) {
		t.Errorf("the rest of the manifest changed:\n%s\nwant\n%s", a, o)
	}
}

func TestDescribeEtcdStatuses(t *testing.T) {
	status := func(id, leader uint64) *clientv3.StatusResponse {
		return &clientv3.StatusResponse{Header: &etcdserverpb.ResponseHeader{MemberId: id}, Leader: leader}
	}
	down := errors.New("connection refused")
	m := func(name string) etcdMember { return etcdMember{Name: name} }
	for _, tt := range []struct {
		st   []memberStatus
		want string
	}{
		{[]memberStatus{{m("cp1"), nil, down}, {m("cp2"), nil, down}}, "cp1, cp2 not (yet)"},
		{[]memberStatus{{m("cp1"), status(1, 0), nil}, {m("cp2"), nil, down}, {m("cp3"), nil, down}}, "cp1 answers; cp2, cp3 not (yet)"},
		{[]memberStatus{{m("cp1"), status(1, 2), nil}, {m("cp2"), status(2, 2), nil}, {m("cp3"), nil, down}}, "cp1, cp2 answer; leader cp2; cp3 not (yet)"},
	} {
		if _, got := describeStatuses(tt.st); got != tt.want {
			t.Errorf("describe = %q, want %q", got, tt.want)
		}
	}
}

func TestEtcdJoinOfASingleMemberAsksNoOne(t *testing.T) {
	c := clustertest.New(t, `name = "one"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
`)
	var out bytes.Buffer
	r := fakeRun(t, &out)
	r.files = bundleFiles(t, c, "cp1")
	if err := runEtcdJoin(t.Context(), r); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "single etcd member cp1") {
		t.Errorf("output: %s", out.String())
	}
}
