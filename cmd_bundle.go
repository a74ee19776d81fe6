package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
)

// BuildCmd renders, pulls and writes one bundle per node.
type BuildCmd struct {
	configFlag
	Out   string   `short:"o" default:"out" help:"Directory for <node>.bundle and SHA256SUMS."`
	Cache string   `help:"Image blob cache shared by all builds (default: the user cache directory)."`
	Jobs  int      `default:"4" help:"Concurrent image transfers."`
	JSON  bool     `name:"json" help:"Print the bundles as a JSON array."`
	Nodes []string `arg:"" optional:"" help:"Nodes to build (default: all)."`
}

type builtBundle struct {
	Node           string `json:"node"`
	Bundle         string `json:"bundle"`
	SHA256         string `json:"sha256"`
	ManifestDigest string `json:"manifestDigest"`
}

func defaultCacheDir() (string, error) {
	if d := os.Getenv("AIRADM_CACHE"); d != "" {
		return filepath.Join(d, "images"), nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("locating image cache: %w (set --cache)", err)
	}
	return filepath.Join(d, "airadm", "images"), nil
}

func (cmd *BuildCmd) Run(env *Env) error {
	c, err := cmd.load()
	if err != nil {
		return err
	}
	nodes := cmd.Nodes
	if len(nodes) == 0 {
		for _, n := range c.Nodes {
			nodes = append(nodes, n.Name)
		}
	}
	for _, n := range nodes {
		if _, ok := c.Node(n); !ok {
			return usageError{fmt.Errorf("building %s: no node of that name in %s (nodes: %s)", n, cmd.Config, nodeNames(c))}
		}
	}
	buildTime := env.Now()
	if s := env.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		secs, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return usageError{fmt.Errorf("reading SOURCE_DATE_EPOCH: %q is not a number of seconds", s)}
		}
		buildTime = time.Unix(secs, 0).UTC()
	}
	platform, err := v1.ParsePlatform(c.Platform)
	if err != nil {
		return usageError{fmt.Errorf("reading images.platform: %w", err)}
	}
	var source bundle.Source = bundle.Registry{}
	if c.ImageLayout != "" {
		if _, err := os.Stat(filepath.Join(c.ImageLayout, "index.json")); err != nil {
			return usageError{fmt.Errorf("reading images.layout: %s is not an OCI image layout: %w", c.ImageLayout, err)}
		}
		source = bundle.Layout{Path: c.ImageLayout}
	}
	cacheDir := cmd.Cache
	if cacheDir == "" {
		if cacheDir, err = defaultCacheDir(); err != nil {
			return err
		}
	}
	cache, err := bundle.OpenCache(cacheDir)
	if err != nil {
		return err
	}

	s, done, err := cmd.secrets(env, c)
	if err != nil {
		return err
	}
	defer done()
	var refs []string
	seen := map[string]bool{}
	for _, name := range nodes {
		n, _ := c.Node(name)
		for _, r := range c.NodeImages(n) {
			if !seen[r] {
				seen[r] = true
				refs = append(refs, r)
			}
		}
	}
	progress := newProgress(env)
	puller := &bundle.Puller{Source: source, Cache: cache, Platform: *platform, Jobs: cmd.Jobs, Progress: progress.pull}
	images, err := puller.Pull(context.Background(), refs)
	progress.done()
	if err != nil {
		return fmt.Errorf("pulling images: %w", err)
	}
	byRef := map[string]bundle.Image{}
	for _, im := range images {
		byRef[im.Ref] = im
	}

	if err := os.MkdirAll(cmd.Out, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", cmd.Out, err)
	}
	sums := map[string]string{}
	manifests := map[string]string{}
	var built []builtBundle
	for _, name := range nodes {
		n, _ := c.Node(name)
		files, err := render.NodeFiles(c, s, name)
		if err != nil {
			return err
		}
		contents := bundle.Contents{
			Cluster: c.Name, Node: name, Role: string(n.Role), KubernetesVersion: c.KubernetesVersion,
			BuildTime: buildTime, Files: files,
		}
		for _, r := range c.NodeImages(n) {
			contents.Images = append(contents.Images, byRef[r])
		}
		path := filepath.Join(cmd.Out, name+".bundle")
		var manifestDigest string
		whole := sha256.New()
		err = atomicfile.WriteFrom(path, 0o600, func(w io.Writer) error {
			bw := bufio.NewWriterSize(io.MultiWriter(w, whole), 1<<20)
			_, d, err := bundle.Write(bw, contents, cache)
			if err != nil {
				return err
			}
			manifestDigest = d
			return bw.Flush()
		})
		if err != nil {
			return fmt.Errorf("building %s: %w", name, err)
		}
		sums[name+".bundle"] = hex.EncodeToString(whole.Sum(nil))
		manifests[name+".bundle"] = manifestDigest
		built = append(built, builtBundle{Node: name, Bundle: path, SHA256: sums[name+".bundle"], ManifestDigest: manifestDigest})
		if !cmd.JSON {
			fmt.Fprintf(env.Stdout, "%s  manifest %s\n", path, manifestDigest)
		}
	}
	if err := writeSums(filepath.Join(cmd.Out, "SHA256SUMS"), sums, manifests); err != nil {
		return err
	}
	if cmd.JSON {
		return json.NewEncoder(env.Stdout).Encode(built)
	}
	return nil
}

// writeSums updates SHA256SUMS: sha256sum-compatible lines for each bundle,
// and comment lines (which sha256sum -c skips) with each manifest digest.
// Lines of bundles not rebuilt now are kept while their files exist.
func writeSums(path string, sums, manifests map[string]string) error {
	old, _ := readSums(path)
	dir := filepath.Dir(path)
	for name, e := range old {
		if _, fresh := sums[name]; fresh {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			sums[name], manifests[name] = e.file, e.manifest
		}
	}
	names := make([]string, 0, len(sums))
	for n := range sums {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "%s  %s\n", sums[n], n)
	}
	for _, n := range names {
		if manifests[n] != "" {
			fmt.Fprintf(&b, "# airadm manifest %s %s\n", n, manifests[n])
		}
	}
	return atomicfile.Write(path, []byte(b.String()), 0o644)
}

type sumEntry struct{ file, manifest string }

func readSums(path string) (map[string]sumEntry, error) {
	out := map[string]sumEntry{}
	b, err := os.ReadFile(path)
	if err != nil {
		return out, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "# airadm manifest "); ok {
			if name, d, ok := strings.Cut(rest, " "); ok {
				e := out[name]
				e.manifest = d
				out[name] = e
			}
		} else if sum, name, ok := strings.Cut(line, "  "); ok && !strings.HasPrefix(line, "#") {
			e := out[name]
			e.file = sum
			out[name] = e
		}
	}
	return out, nil
}

// trustedManifest finds the manifest digest to authenticate a bundle
// against: the flag, or SHA256SUMS beside the bundle.
func trustedManifest(bundlePath, flag string) (digest, from string) {
	if flag != "" {
		return flag, "--manifest-digest"
	}
	sums := filepath.Join(filepath.Dir(bundlePath), "SHA256SUMS")
	if m, err := readSums(sums); err == nil {
		if e, ok := m[filepath.Base(bundlePath)]; ok && e.manifest != "" {
			return e.manifest, sums
		}
	}
	return "", ""
}

// openVerified reads the whole bundle through the verifying reader.
func openVerified(path, manifestDigest string, v bundle.Visitor) (*bundle.Manifest, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, "", usageError{fmt.Errorf("opening bundle: %w", err)}
	}
	defer f.Close()
	m, digest, err := bundle.Read(f, v)
	if err != nil {
		return nil, "", usageError{fmt.Errorf("verifying %s: %w", path, err)}
	}
	want, from := trustedManifest(path, manifestDigest)
	if want != "" && want != digest {
		return nil, "", usageError{fmt.Errorf("verifying %s: manifest digest %s does not match %s from %s", path, digest, want, from)}
	}
	return m, from, nil
}

// VerifyCmd checks a bundle byte for byte.
type VerifyCmd struct {
	Bundle         string `arg:"" help:"Bundle file."`
	ManifestDigest string `help:"Manifest digest to authenticate against (default: SHA256SUMS beside the bundle, if any)."`
	JSON           bool   `name:"json" help:"Print the result as JSON."`
}

func (cmd *VerifyCmd) Run(env *Env) error {
	m, from, err := openVerified(cmd.Bundle, cmd.ManifestDigest, bundle.Visitor{})
	if err != nil {
		return err
	}
	if cmd.JSON {
		return json.NewEncoder(env.Stdout).Encode(map[string]any{
			"bundle": cmd.Bundle, "ok": true, "cluster": m.Cluster, "node": m.Node, "role": m.Role,
			"files": len(m.Files), "images": len(m.Images), "blobs": len(m.Blobs), "authenticatedBy": from,
		})
	}
	auth := "manifest authenticated by " + from
	if from == "" {
		auth = "manifest not authenticated: no SHA256SUMS beside the bundle and no --manifest-digest"
	}
	fmt.Fprintf(env.Stdout, "%s: ok: %s %s (%s), %d files, %d images, %d blobs; %s\n",
		cmd.Bundle, m.Cluster, m.Node, m.Role, len(m.Files), len(m.Images), len(m.Blobs), auth)
	return nil
}

// InspectCmd describes a bundle.
type InspectCmd struct {
	Bundle string `arg:"" help:"Bundle file."`
	JSON   bool   `name:"json" help:"Print JSON."`
}

type certInfo struct {
	Path     string    `json:"path"`
	Subject  string    `json:"subject"`
	DNSNames []string  `json:"dnsNames,omitempty"`
	IPs      []string  `json:"ips,omitempty"`
	NotAfter time.Time `json:"notAfter"`
	Source   string    `json:"source,omitempty"` // the kubeconfig that embeds it
}

type inspection struct {
	*bundle.Manifest
	ManifestDigest string     `json:"manifestDigest"`
	Certificates   []certInfo `json:"certificates"`
}

func (cmd *InspectCmd) Run(env *Env) error {
	var certs []certInfo
	f, err := os.Open(cmd.Bundle)
	if err != nil {
		return usageError{fmt.Errorf("opening bundle: %w", err)}
	}
	defer f.Close()
	m, digest, err := bundle.Read(f, bundle.Visitor{File: func(fe bundle.FileEntry, r io.Reader) error {
		if !strings.HasSuffix(fe.Path, ".crt") && !strings.HasSuffix(fe.Path, ".conf") {
			return nil
		}
		b, err := io.ReadAll(r)
		if err != nil {
			return err
		}
		certs = append(certs, describeCerts(fe.Path, b)...)
		return nil
	}})
	if err != nil {
		return usageError{fmt.Errorf("inspecting %s: %w", cmd.Bundle, err)}
	}
	if cmd.JSON {
		enc := json.NewEncoder(env.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(inspection{Manifest: m, ManifestDigest: digest, Certificates: certs})
	}
	w := env.Stdout
	fmt.Fprintf(w, "bundle      %s\nmanifest    %s\ncluster     %s\nnode        %s (%s)\nkubernetes  %s\nbuilt       %s\n",
		cmd.Bundle, digest, m.Cluster, m.Node, m.Role, m.KubernetesVersion, m.BuildTime.Format(time.RFC3339))
	fmt.Fprintf(w, "\nfiles (%d)\n", len(m.Files))
	for _, fe := range m.Files {
		fmt.Fprintf(w, "  %s %8d  sha256:%s  %s\n", fe.Mode, fe.Size, fe.SHA256[:12], fe.Path)
	}
	fmt.Fprintf(w, "\nimages (%d)\n", len(m.Images))
	for _, im := range m.Images {
		fmt.Fprintf(w, "  %s\n    %s  %s  %.1f MB\n", im.Ref, im.Digest, im.Platform, float64(im.TotalSize)/1e6)
	}
	fmt.Fprintf(w, "\ncertificates (%d)\n", len(certs))
	for _, c := range certs {
		where := c.Path
		if c.Source != "" {
			where = c.Source + " (client)"
		}
		fmt.Fprintf(w, "  %s\n    subject %s, expires %s", where, c.Subject, c.NotAfter.Format(time.RFC3339))
		if sans := append(append([]string{}, c.DNSNames...), c.IPs...); len(sans) > 0 {
			fmt.Fprintf(w, "\n    SANs %s", strings.Join(sans, ", "))
		}
		fmt.Fprintln(w)
	}
	return nil
}

// describeCerts reads a certificate file, or the client certificate a
// kubeconfig embeds; keys and tokens are never read.
func describeCerts(path string, b []byte) []certInfo {
	source := ""
	if strings.HasSuffix(path, ".conf") {
		cert, ok := kubeconfigClientCert(b)
		if !ok {
			return nil
		}
		b, source = cert, path
	}
	c, err := pki.ParseCert(b)
	if err != nil {
		return nil
	}
	info := certInfo{Path: path, Subject: c.Subject.String(), DNSNames: c.DNSNames, NotAfter: c.NotAfter, Source: source}
	for _, ip := range c.IPAddresses {
		info.IPs = append(info.IPs, ip.String())
	}
	return []certInfo{info}
}

func kubeconfigClientCert(b []byte) ([]byte, bool) {
	cfg, err := clientcmd.Load(b)
	if err != nil {
		return nil, false
	}
	for _, u := range cfg.AuthInfos {
		if len(u.ClientCertificateData) > 0 {
			return u.ClientCertificateData, true
		}
	}
	return nil, false
}
