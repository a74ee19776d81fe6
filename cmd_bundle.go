package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/build"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/trust"
)

// BuildCmd renders, pulls and writes one bundle per node.
type BuildCmd struct {
	configFlag
	Out   string `short:"o" default:"out" help:"Directory for <node>.bundle and SHA256SUMS."`
	Cache string `help:"Content-addressed cache of image blobs and host files, shared by all builds (default: the user cache directory)."`
	Jobs  int    `default:"4" help:"Concurrent image transfers (at least 1)."`
	JSON  bool   `name:"json" help:"Print the bundles as a JSON array."`
	Renew bool   `help:"Reissue every leaf and kubeconfig client certificate, not only those within pki.renew_before of expiry (CAs, the service-account key and tokens are kept)."`
	// SignKey is read before anything is built, so a wrong key costs nothing.
	SignKey string   `type:"path" placeholder:"FILE" help:"Sign SHA256SUMS with this OpenSSH ed25519 private key, writing SHA256SUMS.sig (ssh-keygen -Y sign format, namespace airadm)."`
	Pack    bool     `help:"Write every image once, to images.pack, and thin bundles that name it (for fleets; default: self-contained bundles)."`
	Nodes   []string `arg:"" optional:"" help:"Nodes to build (default: all, removing the bundles of nodes no longer in the config)."`
}

func (cmd *BuildCmd) Validate() error {
	if cmd.Jobs < 1 {
		return fmt.Errorf("--jobs must be at least 1, not %d", cmd.Jobs)
	}
	return nil
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
	buildTime := env.Now()
	if s := env.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		secs, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return usageError{fmt.Errorf("reading SOURCE_DATE_EPOCH: %q is not a number of seconds", s)}
		}
		buildTime = time.Unix(secs, 0).UTC()
	}
	var signer ssh.Signer
	if cmd.SignKey != "" {
		if signer, err = trust.LoadSigner(cmd.SignKey); err != nil {
			return usageError{err}
		}
	}
	cacheDir := cmd.Cache
	if cacheDir == "" {
		if cacheDir, err = defaultCacheDir(); err != nil {
			return err
		}
	}
	ctx, stop := signalContext()
	defer stop()
	progress := newProgress(env)
	res, err := build.Run(ctx, build.Options{
		ConfigPath: cmd.Config, Cluster: c, Out: cmd.Out, CacheDir: cacheDir, Jobs: cmd.Jobs, Nodes: cmd.Nodes,
		Renew: cmd.Renew, BuildTime: buildTime, Now: env.Now, Rand: env.Rand, Signer: signer,
		Log:      func(line string) { progress.done(); fmt.Fprintln(env.Stderr, line) },
		Progress: progress.pull,
		Pack:     cmd.Pack,
	})
	progress.done()
	if err != nil {
		return err
	}
	if cmd.JSON {
		return json.NewEncoder(env.Stdout).Encode(res.Bundles)
	}
	if res.Pack != nil {
		fmt.Fprintf(env.Stdout, "%s  pack %s\n", res.Pack.Path, res.Pack.Digest)
	}
	for _, b := range res.Bundles {
		fmt.Fprintf(env.Stdout, "%s  manifest %s\n", b.Bundle, b.ManifestDigest)
	}
	return nil
}

// authFlags choose what must vouch for a bundle.
type authFlags struct {
	ManifestDigest       string   `help:"Manifest digest (sha256:<hex> or <hex>) to authenticate the bundle against (default: SHA256SUMS beside it)."`
	AllowUnauthenticated bool     `help:"Accept a bundle that nothing vouches for (no SHA256SUMS line, no --manifest-digest), checking its integrity only. Not with a trusted key."`
	TrustKey             []string `name:"trust-key" type:"path" placeholder:"FILE" help:"Trust builds signed by the keys in FILE (an OpenSSH public key or allowed_signers lines; repeatable), besides those in /etc/airadm/trusted-keys. With any key trusted, SHA256SUMS must carry a valid SHA256SUMS.sig by one of them."`
}

// vouch finds what vouches for the bundle, refusing an unauthenticated
// bundle unless that was allowed. hostKeys is the host's trusted-keys
// file, which may be absent.
func (f authFlags) vouch(path, hostKeys string) (trust.Vouch, error) {
	keys, err := trust.LoadKeys(f.TrustKey, hostKeys)
	if err != nil {
		return trust.Vouch{}, usageError{err}
	}
	v, err := trust.Find(path, f.ManifestDigest, keys)
	if err != nil {
		return v, usageError{err}
	}
	if !v.Authenticated() && !f.AllowUnauthenticated {
		return v, usageError{fmt.Errorf("authenticating %s: %s; pass --manifest-digest, put the build's SHA256SUMS beside it, or accept it unauthenticated with --allow-unauthenticated: %w", path, v.Why, trust.ErrUnauthenticated)}
	}
	return v, nil
}

// VerifyCmd checks a bundle byte for byte.
type VerifyCmd struct {
	authFlags
	Images string `type:"path" placeholder:"FILE" help:"A thin bundle's image pack (default: images.pack beside the bundle)."`
	Bundle string `arg:"" help:"Bundle file."`
	JSON   bool   `name:"json" help:"Print the result as JSON."`
}

func (cmd *VerifyCmd) Run(env *Env) error {
	v, err := cmd.vouch(cmd.Bundle, trust.TrustedKeysPath)
	if err != nil {
		return err
	}
	f, err := os.Open(cmd.Bundle)
	if err != nil {
		return usageError{fmt.Errorf("opening bundle: %w", err)}
	}
	defer f.Close()
	m, _, err := trust.Verify(f, v, bundle.Visitor{})
	if err != nil {
		return fmt.Errorf("verifying %s: %w", cmd.Bundle, err)
	}
	pack := ""
	if m.Pack != "" {
		// Its images: this node's blobs of the pack, read and hashed.
		o := phases.Options{Bundle: cmd.Bundle, Images: cmd.Images}
		if err := o.VerifyPack(m); err != nil {
			return fmt.Errorf("verifying %s: %w", cmd.Bundle, err)
		}
		pack = o.PackPath()
	}
	if cmd.JSON {
		return json.NewEncoder(env.Stdout).Encode(map[string]any{
			"bundle": cmd.Bundle, "ok": true, "cluster": m.Cluster, "node": m.Node, "role": m.Role,
			"files": len(m.Files), "images": len(m.Images), "blobs": len(m.Blobs),
			"pack": pack, "authenticatedBy": v.From, "fileSHA256Checked": v.FileSHA256 != "", "manifestDigestChecked": v.ManifestDigest != "",
			"signedBy": v.SignedBy, "signerTrusted": v.SignerTrusted, "recipient": m.Recipient,
		})
	}
	in := ""
	if pack != "" {
		in = " in " + pack
	}
	if m.Recipient != "" {
		// Checked as ciphertext: verify holds no key.
		in += ", secrets encrypted to " + m.Recipient
	}
	fmt.Fprintf(env.Stdout, "%s: ok: %s %s (%s), %d files, %d images, %d blobs%s; %s\n",
		cmd.Bundle, m.Cluster, m.Node, m.Role, len(m.Files), len(m.Images), len(m.Blobs), in, v.Describe())
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
	// Encrypted lists, for each encrypted file, its age header's recipient
	// stanzas: to whom it is encrypted, read without a key.
	Encrypted map[string][]trust.Stanza `json:"encrypted,omitempty"`
}

func (cmd *InspectCmd) Run(env *Env) error {
	var certs []certInfo
	encrypted := map[string][]trust.Stanza{}
	f, err := os.Open(cmd.Bundle)
	if err != nil {
		return usageError{fmt.Errorf("opening bundle: %w", err)}
	}
	defer f.Close()
	m, digest, err := bundle.Read(f, bundle.Visitor{File: func(fe bundle.FileEntry, r io.Reader) error {
		if fe.Encrypted() {
			st, err := trust.Stanzas(r)
			encrypted[fe.Path] = st
			return err
		}
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
		if len(encrypted) == 0 {
			encrypted = nil
		}
		return enc.Encode(inspection{Manifest: m, ManifestDigest: digest, Certificates: certs, Encrypted: encrypted})
	}
	w := env.Stdout
	fmt.Fprintf(w, "bundle      %s\nmanifest    %s\ncluster     %s\nnode        %s (%s)\nkubernetes  %s\nbuilt       %s\n",
		cmd.Bundle, digest, m.Cluster, m.Node, m.Role, m.KubernetesVersion, m.BuildTime.Format(time.RFC3339))
	if m.Pack != "" {
		fmt.Fprintf(w, "pack        %s (thin: its images are in the image pack of this digest)\n", m.Pack)
	}
	if m.Recipient != "" {
		fmt.Fprintf(w, "secrets     %d files encrypted to %s\n", len(encrypted), m.Recipient)
	}
	fmt.Fprintf(w, "\nfiles (%d)\n", len(m.Files))
	for _, fe := range m.Files {
		fmt.Fprintf(w, "  %s %9s  sha256:%s  %s", fe.Mode, humanBytes(fe.Size), fe.SHA256[:12], fe.Path)
		if fe.Encrypted() {
			fmt.Fprintf(w, "  [age: %s]", trust.DescribeStanzas(encrypted[fe.Path], m.Recipient))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\nimages (%d)\n", len(m.Images))
	for _, im := range m.Images {
		fmt.Fprintf(w, "  %s\n    %s  %s  %s\n", im.Ref, im.Digest, im.Platform, humanBytes(im.TotalSize))
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

// humanBytes prints a size in binary units, exact below 1 KiB.
func humanBytes(n int64) string {
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	f, unit := float64(n), "B"
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB"} {
		if f < 1024 {
			break
		}
		f, unit = f/1024, u
	}
	return fmt.Sprintf("%.1f %s", f, unit)
}
