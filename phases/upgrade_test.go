package phases

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"airadm.dev/airadm/render"
)

// TestSkewPolicy is kubeadm's policy.go as airadm applies it to a node:
// one minor per step, no downgrade; the same version is no upgrade.
func TestSkewPolicy(t *testing.T) {
	for _, c := range []struct {
		from, to string
		upgrade  bool
		refused  string
	}{
		{"", "v1.37.2", false, ""},
		{"v1.37.2", "v1.37.2", false, ""},
		{"v1.36.3", "v1.37.2", true, ""},
		{"v1.37.0", "v1.37.2", true, ""},
		{"v1.35.9", "v1.37.2", false, "one minor version at a time; apply a bundle of v1.36.x first"},
		{"v1.37.2", "v1.36.3", false, "does not downgrade"},
		{"v1.37.2", "v1.37.1", false, "does not downgrade"},
	} {
		u, err := SkewPolicy(c.from, c.to)
		if c.refused != "" {
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), c.refused) {
				t.Errorf("%s -> %s: %v, want refused: %s", c.from, c.to, err, c.refused)
			}
			continue
		}
		if err != nil || (u != nil) != c.upgrade {
			t.Errorf("%s -> %s: %+v, %v; want upgrade=%v", c.from, c.to, u, err, c.upgrade)
		}
	}
}

// TestUpgradePlan: an upgrade imports images before it writes anything,
// swaps the static pods before the API steps, restarts the kubelet last,
// and does no TLS bootstrap; a first install has no upgrade step.
func TestUpgradePlan(t *testing.T) {
	names := func(role render.Role, upgrade bool) string {
		p, err := plan(role, upgrade, nil, "")
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, ph := range p {
			out = append(out, ph.Name)
		}
		return strings.Join(out, ",")
	}
	for _, c := range []struct {
		role    render.Role
		upgrade bool
		want    string
	}{
		{render.ControlPlane, false, "preflight,files,runtime,images,etcd-join,kubelet,wait-etcd,wait-control-plane,upload-config,mark-control-plane,bootstrap-token,addons"},
		{render.ControlPlane, true, "preflight,images,files,runtime,upgrade-control-plane,wait-control-plane,upload-config,mark-control-plane,bootstrap-token,addons,kubelet"},
		{render.Worker, false, "preflight,files,runtime,images,kubelet,tls-bootstrap"},
		{render.Worker, true, "preflight,images,files,runtime,kubelet"},
	} {
		if got := names(c.role, c.upgrade); got != c.want {
			t.Errorf("%s upgrade=%v:\n got %s\nwant %s", c.role, c.upgrade, got, c.want)
		}
	}
}

func TestHeldBack(t *testing.T) {
	for p, want := range map[string]bool{
		"/etc/kubernetes/manifests/kube-apiserver.yaml": true,
		render.KubeletConfigFile:                        true,
		render.KubeletFlagsFile:                         true,
		"/usr/local/bin/kubelet":                        true,
		"/usr/bin/kubelet":                              true,
		"/etc/kubernetes/pki/ca.crt":                    false,
		"/etc/kubernetes/admin.conf":                    false,
		render.AddonsFile:                               false,
	} {
		if heldBack(p) != want {
			t.Errorf("heldBack(%s) = %v", p, !want)
		}
	}
	if heldBackKubelet("/etc/kubernetes/manifests/etcd.yaml") {
		t.Error("the kubelet step writes a static pod manifest")
	}
}

func TestTagOf(t *testing.T) {
	for in, want := range map[string]string{
		"registry.k8s.io/kube-apiserver:v1.36.3":    "v1.36.3",
		"127.0.0.1:5000/k8s/kube-apiserver:v1.37.2": "v1.37.2",
		"127.0.0.1:5000/k8s/kube-apiserver":         "",
	} {
		if got := tagOf(in); got != want {
			t.Errorf("tagOf(%s) = %q, want %q", in, got, want)
		}
	}
}

// TestBackupDirOwnerOnly: the etcd data backup holds the cluster's
// Secrets, so the copy is the owner's alone whatever the umask.
func TestBackupDirOwnerOnly(t *testing.T) {
	src := filepath.Join(t.TempDir(), "etcd")
	os.MkdirAll(filepath.Join(src, "member", "snap"), 0o755)
	os.WriteFile(filepath.Join(src, "member", "snap", "db"), []byte("secrets"), 0o644)
	dst := filepath.Join(t.TempDir(), "tmp", "kubeadm-backup-etcd-x")
	if err := backupDir(src, dst); err != nil {
		t.Fatal(err)
	}
	filepath.WalkDir(filepath.Dir(dst), func(p string, d fs.DirEntry, err error) error {
		info, _ := d.Info()
		if want := fs.FileMode(0o600); d.IsDir() && info.Mode().Perm() != 0o700 || !d.IsDir() && info.Mode().Perm() != want {
			t.Errorf("%s is %v", p, info.Mode())
		}
		return nil
	})
	if b, _ := os.ReadFile(filepath.Join(dst, "member", "snap", "db")); string(b) != "secrets" {
		t.Errorf("the copy holds %q", b)
	}
	if err := restoreDir(dst, src); err != nil {
		t.Fatal(err)
	}
	if info, _ := os.Stat(src); info.Mode().Perm() != 0o700 {
		t.Errorf("the restored data dir is %v", info.Mode())
	}
}
