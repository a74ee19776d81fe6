package render

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// Config is cluster.toml exactly as written; Validate turns it into a Cluster.
// Every key that a file may hold is a field here: anything else is an error.
type Config struct {
	Name                 string           `toml:"name"`
	KubernetesVersion    string           `toml:"kubernetes_version"`
	ControlPlaneEndpoint string           `toml:"control_plane_endpoint"`
	Network              NetworkConfig    `toml:"network"`
	PKI                  PKIConfig        `toml:"pki"`
	Images               ImagesConfig     `toml:"images"`
	Join                 JoinConfig       `toml:"join"`
	Kubelet              KubeletConfig    `toml:"kubelet"`
	Addons               AddonsConfig     `toml:"addons"`
	Host                 HostConfig       `toml:"host"`
	Containerd           ContainerdConfig `toml:"containerd"`
	Nodes                []NodeConfig     `toml:"nodes"`
}

type NetworkConfig struct {
	PodSubnet     string `toml:"pod_subnet"`
	ServiceSubnet string `toml:"service_subnet"`
	DNSDomain     string `toml:"dns_domain"`
}

type PKIConfig struct {
	Algorithm    string   `toml:"algorithm"`
	CertValidity string   `toml:"cert_validity"`
	CAValidity   string   `toml:"ca_validity"`
	RenewBefore  string   `toml:"renew_before"`
	ExtraSANs    []string `toml:"extra_sans"`
}

type ImagesConfig struct {
	Repository string   `toml:"repository"`
	Extra      []string `toml:"extra"`
	Platform   string   `toml:"platform"`
	Layout     string   `toml:"layout"`
}

type JoinConfig struct {
	TokenTTL string `toml:"token_ttl"`
}

// KubeletConfig holds the few kubelet settings that differ between hosts
// kinds; everything else follows kubeadm.
type KubeletConfig struct {
	CgroupDriver string `toml:"cgroup_driver"`
	CRISocket    string `toml:"cri_socket"`
	// Config is merged into the KubeletConfiguration, with kubelet's own
	// field names: the escape hatch kubeadm offers as kubelet patches.
	Config map[string]any `toml:"config"`
}

// AddonsConfig names extra manifests (a CNI, say) that control planes
// apply after CoreDNS and kube-proxy; paths are relative to the config.
type AddonsConfig struct {
	Manifests []string `toml:"manifests"`
	// StaticPods are Pod manifests every control plane's kubelet runs
	// beside kubeadm's four (a VIP such as kube-vip, say).
	StaticPods []string `toml:"static_pods"`
}

type NodeConfig struct {
	Name    string `toml:"name"`
	Role    string `toml:"role"`
	Address string `toml:"address"`
	// KubeletConfig is merged after [kubelet.config], for this node only.
	KubeletConfig map[string]any `toml:"kubelet_config"`
	// Prefix, Gateway, Nameservers and Interface describe the node's own
	// network for first-boot media (airadm media cidata); render's files
	// do not depend on them.
	Prefix      *int     `toml:"prefix"`
	Gateway     string   `toml:"gateway"`
	Nameservers []string `toml:"nameservers"`
	Interface   string   `toml:"interface"`
	// Recipient, an age X25519 recipient or the host's SSH ed25519 public
	// key, makes build encrypt the node's secrets to it.
	Recipient string `toml:"recipient"`
}

// Problem is one thing wrong with a config file, located as precisely as the
// file allows.
type Problem struct {
	Line  int    // 1-based; 0 when the problem has no single line
	Field string // dotted key path such as nodes[1].address; empty for the whole file
	Msg   string
}

// ConfigError carries every problem found in one config file.
type ConfigError struct {
	File     string
	Problems []Problem
}

func (e *ConfigError) Error() string {
	return strings.Join(e.Lines(), "; ")
}

// Lines renders each problem on a line of its own as file:line: field: message.
func (e *ConfigError) Lines() []string {
	out := make([]string, 0, len(e.Problems))
	for _, p := range e.Problems {
		loc := e.File
		if p.Line > 0 {
			loc = fmt.Sprintf("%s:%d", e.File, p.Line)
		}
		if p.Field != "" {
			out = append(out, fmt.Sprintf("%s: %s: %s", loc, p.Field, p.Msg))
		} else {
			out = append(out, fmt.Sprintf("%s: %s", loc, p.Msg))
		}
	}
	return out
}

// Load reads, strictly decodes and validates a cluster.toml, and reads the
// addon manifests it names.
func Load(path string) (*Cluster, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	c, err := Parse(path, data)
	if err != nil {
		return nil, err
	}
	lines := keyLines(string(data))
	var problems []Problem
	// read reads a file the config names, relative to the config's own
	// directory, or records why it cannot.
	read := func(field, name string) ([]byte, bool) {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(filepath.Dir(path), p)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			problems = append(problems, Problem{Line: lineOf(lines, field), Field: field, Msg: err.Error()})
			return nil, false
		}
		return b, true
	}
	for i, m := range c.addonPaths {
		field := fmt.Sprintf("addons.manifests[%d]", i)
		b, ok := read(field, m)
		if !ok {
			continue
		}
		if err := checkManifests(b); err != nil {
			problems = append(problems, Problem{Line: lineOf(lines, field), Field: field, Msg: fmt.Sprintf("%s: %v", m, err)})
			continue
		}
		c.AddonManifests = append(c.AddonManifests, Manifest{Name: fmt.Sprintf("%02d-%s", i, filepath.Base(m)), Data: b})
	}
	seen := map[string]bool{"etcd": true, "kube-apiserver": true, "kube-controller-manager": true, "kube-scheduler": true}
	for i, m := range c.staticPodPaths {
		field := fmt.Sprintf("addons.static_pods[%d]", i)
		b, ok := read(field, m)
		if !ok {
			continue
		}
		name, err := checkStaticPod(b)
		if err == nil && seen[name] {
			err = fmt.Errorf("a static pod named %s is already in the bundle", name)
		}
		if err != nil {
			problems = append(problems, Problem{Line: lineOf(lines, field), Field: field, Msg: fmt.Sprintf("%s: %v", m, err)})
			continue
		}
		seen[name] = true
		c.StaticPods = append(c.StaticPods, Manifest{Name: name + ".yaml", Data: b})
	}
	if len(problems) > 0 {
		return nil, &ConfigError{File: path, Problems: problems}
	}
	return c, nil
}

// checkStaticPod requires one v1 Pod that the kubelet can read, and
// returns its name, which names its file in the manifests directory.
func checkStaticPod(b []byte) (string, error) {
	docs := SplitYAML(b)
	if len(docs) != 1 {
		return "", fmt.Errorf("holds %d YAML documents; a static pod file holds one Pod", len(docs))
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(docs[0], &pod); err != nil {
		return "", err
	}
	if pod.APIVersion != "v1" || pod.Kind != "Pod" {
		return "", fmt.Errorf("is %s %s, not a v1 Pod", pod.APIVersion, pod.Kind)
	}
	if len(validation.IsDNS1123Subdomain(pod.Name)) > 0 {
		return "", fmt.Errorf("metadata.name %q is not a DNS-1123 subdomain", pod.Name)
	}
	return pod.Name, nil
}

// Manifest is one extra addon file.
type Manifest struct {
	Name string
	Data []byte
}

// checkManifests requires every YAML document to name an object.
func checkManifests(b []byte) error {
	for i, doc := range SplitYAML(b) {
		var obj struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			return fmt.Errorf("document %d: %w", i+1, err)
		}
		if obj.APIVersion == "" || obj.Kind == "" || obj.Metadata.Name == "" {
			return fmt.Errorf("document %d lacks apiVersion, kind or metadata.name", i+1)
		}
	}
	return nil
}

// SplitYAML splits a multi-document YAML file, dropping empty documents.
func SplitYAML(b []byte) [][]byte {
	var docs [][]byte
	var cur strings.Builder
	flush := func() {
		if d := cur.String(); strings.TrimSpace(stripComments(d)) != "" {
			docs = append(docs, []byte(d))
		}
		cur.Reset()
	}
	// Each document keeps its own last newline: a block scalar (`|`) that
	// ends a document would otherwise lose its final line break.
	for _, l := range strings.SplitAfter(string(b), "\n") {
		if sep, _ := strings.CutSuffix(strings.TrimSuffix(l, "\n"), "\r"); sep == "---" || strings.HasPrefix(sep, "--- ") || strings.HasPrefix(sep, "---\t") {
			flush() // the rest of the separator line goes with it
			continue
		}
		cur.WriteString(l)
	}
	flush()
	return docs
}

func stripComments(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// Parse decodes and validates config bytes; name is used in messages only.
func Parse(name string, data []byte) (*Cluster, error) {
	var cfg Config
	md, err := toml.Decode(string(data), &cfg)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, &ConfigError{File: name, Problems: []Problem{{Line: pe.Position.Line, Msg: pe.Message}}}
		}
		return nil, &ConfigError{File: name, Problems: []Problem{decodeProblem(err)}}
	}
	lines := keyLines(string(data))
	var problems []Problem
	for _, k := range md.Undecoded() {
		if len(k) > 2 && k[0] == "containerd" && k[1] == "config" {
			// Decoded into a map, which BurntSushi/toml reports as
			// undecoded below quoted keys; validateContainerd checks
			// every key against containerd's own.
			continue
		}
		key := k.String()
		found := false
		for path, line := range lines {
			if stripIndexes(path) == key {
				problems = append(problems, Problem{Line: line, Field: path, Msg: "unknown key"})
				found = true
			}
		}
		if !found {
			problems = append(problems, Problem{Field: key, Msg: "unknown key"})
		}
	}
	cluster, vproblems := cfg.validate()
	for _, p := range vproblems {
		p.Line = lineOf(lines, p.Field)
		problems = append(problems, p)
	}
	if len(problems) > 0 {
		sort.SliceStable(problems, func(i, j int) bool {
			if problems[i].Line != problems[j].Line {
				return problems[i].Line < problems[j].Line
			}
			return problems[i].Field < problems[j].Field
		})
		return nil, &ConfigError{File: name, Problems: problems}
	}
	if l := cluster.ImageLayout; l != "" && !filepath.IsAbs(l) {
		cluster.ImageLayout = filepath.Join(filepath.Dir(name), l)
	}
	cluster.resolveHostSources(name)
	return cluster, nil
}

// lineOf finds the line of field, or of its closest parent that is written
// down (a table header), so that a missing key points at its table.
func lineOf(lines map[string]int, field string) int {
	for f := field; f != ""; {
		if l, ok := lines[f]; ok {
			return l
		}
		i := strings.LastIndexAny(f, ".[")
		if i < 0 {
			return 0
		}
		f = f[:i]
	}
	return 0
}

func stripIndexes(path string) string {
	var b strings.Builder
	skip := false
	for _, r := range path {
		switch {
		case r == '[':
			skip = true
		case r == ']':
			skip = false
		case !skip:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// keyLines maps each key path written in a TOML document (with [i] for
// elements of arrays of tables) to its line. BurntSushi/toml keeps key
// positions private, so this reads the few forms a cluster.toml uses: table
// headers, arrays of tables and bare or dotted keys. Lines it cannot place are
// left out, and a message then names the field without a line.
func keyLines(doc string) map[string]int {
	out := map[string]int{}
	counts := map[string]int{}
	table := ""
	inMultiline := ""
	for i, raw := range strings.Split(doc, "\n") {
		n := i + 1
		line := strings.TrimSpace(raw)
		if inMultiline != "" {
			if strings.Contains(line, inMultiline) {
				inMultiline = ""
			}
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		switch {
		case strings.HasPrefix(line, "[["):
			name := strings.TrimSpace(strings.TrimSuffix(strings.SplitN(line[2:], "]]", 2)[0], "]]"))
			idx := counts[name]
			counts[name]++
			table = fmt.Sprintf("%s[%d]", name, idx)
			out[table] = n
		case strings.HasPrefix(line, "["):
			table = strings.TrimSpace(strings.SplitN(line[1:], "]", 2)[0])
			out[table] = n
		default:
			eq := strings.Index(line, "=")
			if eq <= 0 {
				continue
			}
			key := strings.Trim(strings.TrimSpace(line[:eq]), `"'`)
			key = strings.ReplaceAll(key, " ", "")
			if table != "" {
				key = table + "." + key
			}
			if _, seen := out[key]; !seen {
				out[key] = n
			}
			rest := strings.TrimSpace(line[eq+1:])
			for _, q := range []string{`"""`, `'''`} {
				if strings.HasPrefix(rest, q) && !strings.Contains(rest[3:], q) {
					inMultiline = q
				}
			}
		}
	}
	return out
}

// tomlTypeRE matches BurntSushi/toml's type errors, which carry the line and
// key only in their text.
var tomlTypeRE = regexp.MustCompile(`^toml: (?:line (\d+) )?\(last key "([^"]*)"\): (?:incompatible types: TOML value has type (\S+); destination has type (\S+)|(.*))$`)

// decodeProblem turns a decoding error other than a syntax error into the
// documented file:line: field: message form.
func decodeProblem(err error) Problem {
	m := tomlTypeRE.FindStringSubmatch(err.Error())
	if m == nil {
		return Problem{Msg: err.Error()}
	}
	line, _ := strconv.Atoi(m[1])
	msg := m[5]
	if m[3] != "" {
		msg = fmt.Sprintf("wrong type: want %s, got %s", tomlType(m[4]), tomlType(m[3]))
	}
	return Problem{Line: line, Field: m[2], Msg: msg}
}

func tomlType(goType string) string {
	switch {
	case strings.HasPrefix(goType, "int"), goType == "integer":
		return "an integer"
	case strings.HasPrefix(goType, "float"):
		return "a float"
	case goType == "string":
		return "a string"
	case goType == "bool":
		return "a boolean"
	case strings.HasPrefix(goType, "[]"), goType == "slice", goType == "array":
		return "an array"
	case strings.HasPrefix(goType, "map"), goType == "struct", goType == "table":
		return "a table"
	}
	return goType
}
