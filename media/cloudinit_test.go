package media

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/render"
)

// seedCluster has a node for each way of naming the network.
const seedCluster = `
name = "dc1"
control_plane_endpoint = "10.0.0.10:6443"

[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"

[[nodes]]
name = "w1"
role = "worker"
address = "10.0.0.21"
prefix = 16
gateway = "10.0.255.254"
nameservers = ["10.0.0.2", "10.0.0.3"]
interface = "52:54:00:AB:CD:EF"

[[nodes]]
name = "w2"
role = "worker"
address = "10.0.0.22"
gateway = "10.0.0.1"
interface = "ens3"

[[nodes]]
name = "w6"
role = "worker"
address = "fd00::26"
gateway = "fd00::1"
nameservers = ["fd00::53"]
interface = "en*"
`

const seedDigest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// TestSeedGolden pins each node's three NoCloud files; regenerate with
// go test ./media -update and review the diff.
func TestSeedGolden(t *testing.T) {
	c, err := render.Parse("seed.toml", []byte(seedCluster))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes {
		s := Seed(c, n, seedDigest)
		for name, got := range map[string][]byte{"meta-data": s.MetaData, "network-config": s.NetworkConfig, "user-data": s.UserData} {
			var v map[string]any
			if err := yaml.Unmarshal(got, &v); err != nil {
				t.Errorf("%s %s is not YAML: %v", n.Name, name, err)
			}
			golden := filepath.Join("testdata", "golden", n.Name+"."+name)
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./media -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from %s (go test ./media -update, then review):\n%s", name, golden, got)
			}
		}
	}
}

// TestCloudInitAcceptsSeed runs Debian's cloud-init on every golden seed:
// the schema check of user-data, and net-convert of network-config to
// systemd-networkd and netplan, checking what networkd would be told.
func TestCloudInitAcceptsSeed(t *testing.T) {
	ci := need(t, "cloud-init", "cloud-init")
	c, err := render.Parse("seed.toml", []byte(seedCluster))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"cp1": {"Name=e*", "Address=10.0.0.11/24"},
		"w1":  {"Name=*", "MACAddress=52:54:00:ab:cd:ef", "Address=10.0.0.21/16", "Destination=0.0.0.0/0", "Gateway=10.0.255.254", "DNS=10.0.0.2 10.0.0.3"},
		"w2":  {"Name=ens3", "Address=10.0.0.22/24", "Gateway=10.0.0.1"},
		"w6":  {"Name=en*", "Address=fd00::26/64", "Gateway=fd00::1", "DNS=fd00::53"},
	}
	for _, n := range c.Nodes {
		t.Run(n.Name, func(t *testing.T) {
			dir := t.TempDir()
			s := Seed(c, n, seedDigest)
			os.WriteFile(filepath.Join(dir, "user-data"), s.UserData, 0o644)
			os.WriteFile(filepath.Join(dir, "network-config"), s.NetworkConfig, 0o644)
			out := run(t, dir, ci, "schema", "-c", "user-data")
			if !strings.Contains(out, "Valid cloud-config") {
				t.Errorf("cloud-init schema: %s", out)
			}
			run(t, dir, ci, "devel", "net-convert", "-p", "network-config", "-k", "yaml", "-d", "networkd", "-D", "debian", "-O", "networkd")
			files, _ := filepath.Glob(filepath.Join(dir, "networkd", "etc", "systemd", "network", "*.network"))
			if len(files) != 1 {
				t.Fatalf("net-convert wrote %v, want one .network file", files)
			}
			got, _ := os.ReadFile(files[0])
			for _, w := range want[n.Name] {
				if !strings.Contains(string(got), w+"\n") {
					t.Errorf("networkd config lacks %q:\n%s", w, got)
				}
			}
			run(t, dir, ci, "devel", "net-convert", "-p", "network-config", "-k", "yaml", "-d", "netplan", "-D", "debian", "-O", "netplan")
		})
	}
}

// TestCloudInitRejectsRouteToDefault keeps the reason for 0.0.0.0/0 in
// view: cloud-init 22.4 refuses "to: default".
func TestCloudInitRejectsRouteToDefault(t *testing.T) {
	ci := need(t, "cloud-init", "cloud-init")
	c, err := render.Parse("seed.toml", []byte(seedCluster))
	if err != nil {
		t.Fatal(err)
	}
	n, _ := c.Node("w2")
	dir := t.TempDir()
	bad := strings.Replace(string(Seed(c, n, seedDigest).NetworkConfig), `"0.0.0.0/0"`, "default", 1)
	os.WriteFile(filepath.Join(dir, "network-config"), []byte(bad), 0o644)
	cmd := exec.Command(ci, "devel", "net-convert", "-p", "network-config", "-k", "yaml", "-d", "out", "-D", "debian", "-O", "networkd")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Errorf("cloud-init accepted to: default:\n%s", out)
	}
}
