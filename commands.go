package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
)

// configFlag is shared by every command that reads cluster.toml.
type configFlag struct {
	Config string `short:"c" default:"cluster.toml" help:"Cluster config; secrets/ beside it holds the cluster's keys."`
}

func (f configFlag) load() (*render.Cluster, error) {
	c, err := render.Load(f.Config)
	if err != nil {
		var ce *render.ConfigError
		if errors.As(err, &ce) {
			return nil, err
		}
		return nil, usageError{err}
	}
	return c, nil
}

// secrets opens the store beside the config and makes sure all of the
// cluster's material exists.
func (f configFlag) secrets(env *Env, c *render.Cluster) (*render.Secrets, func(), error) {
	dir := filepath.Join(filepath.Dir(f.Config), "secrets")
	st, err := secrets.Open(dir, env.Now, env.Rand)
	if err != nil {
		return nil, nil, err
	}
	st.Log = func(line string) { fmt.Fprintln(env.Stderr, line) }
	s, err := st.Ensure(c)
	if err != nil {
		st.Close()
		return nil, nil, err
	}
	return s, func() { st.Close() }, nil
}

// InitCmd writes the template.
type InitCmd struct {
	Dir   string `arg:"" optional:"" default:"." help:"Directory to write cluster.toml into."`
	Force bool   `help:"Replace an existing cluster.toml."`
}

func (cmd *InitCmd) Run(env *Env) error {
	path := filepath.Join(cmd.Dir, "cluster.toml")
	if _, err := os.Stat(path); err == nil && !cmd.Force {
		return usageError{fmt.Errorf("writing %s: it already exists (use --force to replace it)", path)}
	}
	if err := os.MkdirAll(cmd.Dir, 0o755); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := atomicfile.Write(path, []byte(render.Template), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "wrote %s\n", path)
	return nil
}

// RenderCmd writes a node's file tree under a new directory.
type RenderCmd struct {
	configFlag
	Out  string `short:"o" required:"" help:"Directory to create; files land at their host paths under it."`
	Node string `arg:"" help:"Node name from the config."`
}

func (cmd *RenderCmd) Run(env *Env) error {
	c, err := cmd.load()
	if err != nil {
		return err
	}
	if _, ok := c.Node(cmd.Node); !ok {
		return usageError{fmt.Errorf("rendering %s: no node of that name in %s (nodes: %s)", cmd.Node, cmd.Config, nodeNames(c))}
	}
	if err := emptyOrAbsent(cmd.Out); err != nil {
		return usageError{err}
	}
	s, done, err := cmd.secrets(env, c)
	if err != nil {
		return err
	}
	defer done()
	files, err := render.NodeFiles(c, s, cmd.Node)
	if err != nil {
		return err
	}
	// Build the tree beside the target and move it in whole, so a failed
	// run leaves no half-written directory.
	parent := filepath.Dir(filepath.Clean(cmd.Out))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", parent, err)
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(cmd.Out)+".tmp-")
	if err != nil {
		return fmt.Errorf("creating %s: %w", cmd.Out, err)
	}
	defer os.RemoveAll(tmp)
	if err := hostfs.WriteTree(tmp, files); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	os.Remove(cmd.Out) // an empty directory, if any (emptyOrAbsent checked)
	if err := os.Rename(tmp, cmd.Out); err != nil {
		return fmt.Errorf("moving rendered tree to %s: %w", cmd.Out, err)
	}
	fmt.Fprintf(env.Stdout, "rendered %d files for %s under %s\n", len(files), cmd.Node, cmd.Out)
	return nil
}

func emptyOrAbsent(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("checking output %s: %w", dir, err)
	}
	if len(entries) > 0 {
		return fmt.Errorf("checking output %s: not empty; render into a new directory so nothing is overwritten", dir)
	}
	return nil
}

func nodeNames(c *render.Cluster) string {
	var names []string
	for _, n := range c.Nodes {
		names = append(names, n.Name)
	}
	return strings.Join(names, ", ")
}

// ImagesCmd groups image subcommands.
type ImagesCmd struct {
	List ImagesListCmd `cmd:"" help:"Print the image references the cluster or a node needs."`
}

type ImagesListCmd struct {
	configFlag
	Node string `help:"Only the images this node needs."`
	JSON bool   `name:"json" help:"Print a JSON array."`
}

func (cmd *ImagesListCmd) Run(env *Env) error {
	c, err := cmd.load()
	if err != nil {
		return err
	}
	refs := c.Images()
	if cmd.Node != "" {
		n, ok := c.Node(cmd.Node)
		if !ok {
			return usageError{fmt.Errorf("listing images: no node %q in %s (nodes: %s)", cmd.Node, cmd.Config, nodeNames(c))}
		}
		refs = c.NodeImages(n)
	}
	if cmd.JSON {
		enc := json.NewEncoder(env.Stdout)
		return enc.Encode(refs)
	}
	for _, r := range refs {
		fmt.Fprintln(env.Stdout, r)
	}
	return nil
}

// VersionCmd prints versions.
type VersionCmd struct{}

// version is stamped by release builds (-ldflags "-X main.version=...",
// as the Justfile's build does); otherwise it comes from the build's VCS
// information.
var version string

func (VersionCmd) Run(env *Env) error {
	fmt.Fprintf(env.Stdout, "airadm %s\nkubernetes %s\n", airadmVersion(version, debug.ReadBuildInfo), render.KubernetesVersion)
	return nil
}

// airadmVersion picks the most precise version there is: the stamped one,
// the module version, the VCS revision (with -dirty for local changes), or
// "(devel)" for a `go run` that carries none of these.
func airadmVersion(stamped string, info func() (*debug.BuildInfo, bool)) string {
	if stamped != "" {
		return stamped
	}
	bi, ok := info()
	if !ok {
		return "(devel)"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, when string
	dirty := false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.time":
			when = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "(devel)"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	v := "git-" + rev
	if dirty {
		v += "-dirty"
	}
	if when != "" {
		v += " (" + when + ")"
	}
	return v
}
