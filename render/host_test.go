package render

import (
	"io/fs"
	"path"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func TestHostDefaultsAndSources(t *testing.T) {
	c, err := Parse("/etc/airadm/cluster.toml", []byte(`
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"

[[host.files]]
path = "/usr/bin/kubelet"
source = "https://dl.k8s.io/release/v1.37.2/bin/linux/amd64/kubelet"
sha256 = "CA227DCCA6E37FC2A0F29AFFE287AE240884E2B76F08A903FBB92E375B3E9DAC"

[[host.files]]
path = "/usr/local/sbin/runc"
source = "bin/runc.amd64"
sha256 = "ca227dcca6e37fc2a0f29affe287ae240884e2b76f08a903fbb92e375b3e9dac"
mode = "0700"
roles = ["worker"]

[[host.archives]]
dir = "/"
source = "/srv/cni.tgz"
sha256 = "ca227dcca6e37fc2a0f29affe287ae240884e2b76f08a903fbb92e375b3e9dac"
strip = 1
`))
	if err != nil {
		t.Fatal(err)
	}
	const sum = "ca227dcca6e37fc2a0f29affe287ae240884e2b76f08a903fbb92e375b3e9dac"
	for _, tc := range []struct {
		name  string
		got   HostFile
		want  HostFile
		roles []Role
	}{
		{"url", c.HostFiles[0], HostFile{Path: "/usr/bin/kubelet", HostSource: HostSource{"https://dl.k8s.io/release/v1.37.2/bin/linux/amd64/kubelet", sum}, Mode: 0o755}, []Role{ControlPlane, Worker}},
		{"relative", c.HostFiles[1], HostFile{Path: "/usr/local/sbin/runc", HostSource: HostSource{"/etc/airadm/bin/runc.amd64", sum}, Mode: fs.FileMode(0o700)}, []Role{Worker}},
	} {
		got := tc.got
		if got.Path != tc.want.Path || got.HostSource != tc.want.HostSource || got.Mode != tc.want.Mode || !slices.Equal(got.Roles, tc.roles) {
			t.Errorf("%s: got %+v, want %+v with roles %v", tc.name, got, tc.want, tc.roles)
		}
	}
	if c.HostFiles[1].For(ControlPlane) || !c.HostFiles[1].For(Worker) {
		t.Error("a worker-only file is for the wrong roles")
	}
	a := c.HostArchives[0]
	if a.Dir != "/" || a.Location != "/srv/cni.tgz" || a.Strip != 1 || !a.For(ControlPlane) {
		t.Errorf("archive = %+v", a)
	}
}

func TestReservedHostPath(t *testing.T) {
	for p, reserved := range map[string]bool{
		"/etc/kubernetes":                        true,
		"/etc/kubernetes/admin.conf":             true,
		"/etc/kubernetesX":                       false,
		"/var/lib":                               true, // would hide /var/lib/kubelet
		"/etc/systemd/system/kubelet.service":    true,
		"/etc/systemd/system/containerd.service": false, // a bundle may carry its own
		"/etc/containerd/config.toml":            true,
		"/etc/containerd":                        true, // would hide config.toml
		"/etc/containerd/certs.d/x":              false,
		"/etc/sysctl.d/99-airadm-k8s.conf":       true,
		"/usr/bin/kubelet":                       false,
	} {
		if got := ReservedHostPath(p) != ""; got != reserved {
			t.Errorf("ReservedHostPath(%s) reserved = %v, want %v", p, got, reserved)
		}
	}
}

// TestTemplateHostSection: the init template's commented [host] section,
// uncommented with digests filled in, validates, and its Kubernetes URLs
// name the pinned version.
func TestTemplateHostSection(t *testing.T) {
	i := strings.Index(Template, "# Host binaries")
	if i < 0 {
		t.Fatal("the template has no host binaries section")
	}
	var b strings.Builder
	b.WriteString(Template[:i])
	for _, l := range strings.Split(Template[i:], "\n") {
		if s, ok := strings.CutPrefix(l, "# "); ok && (strings.HasPrefix(s, "[[") || strings.Contains(s, " = ")) {
			l = regexp.MustCompile(`"<[^>]*>"`).ReplaceAllString(s, `"`+strings.Repeat("0", 64)+`"`)
		}
		b.WriteString(l + "\n")
	}
	c, err := Parse("template", []byte(b.String()))
	if err != nil {
		t.Fatalf("the uncommented host section does not validate: %v", err)
	}
	if len(c.HostFiles) != 3 || len(c.HostArchives) != 3 {
		t.Fatalf("uncommented: %d host files and %d archives, want 3 and 3", len(c.HostFiles), len(c.HostArchives))
	}
	for _, f := range c.HostFiles[:2] {
		if want := "https://dl.k8s.io/release/" + KubernetesVersion + "/bin/linux/amd64/" + path.Base(f.Path); f.Location != want {
			t.Errorf("%s: source %s, want %s", f.Path, f.Location, want)
		}
	}
}
