package render

import (
	"bytes"
	_ "embed"
	"fmt"
	"sort"
	"strings"

	"github.com/BurntSushi/toml"
)

// Where the container runtime lives on a node. The bundle carries
// containerd's config and unit under airadm's state dir, not at their host
// paths: the runtime phase installs them only when the bundle carries
// containerd itself, so a host whose own runtime is used keeps its config.
const (
	ContainerdConfigFile = "/etc/containerd/config.toml"
	ContainerdUnitFile   = "/etc/systemd/system/containerd.service"
	RuntimeDir           = AiradmStateDir + "/runtime"
	// BundledContainerdConfig and BundledContainerdUnit are what the
	// runtime phase installs at ContainerdConfigFile and ContainerdUnitFile.
	BundledContainerdConfig = RuntimeDir + "/containerd-config.toml"
	BundledContainerdUnit   = RuntimeDir + "/containerd.service"
	// ContainerdUnitBinary is the binary the upstream unit starts, where
	// upstream's tarball unpacked at /usr/local puts it; the runtime phase
	// points the unit at the bundle's containerd if it lies elsewhere.
	ContainerdUnitBinary = "/usr/local/bin/containerd"
	CNIBinDir            = "/opt/cni/bin"
	CNIConfDir           = "/etc/cni/net.d"
	// ModulesLoadFile and SysctlFile persist the kernel prerequisites
	// kubeadm documents, so they hold after a reboot.
	ModulesLoadFile = "/etc/modules-load.d/airadm-k8s.conf"
	SysctlFile      = "/etc/sysctl.d/99-airadm-k8s.conf"
)

// KernelModules are the modules a node needs, as kubeadm's install guide
// lists them.
var KernelModules = []string{"overlay", "br_netfilter"}

// Sysctl is one kernel parameter a node needs.
type Sysctl struct {
	Key   string // dotted, as sysctl.d spells it
	Value string
	// Optional ones are reported when missing but do not fail (an IPv4
	// only kernel has no bridge-nf-call-ip6tables).
	Optional bool
	// Module is the kernel module that makes the sysctl exist, if one
	// does: net.bridge.* appear only once br_netfilter is loaded.
	Module string
}

// KernelSysctls are the parameters kubeadm's install guide sets.
func KernelSysctls() []Sysctl {
	return []Sysctl{
		{Key: "net.bridge.bridge-nf-call-iptables", Value: "1", Module: "br_netfilter"},
		{Key: "net.bridge.bridge-nf-call-ip6tables", Value: "1", Optional: true, Module: "br_netfilter"},
		{Key: "net.ipv4.ip_forward", Value: "1"},
	}
}

// ModulesLoad is ModulesLoadFile's content.
func ModulesLoad() []byte {
	return []byte("# Written by airadm apply (runtime phase); removed by airadm reset.\n" + strings.Join(KernelModules, "\n") + "\n")
}

// SysctlConf is SysctlFile's content.
func SysctlConf() []byte {
	var b strings.Builder
	b.WriteString("# Written by airadm apply (runtime phase); removed by airadm reset.\n")
	for _, s := range KernelSysctls() {
		fmt.Fprintf(&b, "%s = %s\n", s.Key, s.Value)
	}
	return []byte(b.String())
}

// ContainerdConfig is [containerd]: overrides of the rendered containerd
// config, with containerd's own names, checked against containerd's
// default config so that a misspelt key is an error.
type ContainerdConfig struct {
	Config map[string]any `toml:"config"`
}

//go:embed containerd-default.toml
var containerdDefault string

// carriesRuntime says whether node n's bundle gets containerd's config and
// unit: when its role has host binaries, or the config sets [containerd].
func (c *Cluster) carriesRuntime(n Node) bool {
	if len(c.ContainerdOverrides) > 0 {
		return true
	}
	for _, f := range c.HostFiles {
		if f.For(n.Role) {
			return true
		}
	}
	for _, a := range c.HostArchives {
		if a.For(n.Role) {
			return true
		}
	}
	return false
}

// ContainerdConfigTOML renders containerd's config.toml for node n: the
// defaults of containerd 2.4 except what must agree with the kubelet (the
// socket, the cgroup driver), the bundle's pause image pinned as the
// sandbox so nothing is pulled, and the CNI directories; then
// [containerd.config] merged over it.
func (c *Cluster) ContainerdConfigTOML(n Node) ([]byte, error) {
	kc, err := c.KubeletConfiguration(n)
	if err != nil {
		return nil, err
	}
	sock, ok := strings.CutPrefix(kc.ContainerRuntimeEndpoint, "unix://")
	if !ok {
		return nil, fmt.Errorf("the kubelet's containerRuntimeEndpoint %q is not a unix:// socket", kc.ContainerRuntimeEndpoint)
	}
	systemd := kc.CgroupDriver == "systemd"
	cfg := map[string]any{
		"version": int64(4),
		"plugins": map[string]any{
			"io.containerd.server.v1.grpc":  map[string]any{"address": sock},
			"io.containerd.server.v1.ttrpc": map[string]any{"address": sock + ".ttrpc"},
			"io.containerd.cri.v1.images": map[string]any{
				// Air-gapped: the pause image the bundle carries, so
				// containerd never tries to pull its built-in one.
				"pinned_images": map[string]any{"sandbox": c.PauseImage()},
			},
			"io.containerd.cri.v1.runtime": map[string]any{
				"containerd": map[string]any{"runtimes": map[string]any{"runc": map[string]any{
					"options": map[string]any{"SystemdCgroup": systemd},
				}}},
				"cni": map[string]any{"bin_dirs": []any{CNIBinDir}, "conf_dir": CNIConfDir},
			},
		},
	}
	mergeInto(cfg, deepCopy(c.ContainerdOverrides))
	opts := lookup(cfg, "plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes", "runc", "options", "SystemdCgroup")
	if got, ok := opts.(bool); ok && got != systemd {
		return nil, fmt.Errorf("SystemdCgroup = %v contradicts the kubelet's cgroupDriver %q; set kubelet.cgroup_driver instead", got, kc.CgroupDriver)
	}
	var b bytes.Buffer
	b.WriteString("# containerd config rendered by airadm for node " + n.Name + ".\n")
	if err := toml.NewEncoder(&b).Encode(cfg); err != nil {
		return nil, fmt.Errorf("encoding containerd config: %w", err)
	}
	return b.Bytes(), nil
}

func deepCopy(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			v = deepCopy(sub)
		}
		out[k] = v
	}
	return out
}

func lookup(m map[string]any, keys ...string) any {
	var v any = m
	for _, k := range keys {
		t, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = t[k]
	}
	return v
}

// runtimeFiles are containerd's config and unit for node n, when its
// bundle carries a runtime.
func (c *Cluster) runtimeFiles(n Node) ([]File, error) {
	if !c.carriesRuntime(n) {
		return nil, nil
	}
	cfg, err := c.ContainerdConfigTOML(n)
	if err != nil {
		return nil, err
	}
	return []File{
		{BundledContainerdConfig, 0o644, cfg},
		{BundledContainerdUnit, 0o644, []byte(containerdUnit)},
	}, nil
}

// validateContainerd checks [containerd.config] against containerd's
// default config: every key must be one containerd knows, with a value of
// the same TOML type. Open tables (runtimes, stream processors, timeouts)
// take any name, checked against their first entry's keys.
func validateContainerd(p *collector, overrides map[string]any) {
	if len(overrides) == 0 {
		return
	}
	var schema map[string]any
	if _, err := toml.Decode(containerdDefault, &schema); err != nil {
		p.add("containerd.config", "reading containerd's default config: %v", err)
		return
	}
	if _, ok := overrides["version"]; ok {
		p.add("containerd.config.version", "airadm renders version 4 configs; the version cannot be overridden")
		delete(schema, "version")
	}
	checkAgainst(p, "containerd.config", overrides, schema, "")
}

// openTables take entries of any name; each is checked against the schema
// of the named template entry.
var openTables = map[string]string{
	"plugins.io.containerd.cri.v1.runtime.containerd.runtimes": "runc",
	"stream_processors": "io.containerd.ocicrypt.decoder.v1.tar",
	"timeouts":          "",
}

func checkAgainst(p *collector, field string, over, schema map[string]any, at string) {
	keys := make([]string, 0, len(over))
	for k := range over {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := over[k]
		f := field + "." + tomlKey(k)
		here := strings.TrimPrefix(at+"."+k, ".")
		want, known := schema[k]
		if tmpl, open := openTables[at]; open {
			if tmpl == "" {
				want, known = "", true // any key, string values
			} else if !known {
				want, known = schema[tmpl], true
			}
			here = at + ".*"
		}
		if k == "version" && at == "" {
			continue
		}
		if !known {
			p.add(f, "unknown key: containerd 2.4 has no such setting")
			continue
		}
		if sub, ok := v.(map[string]any); ok {
			ws, ok := want.(map[string]any)
			if !ok {
				p.add(f, "wrong type: want %s, got a table", tomlKind(want))
				continue
			}
			checkAgainst(p, f, sub, ws, here)
			continue
		}
		if tomlKind(v) != tomlKind(want) {
			p.add(f, "wrong type: want %s, got %s", tomlKind(want), tomlKind(v))
		}
	}
}

func tomlKey(k string) string {
	if strings.ContainsAny(k, ". '\"") {
		return "'" + k + "'"
	}
	return k
}

func tomlKind(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64, int:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case []any, []map[string]any:
		return "an array"
	case map[string]any:
		return "a table"
	}
	return fmt.Sprintf("%T", v)
}

// containerdUnit is containerd's upstream systemd unit
// (containerd/containerd v2.4.2, containerd.service).
const containerdUnit = `# Copyright The containerd Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

[Unit]
Description=containerd container runtime
Documentation=https://containerd.io
After=network.target dbus.service

[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/local/bin/containerd

Type=notify
Delegate=yes
KillMode=process
Restart=always
RestartSec=5

# Having non-zero Limit*s causes performance problems due to accounting overhead
# in the kernel. We recommend using cgroups to do container-local accounting.
LimitNPROC=infinity
LimitCORE=infinity

# Comment TasksMax if your systemd version does not supports it.
# Only systemd 226 and above support this version.
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
`

// ContainerdBinaries are the paths where a bundle's containerd may lie:
// upstream's tarball at /usr/local, or a distribution's layout.
func ContainerdBinaries() []string {
	return []string{"/usr/local/bin/containerd", "/usr/bin/containerd", "/usr/local/sbin/containerd", "/usr/sbin/containerd"}
}

// runtimePath says why a host file may not lie at p, or "": the runtime
// phase installs or writes these files itself. containerd's unit is not
// among them: a bundle may carry its own, which the phase then uses.
func runtimePath(p string) string {
	for _, f := range []string{ContainerdConfigFile, ModulesLoadFile, SysctlFile} {
		if p == f {
			return p + " is installed by the runtime phase from what airadm renders"
		}
		if strings.HasPrefix(f, p+"/") {
			return fmt.Sprintf("%s would hide %s, which the runtime phase installs", p, f)
		}
	}
	return ""
}
