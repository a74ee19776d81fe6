package render

import (
	"fmt"
	"io/fs"
	"net/url"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// HostConfig is [host]: binaries a bare host needs before it can be a node
// (kubelet, containerd, runc, the CNI plugins), carried in the bundle.
type HostConfig struct {
	Files    []HostFileConfig    `toml:"files"`
	Archives []HostArchiveConfig `toml:"archives"`
}

// HostFileConfig is one [[host.files]]: a single file at a host path.
type HostFileConfig struct {
	Path   string   `toml:"path"`
	Source string   `toml:"source"`
	SHA256 string   `toml:"sha256"`
	Mode   string   `toml:"mode"`
	Roles  []string `toml:"roles"`
}

// HostArchiveConfig is one [[host.archives]]: a tarball unpacked under Dir
// at build time.
type HostArchiveConfig struct {
	Dir    string   `toml:"dir"`
	Source string   `toml:"source"`
	SHA256 string   `toml:"sha256"`
	Strip  int      `toml:"strip"`
	Roles  []string `toml:"roles"`
}

// HostSource is where a host file's bytes come from: an http(s) URL, or an
// absolute path on the build machine (relative paths in the config are
// resolved against the config's directory). SHA256 is lowercase hex.
type HostSource struct {
	Location string
	SHA256   string
}

// IsURL says whether the source is downloaded rather than read from disk.
func (s HostSource) IsURL() bool {
	return strings.HasPrefix(s.Location, "https://") || strings.HasPrefix(s.Location, "http://")
}

// HostFile is a validated [[host.files]].
type HostFile struct {
	Path string
	HostSource
	Mode  fs.FileMode
	Roles []Role
}

// HostArchive is a validated [[host.archives]].
type HostArchive struct {
	Dir string
	HostSource
	Strip int
	Roles []Role
}

// For says whether a node of role r gets the file.
func (f HostFile) For(r Role) bool { return slices.Contains(f.Roles, r) }

// For says whether a node of role r gets the archive's files.
func (a HostArchive) For(r Role) bool { return slices.Contains(a.Roles, r) }

// DefaultHostFileMode is a host file's mode when the config names none:
// host files are mostly executables.
const DefaultHostFileMode = 0o755

var sha256RE = regexp.MustCompile(`^[0-9a-fA-F]{64}$`)

// ReservedHostPath says why a file at p is not allowed, or "" if it is:
// the directories and files airadm renders itself belong to airadm, so a
// host file there would either collide with a rendered file or be replaced
// by one on the next apply, and a file where one of them is a directory
// would make apply fail.
func ReservedHostPath(p string) string {
	if why := reservedDir(p); why != "" {
		return why
	}
	for _, dir := range reservedDirs() {
		if strings.HasPrefix(dir, p+"/") {
			return fmt.Sprintf("%s would hide %s, which airadm renders", p, dir)
		}
	}
	if p == KubeletUnitFile {
		return p + " is the kubelet unit, which airadm renders"
	}
	return runtimePath(p)
}

func reservedDirs() []string {
	return []string{KubernetesDir, KubeletDir, AiradmStateDir, EtcdDataDir, path.Dir(KubeletDropInFile)}
}

// reservedDir says why nothing may be unpacked at or under p, or "".
func reservedDir(p string) string {
	for _, dir := range reservedDirs() {
		if p == dir || strings.HasPrefix(p, dir+"/") {
			return fmt.Sprintf("%s lies in %s, which airadm renders", p, dir)
		}
	}
	return ""
}

// HostPathProblem says why p cannot be a host path in a bundle, or "".
func HostPathProblem(p string) string {
	switch {
	case !strings.HasPrefix(p, "/"):
		return fmt.Sprintf("%q is not an absolute path", p)
	case path.Clean(p) != p:
		return fmt.Sprintf("%q is not a clean path (did you mean %s?)", p, path.Clean(p))
	case p == "/":
		return "the root directory cannot be a file"
	}
	for i := 0; i < len(p); i++ {
		if p[i] < 0x20 || p[i] >= 0x7f || p[i] == '\\' {
			// Bundle entries are ustar names: printable ASCII only.
			return fmt.Sprintf("%q has characters outside printable ASCII", p)
		}
	}
	return ReservedHostPath(p)
}

// validateHost checks [host]; cfgDir resolves relative sources.
func (cfg *Config) validateHost(p *collector, c *Cluster) {
	paths := map[string]string{}
	for i, f := range cfg.Host.Files {
		field := fmt.Sprintf("host.files[%d]", i)
		hf := HostFile{Path: f.Path, Mode: DefaultHostFileMode}
		if f.Path == "" {
			p.add(field+".path", "missing")
		} else if why := HostPathProblem(f.Path); why != "" {
			p.add(field+".path", "%s", why)
		} else if prev, dup := paths[f.Path]; dup {
			p.add(field+".path", "%s is already the path of %s", f.Path, prev)
		} else {
			paths[f.Path] = field
		}
		hf.HostSource = hostSource(p, field, f.Source, f.SHA256)
		if f.Mode != "" {
			m, err := strconv.ParseUint(f.Mode, 8, 32)
			if err != nil || m > 0o777 {
				p.add(field+".mode", "%q is not an octal permission such as \"0755\" (no setuid, setgid or sticky bits)", f.Mode)
			}
			hf.Mode = fs.FileMode(m)
		}
		hf.Roles = roles(p, field, f.Roles)
		c.HostFiles = append(c.HostFiles, hf)
	}
	for i, a := range cfg.Host.Archives {
		field := fmt.Sprintf("host.archives[%d]", i)
		ha := HostArchive{Dir: a.Dir, Strip: a.Strip}
		switch {
		case a.Dir == "":
			p.add(field+".dir", "missing")
		case !strings.HasPrefix(a.Dir, "/") || path.Clean(a.Dir) != a.Dir:
			p.add(field+".dir", "%q is not a clean absolute path", a.Dir)
		case reservedDir(a.Dir) != "":
			p.add(field+".dir", "%s", reservedDir(a.Dir))
		}
		if a.Strip < 0 {
			p.add(field+".strip", "%d is negative", a.Strip)
		}
		ha.HostSource = hostSource(p, field, a.Source, a.SHA256)
		ha.Roles = roles(p, field, a.Roles)
		c.HostArchives = append(c.HostArchives, ha)
	}
}

func hostSource(p *collector, field, source, sum string) HostSource {
	s := HostSource{Location: source, SHA256: strings.ToLower(sum)}
	switch {
	case source == "":
		p.add(field+".source", "missing")
	case strings.Contains(source, "://"):
		u, err := url.Parse(source)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			p.add(field+".source", "%q is neither an http(s) URL nor a file path", source)
		} else if u.User != nil {
			// The config is not a place for credentials, and the URL
			// appears in messages.
			p.add(field+".source", "%q carries credentials; serve the file without them or use a local path", u.Redacted())
		}
	}
	switch {
	case sum == "":
		p.add(field+".sha256", "missing: the sha256 of the source, as 64 hex digits")
	case !sha256RE.MatchString(sum):
		p.add(field+".sha256", "%q is not 64 hex digits", sum)
	}
	return s
}

func roles(p *collector, field string, rs []string) []Role {
	if rs == nil {
		return []Role{ControlPlane, Worker}
	}
	if len(rs) == 0 {
		p.add(field+".roles", "empty: name %q, %q or both, or leave roles out for both", ControlPlane, Worker)
	}
	var out []Role
	for j, r := range rs {
		switch {
		case Role(r) != ControlPlane && Role(r) != Worker:
			p.add(fmt.Sprintf("%s.roles[%d]", field, j), "%q is neither %q nor %q", r, ControlPlane, Worker)
		case slices.Contains(out, Role(r)):
			p.add(fmt.Sprintf("%s.roles[%d]", field, j), "%q is listed twice", r)
		default:
			out = append(out, Role(r))
		}
	}
	return out
}

// resolveHostSources makes local sources absolute, relative to the config
// file's directory, as images.layout is.
func (c *Cluster) resolveHostSources(configName string) {
	resolve := func(s *HostSource) {
		if !s.IsURL() && s.Location != "" && !filepath.IsAbs(s.Location) {
			s.Location = filepath.Join(filepath.Dir(configName), s.Location)
		}
	}
	for i := range c.HostFiles {
		resolve(&c.HostFiles[i].HostSource)
	}
	for i := range c.HostArchives {
		resolve(&c.HostArchives[i].HostSource)
	}
}
