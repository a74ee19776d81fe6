// Package build is airadm's build pipeline: a validated cluster in, one
// bundle per node and SHA256SUMS out. The CLI, the media writers and the
// tests all call it.
//
// The output directory is never left lying: bundles are written into a
// staging directory inside it and moved in at the end, and SHA256SUMS is
// rewritten around the move so that at every instant each line in it
// matches the file it names. An interrupted build (a cancelled context:
// SIGINT or SIGTERM in the CLI) leaves the previous output as it was, and the
// next build removes the staging it left behind.
package build

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
	"airadm.dev/airadm/trust"
)

// Options is one build.
type Options struct {
	// ConfigPath is cluster.toml's path; secrets/ lives beside it.
	ConfigPath string
	Cluster    *render.Cluster
	// Out is the output directory.
	Out string
	// CacheDir is the content-addressed blob cache shared by all builds.
	CacheDir string
	// Jobs bounds concurrent image transfers.
	Jobs int
	// Nodes to build; empty builds every node and removes the bundles of
	// nodes the config no longer has.
	Nodes []string
	// Renew reissues every leaf and kubeconfig client certificate, not
	// only those within pki.renew_before of expiry.
	Renew bool
	// BuildTime goes into every manifest (SOURCE_DATE_EPOCH in the CLI).
	BuildTime time.Time
	Now       func() time.Time
	Rand      io.Reader
	// Log receives one line for each thing a user should know that is not
	// a built bundle: secrets issued, bundles removed, bundles rebuilt
	// because they publish a worker's token. Never a secret.
	Log func(string)
	// Progress, if set, follows the image pull.
	Progress func(bundle.Progress)
	// Signer, if set, signs SHA256SUMS into SHA256SUMS.sig (trust.Sign);
	// without it, a SHA256SUMS.sig left by an earlier build is removed.
	Signer ssh.Signer
	// HTTPClient fetches [host] sources given as URLs; nil means Go's
	// defaults (the system trust store, the environment's proxy).
	HTTPClient *http.Client
	// Pack writes every image of the cluster once, to images.pack, and
	// thin bundles that name it instead of carrying their images.
	Pack bool
}

// Bundle is one written bundle.
type Bundle struct {
	Node           string `json:"node"`
	Bundle         string `json:"bundle"`
	SHA256         string `json:"sha256"`
	ManifestDigest string `json:"manifestDigest"`
}

// Pack is a written image pack.
type Pack struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
	// Digest is the pack digest (its index's sha256) thin bundles name.
	Digest string `json:"digest"`
}

// Result is what a build wrote and removed.
type Result struct {
	Bundles []Bundle
	// Pack is set when the build wrote images.pack.
	Pack *Pack
	// Removed lists the bundles removed because their node left the config.
	Removed []string
}

// InputError is bad input found before anything was created: the CLI exits 2.
type InputError struct{ Err error }

func (e *InputError) Error() string { return e.Err.Error() }
func (e *InputError) Unwrap() error { return e.Err }

func inputErr(format string, args ...any) error {
	return &InputError{fmt.Errorf(format, args...)}
}

const stagingPrefix = ".staging-"

// Run builds. Everything that can be checked is checked before anything is
// created: the node names, the output path, the platform, every image's
// presence in images.layout, and every host file's source and digest (the
// sources are fetched into the cache first).
func Run(ctx context.Context, o Options) (*Result, error) {
	c := o.Cluster
	full := len(o.Nodes) == 0
	nodes, err := nodeList(c, o.Nodes, o.ConfigPath)
	if err != nil {
		return nil, err
	}
	if o.Jobs < 1 {
		return nil, inputErr("building: --jobs must be at least 1, not %d", o.Jobs)
	}
	if fi, err := os.Stat(o.Out); err == nil && !fi.IsDir() {
		return nil, inputErr("building: output %s is not a directory", o.Out)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("checking output %s: %w", o.Out, err)
	}
	platform, err := v1.ParsePlatform(c.Platform)
	if err != nil {
		return nil, inputErr("reading images.platform: %w", err)
	}
	var source bundle.Source = bundle.Registry{}
	if c.ImageLayout != "" {
		if source, err = layoutSource(ctx, c, *platform); err != nil {
			return nil, err
		}
	}

	// A worker's token is published by the control-plane bundles, so a
	// build of some workers may have to rebuild those too; whether it must
	// is known only once the secrets exist. Their images are a superset of
	// every worker's, so pulling them up front keeps every image fetched
	// before secrets/ or the output is touched.
	pullNodes := nodes
	if o.Pack {
		// The pack holds every node's images, so that a build of some
		// nodes writes the same pack the other thin bundles name.
		pullNodes = appendMissing(nodes, allNodes(c))
	} else if !full && slices.ContainsFunc(nodes, func(n string) bool { nd, _ := c.Node(n); return nd.Role == render.Worker }) {
		pullNodes = appendMissing(nodes, controlPlanes(c))
	}
	cache, err := bundle.OpenCache(o.CacheDir)
	if err != nil {
		return nil, err
	}
	// Host binaries before images: a wrong sha256 should not wait for a
	// long pull to be reported.
	host, err := hostFiles(ctx, c, &bundle.Fetcher{Cache: cache, Client: o.HTTPClient}, roles(c, pullNodes), o.Jobs, o.log)
	if err != nil {
		return nil, err
	}
	puller := &bundle.Puller{Source: source, Cache: cache, Platform: *platform, Jobs: o.Jobs, Progress: o.Progress}
	pulled, err := puller.Pull(ctx, imageRefs(c, pullNodes))
	if err != nil {
		return nil, fmt.Errorf("pulling images: %w", err)
	}
	byRef := map[string]bundle.Image{}
	for _, im := range pulled {
		byRef[im.Ref] = im
	}

	st, err := secrets.Open(filepath.Join(filepath.Dir(o.ConfigPath), "secrets"), o.Now, o.Rand)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	st.Log = o.Log
	st.RenewAll = o.Renew
	s, err := st.Ensure(c)
	if err != nil {
		return nil, err
	}
	// Each node's files are rendered when its bundle is written, so that a
	// fleet's are never all in memory at once; a failure there still leaves
	// the output as it was (the staging directory goes).
	rendered := map[string][]render.File{}
	if !full {
		for _, n := range nodes {
			if rendered[n], err = render.NodeFiles(c, s, n); err != nil {
				return nil, err
			}
		}
		extra, absent, err := staleControlPlanes(c, s, o.Out, nodes, rendered)
		if err != nil {
			return nil, err
		}
		for _, cp := range absent {
			o.log("note: %s has no %s.bundle; the control plane publishes these workers' tokens only once a %s bundle built now is applied", o.Out, cp, cp)
		}
		for _, cp := range extra {
			o.log("also rebuilding %s: it publishes the bootstrap tokens of the workers being built", cp)
			nodes = append(nodes, cp)
		}
	}

	if err := os.MkdirAll(o.Out, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", o.Out, err)
	}
	unlock, err := lockOut(o.Out)
	if err != nil {
		return nil, err
	}
	defer unlock()
	removeStale(o.Out)
	staging, err := os.MkdirTemp(o.Out, stagingPrefix)
	if err != nil {
		return nil, fmt.Errorf("creating staging in %s: %w", o.Out, err)
	}
	defer os.RemoveAll(staging)

	res := &Result{}
	var packDigest string
	if o.Pack {
		var images []bundle.Image
		for _, r := range imageRefs(c, allNodes(c)) {
			images = append(images, byRef[r])
		}
		p, err := writePack(ctx, filepath.Join(staging, bundle.PackFile), images, cache)
		if err != nil {
			return nil, fmt.Errorf("building %s: %w", bundle.PackFile, err)
		}
		p.Path = filepath.Join(o.Out, bundle.PackFile)
		res.Pack, packDigest = &p, p.Digest
	}
	for _, name := range nodes {
		n, _ := c.Node(name)
		files := rendered[name]
		if files == nil {
			if files, err = render.NodeFiles(c, s, name); err != nil {
				return nil, err
			}
		}
		delete(rendered, name)
		contents := bundle.Contents{
			Cluster: c.Name, Node: name, Role: string(n.Role), KubernetesVersion: c.KubernetesVersion,
			BuildTime: o.BuildTime, Files: files, StoredFiles: host[n.Role], Pack: packDigest,
		}
		for _, r := range c.NodeImages(n) {
			contents.Images = append(contents.Images, byRef[r])
		}
		if n.Recipient != "" {
			// Encrypted entries differ from build to build (age takes
			// no random source), so these bundles are not reproducible
			// byte for byte; their plaintext is.
			if contents.Files, contents.Encrypted, err = trust.EncryptSecrets(contents.Files, n.Recipient); err != nil {
				return nil, fmt.Errorf("building %s: %w", name, err)
			}
			contents.Recipient = n.Recipient
		}
		b, err := writeBundle(ctx, filepath.Join(staging, name+".bundle"), contents, cache)
		if err != nil {
			return nil, fmt.Errorf("building %s: %w", name, err)
		}
		b.Node, b.Bundle = name, filepath.Join(o.Out, name+".bundle")
		res.Bundles = append(res.Bundles, b)
	}
	if full {
		if res.Removed, err = departed(c, o.Out, o.Pack); err != nil {
			return nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("building: %w", err)
	}
	if err := syncStaging(staging); err != nil {
		return nil, err
	}
	// From here on the build finishes whatever happens to ctx: the swap is
	// a few renames, and stopping half-way would only leave more to explain.
	hadSig, err := swapIn(o.Out, staging, res, o.Signer)
	if err != nil {
		return nil, err
	}
	if hadSig && o.Signer == nil {
		o.log("removed %s: this build is not signed (pass --sign-key to sign it)", filepath.Join(o.Out, trust.SigFile))
	}
	for _, r := range res.Removed {
		if filepath.Base(r) == bundle.PackFile {
			o.log("removed %s: this build's bundles carry their own images (--pack writes it)", r)
			continue
		}
		o.log("removed %s: its node is no longer in %s", r, o.ConfigPath)
	}
	return res, nil
}

func (o Options) log(format string, args ...any) {
	if o.Log != nil {
		o.Log(fmt.Sprintf(format, args...))
	}
}

// nodeList checks and de-duplicates the requested nodes, in the order given;
// none means all, in the config's order.
func nodeList(c *render.Cluster, want []string, config string) ([]string, error) {
	if len(want) == 0 {
		var all []string
		for _, n := range c.Nodes {
			all = append(all, n.Name)
		}
		return all, nil
	}
	var out, unknown []string
	for _, n := range want {
		if _, ok := c.Node(n); !ok {
			unknown = append(unknown, n)
		} else if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	if len(unknown) > 0 {
		var names []string
		for _, n := range c.Nodes {
			names = append(names, n.Name)
		}
		return nil, inputErr("building %s: no node of that name in %s (nodes: %s)", strings.Join(unknown, ", "), config, strings.Join(names, ", "))
	}
	return out, nil
}

// roles lists the roles of the named nodes.
func roles(c *render.Cluster, nodes []string) []render.Role {
	var out []render.Role
	for _, name := range nodes {
		n, _ := c.Node(name)
		if !slices.Contains(out, n.Role) {
			out = append(out, n.Role)
		}
	}
	return out
}

func allNodes(c *render.Cluster) []string {
	var out []string
	for _, n := range c.Nodes {
		out = append(out, n.Name)
	}
	return out
}

func controlPlanes(c *render.Cluster) []string {
	var out []string
	for _, n := range c.Nodes {
		if n.Role == render.ControlPlane {
			out = append(out, n.Name)
		}
	}
	return out
}

func appendMissing(list, more []string) []string {
	out := slices.Clone(list)
	for _, m := range more {
		if !slices.Contains(out, m) {
			out = append(out, m)
		}
	}
	return out
}

// imageRefs is every image the nodes need, each once, in first-seen order.
func imageRefs(c *render.Cluster, nodes []string) []string {
	var refs []string
	for _, name := range nodes {
		n, _ := c.Node(name)
		for _, r := range c.NodeImages(n) {
			if !slices.Contains(refs, r) {
				refs = append(refs, r)
			}
		}
	}
	return refs
}

// layoutSource checks that images.layout is a layout holding every image the
// cluster needs, naming each missing one, before anything is created.
func layoutSource(ctx context.Context, c *render.Cluster, platform v1.Platform) (bundle.Source, error) {
	if _, err := os.Stat(filepath.Join(c.ImageLayout, "index.json")); err != nil {
		return nil, inputErr("reading images.layout: %s is not an OCI image layout: %w", c.ImageLayout, err)
	}
	l := bundle.Layout{Path: c.ImageLayout}
	var problems []string
	for _, ref := range c.Images() {
		if _, _, err := l.Image(ctx, ref, platform); err != nil {
			problems = append(problems, err.Error())
		}
	}
	if len(problems) > 0 {
		return nil, inputErr("reading images.layout: %s", strings.Join(problems, "; "))
	}
	return l, nil
}

// staleControlPlanes returns the control planes, not already being built,
// whose bundle in out does not publish the tokens the workers being built
// now carry (its join file differs), and those with no bundle in out, which
// are left to the user: out may hold only the workers on purpose.
func staleControlPlanes(c *render.Cluster, s *render.Secrets, out string, nodes []string, rendered map[string][]render.File) (stale, absent []string, err error) {
	if !slices.ContainsFunc(nodes, func(n string) bool { nd, _ := c.Node(n); return nd.Role == render.Worker }) {
		return nil, nil, nil
	}
	for _, cp := range controlPlanes(c) {
		if slices.Contains(nodes, cp) {
			continue
		}
		path := filepath.Join(out, cp+".bundle")
		if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
			absent = append(absent, cp)
			continue
		}
		files, err := render.NodeFiles(c, s, cp)
		if err != nil {
			return nil, nil, err
		}
		rendered[cp] = files
		var want string
		for _, f := range files {
			if f.Path == render.JoinFile {
				sum := sha256.Sum256(f.Data)
				want = hex.EncodeToString(sum[:])
			}
		}
		if got, ok := bundledFileDigest(path, render.JoinFile); !ok || got != want {
			stale = append(stale, cp)
		}
	}
	return stale, absent, nil
}

// bundledFileDigest reads only the manifest of an existing bundle to learn
// the digest it lists for path. It decides whether to rebuild, not whether
// to trust: apply and verify read bundles in full.
func bundledFileDigest(bundlePath, path string) (string, bool) {
	f, err := os.Open(bundlePath)
	if err != nil {
		return "", false
	}
	defer f.Close()
	m, err := bundle.ReadManifest(f)
	if err != nil {
		return "", false
	}
	for _, fe := range m.Files {
		if fe.Path == path {
			return fe.SHA256, true
		}
	}
	return "", false
}

// writeBundle writes one bundle to path (inside the staging directory),
// hashing every byte on the way and stopping early when ctx ends.
func writeBundle(ctx context.Context, path string, contents bundle.Contents, cache *bundle.Cache) (Bundle, error) {
	var b Bundle
	whole := sha256.New()
	err := writeStaged(path, 0o600, func(w io.Writer) error {
		// Small: large blobs pass through it whole.
		bw := bufio.NewWriterSize(io.MultiWriter(ctxWriter{ctx, w}, whole), 64<<10)
		_, d, err := bundle.Write(bw, contents, cache)
		if err != nil {
			return err
		}
		b.ManifestDigest = d
		return bw.Flush()
	})
	b.SHA256 = hex.EncodeToString(whole.Sum(nil))
	return b, err
}

// writePack writes the image pack to path (inside the staging directory).
func writePack(ctx context.Context, path string, images []bundle.Image, cache *bundle.Cache) (Pack, error) {
	var p Pack
	whole := sha256.New()
	err := writeStaged(path, 0o644, func(w io.Writer) error {
		bw := bufio.NewWriterSize(io.MultiWriter(ctxWriter{ctx, w}, whole), 1<<20)
		_, d, err := bundle.WritePack(bw, images, cache)
		if err != nil {
			return err
		}
		p.Digest = d
		return bw.Flush()
	})
	p.SHA256 = hex.EncodeToString(whole.Sum(nil))
	return p, err
}

// writeStaged creates a file in the staging directory, which no one else
// reads and an interrupted build discards, so neither a temp name nor a
// sync is needed: syncStaging makes all of them durable at once before they
// move in. (One fsync per bundle would make a fleet's build wait on the disk
// a thousand times.)
func writeStaged(path string, perm fs.FileMode, fill func(io.Writer) error) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, perm)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := fill(f); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// syncStaging makes every file written in the staging directory durable
// with one syncfs, before the swap renames them into place.
func syncStaging(staging string) error {
	d, err := os.Open(staging)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", staging, err)
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("syncing %s: %w", staging, err)
	}
	return nil
}

// ctxWriter fails writes once ctx is done, so a signal stops a large bundle
// mid-way instead of after it.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}

// departed lists the bundles in out whose node the config no longer has:
// every *.bundle file, and every SHA256SUMS line, not named for a node; and
// the image pack when the build writes none (its bundles carry their
// images).
func departed(c *render.Cluster, out string, pack bool) ([]string, error) {
	var gone []string
	isNode := func(file string) bool {
		if file == bundle.PackFile {
			return pack
		}
		name, ok := strings.CutSuffix(file, ".bundle")
		if !ok {
			return false
		}
		_, found := c.Node(name)
		return found
	}
	entries, err := os.ReadDir(out)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", out, err)
	}
	for _, e := range entries {
		if (strings.HasSuffix(e.Name(), ".bundle") || e.Name() == bundle.PackFile) && e.Type().IsRegular() && !isNode(e.Name()) {
			gone = append(gone, filepath.Join(out, e.Name()))
		}
	}
	sums, err := trust.ReadSums(filepath.Join(out, trust.SumsFile))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, n := range sums.Names() {
		if p := filepath.Join(out, n); !isNode(n) && !slices.Contains(gone, p) {
			gone = append(gone, p)
		}
	}
	slices.Sort(gone)
	return gone, nil
}

// swapIn moves the staged bundles into out and removes departed ones,
// keeping SHA256SUMS true at every instant: first it drops the lines of
// every file about to change, then it moves the files, then it adds the new
// lines. SHA256SUMS.sig goes first, since any change to SHA256SUMS breaks
// it, and a new one is written last, over the final SHA256SUMS: in between,
// a host that trusts a key refuses the bundles as unsigned rather than as
// tampered with. It reports whether there was a signature to remove.
func swapIn(out, staging string, res *Result, signer ssh.Signer) (bool, error) {
	path := filepath.Join(out, trust.SumsFile)
	sigPath := filepath.Join(out, trust.SigFile)
	hadSig := false
	if err := os.Remove(sigPath); err == nil {
		hadSig = true
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("removing %s: %w", sigPath, err)
	}
	sums, err := trust.ReadSums(path)
	if errors.Is(err, fs.ErrNotExist) {
		sums = trust.Sums{}
	} else if err != nil {
		return hadSig, err
	}
	interim := sums.Clone()
	for _, b := range res.Bundles {
		delete(interim, filepath.Base(b.Bundle))
	}
	if res.Pack != nil {
		delete(interim, bundle.PackFile)
	}
	for _, r := range res.Removed {
		delete(interim, filepath.Base(r))
	}
	if len(interim) != len(sums) {
		if err := interim.Write(path); err != nil {
			return hadSig, err
		}
	}
	for _, r := range res.Removed {
		if err := os.Remove(r); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return hadSig, fmt.Errorf("removing %s: %w", r, err)
		}
	}
	if res.Pack != nil {
		// Before the bundles that name it.
		if err := os.Rename(filepath.Join(staging, bundle.PackFile), res.Pack.Path); err != nil {
			return hadSig, fmt.Errorf("moving %s into %s: %w", bundle.PackFile, out, err)
		}
		interim[bundle.PackFile] = trust.Sum{File: res.Pack.SHA256}
	}
	for _, b := range res.Bundles {
		name := filepath.Base(b.Bundle)
		if err := os.Rename(filepath.Join(staging, name), b.Bundle); err != nil {
			return hadSig, fmt.Errorf("moving %s into %s: %w", name, out, err)
		}
		interim[name] = trust.Sum{File: b.SHA256, Manifest: b.ManifestDigest}
	}
	if err := atomicfile.SyncDir(out); err != nil {
		return hadSig, err
	}
	if err := interim.Write(path); err != nil {
		return hadSig, err
	}
	if signer == nil || len(interim) == 0 {
		return hadSig, nil
	}
	sig, err := trust.Sign(interim.Encode(), signer)
	if err != nil {
		return hadSig, err
	}
	return hadSig, atomicfile.Write(sigPath, sig, 0o644)
}

// removeStale removes what an interrupted build left: staging directories
// and the temp files of earlier versions, which wrote in place.
func removeStale(out string) {
	entries, _ := os.ReadDir(out)
	for _, e := range entries {
		n := e.Name()
		if strings.HasPrefix(n, stagingPrefix) || (strings.HasPrefix(n, ".") && strings.Contains(n, ".tmp-")) {
			os.RemoveAll(filepath.Join(out, n))
		}
	}
}

// lockOut keeps two builds from writing the same output directory at once;
// it also makes removing another build's staging safe.
func lockOut(out string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(out, ".airadm-build.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("locking %s: %w", out, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: another build is writing it", out)
	}
	return func() { f.Close() }, nil
}
