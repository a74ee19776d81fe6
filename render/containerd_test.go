package render_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"

	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/render"
)

// runtimeCluster carries host binaries, so its bundles get containerd's
// config; w1 runs its kubelet with cgroupfs and adds a VM setting.
const runtimeCluster = `
name = "rt"

[[host.archives]]
dir = "/usr/local"
source = "containerd-2.4.2-linux-amd64.tar.gz"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[containerd.config.plugins.'io.containerd.cri.v1.runtime']
restrict_oom_score_adj = true

[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"

[[nodes]]
name = "w1"
role = "worker"
address = "10.0.0.21"
kubelet_config = { cgroupDriver = "cgroupfs" }
`

// TestContainerdConfigGolden pins the rendered containerd config and unit
// byte for byte, and checks what must agree with the kubelet.
func TestContainerdConfigGolden(t *testing.T) {
	c := clustertest.New(t, runtimeCluster)
	for _, tc := range []struct {
		node    string
		systemd bool
	}{{"cp1", true}, {"w1", false}} {
		t.Run(tc.node, func(t *testing.T) {
			files := c.Files(t, tc.node)
			cfg, ok := files[render.BundledContainerdConfig]
			if !ok {
				t.Fatalf("no %s in the node's files", render.BundledContainerdConfig)
			}
			golden(t, filepath.Join("testdata/golden/containerd", tc.node+".toml"), cfg.Data)
			golden(t, "testdata/golden/containerd/containerd.service", files[render.BundledContainerdUnit].Data)
			var m struct {
				Plugins struct {
					Images struct {
						Pinned struct{ Sandbox string } `toml:"pinned_images"`
					} `toml:"io.containerd.cri.v1.images"`
					Runtime struct {
						Restrict   bool `toml:"restrict_oom_score_adj"`
						Containerd struct {
							Runtimes struct {
								Runc struct {
									Options struct{ SystemdCgroup bool }
								} `toml:"runc"`
							} `toml:"runtimes"`
						} `toml:"containerd"`
					} `toml:"io.containerd.cri.v1.runtime"`
					GRPC struct{ Address string } `toml:"io.containerd.server.v1.grpc"`
				} `toml:"plugins"`
			}
			if _, err := toml.Decode(string(cfg.Data), &m); err != nil {
				t.Fatal(err)
			}
			if got := m.Plugins.Images.Pinned.Sandbox; got != c.PauseImage() {
				t.Errorf("sandbox = %s, want the bundle's pause %s", got, c.PauseImage())
			}
			if got := m.Plugins.Runtime.Containerd.Runtimes.Runc.Options.SystemdCgroup; got != tc.systemd {
				t.Errorf("SystemdCgroup = %v, want %v (the kubelet's cgroup driver)", got, tc.systemd)
			}
			if !m.Plugins.Runtime.Restrict {
				t.Error("the [containerd.config] override was not merged")
			}
			if got := "unix://" + m.Plugins.GRPC.Address; got != render.DefaultCRISocket {
				t.Errorf("grpc address %s, want the kubelet's endpoint %s", got, render.DefaultCRISocket)
			}
		})
	}
}

// TestContainerdLoadsConfig: the real containerd of the pinned version
// loads each rendered config with no error (`containerd config dump`
// merges and validates it without starting anything), and its sandbox is
// the bundle's pause image. The CRI plugin's status is checked where the
// runtime phase starts containerd (phases.TestRuntimePhase).
func TestContainerdLoadsConfig(t *testing.T) {
	bin, err := k8sbin.Path("containerd")
	if err != nil {
		t.Fatal(err)
	}
	c := clustertest.New(t, runtimeCluster)
	for _, node := range []string{"cp1", "w1"} {
		t.Run(node, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.toml")
			if err := os.WriteFile(path, c.Files(t, node)[render.BundledContainerdConfig].Data, 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(bin, "--config", path, "config", "dump")
			var stderr strings.Builder
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("containerd config dump: %v\n%s", err, stderr.String())
			}
			for _, l := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
				if l != "" && !strings.Contains(l, "cgroup v1") {
					t.Errorf("containerd says: %s", l)
				}
			}
			if want := "sandbox = '" + c.PauseImage() + "'"; !strings.Contains(string(out), want) {
				t.Errorf("the dumped config lacks %q", want)
			}
		})
	}
}
