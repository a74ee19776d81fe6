package media

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"

	"airadm.dev/airadm/trust"
)

// File is one file on a medium.
type File struct {
	// Path is slash-separated and relative to the medium's root.
	Path string
	// Mode is 0644, 0755 (the runner) or 0600 (bundles, which may hold
	// keys); filesystems without modes (FAT) drop it.
	Mode fs.FileMode
	// Data is the content of a small generated file; From names a file on
	// disk (a verified bundle, the runner) to copy instead.
	Data []byte
	From string
	Size int64
	// bundle, when set, is checked to be unchanged after it is copied.
	bundle *Bundle
	// sum is From's hex sha256, as verified.
	sum string
	// meter, when set, counts the bytes copied from From.
	meter *Meter
}

// Tree is what one medium holds, in the order it is written.
type Tree []File

// Layout of every medium: the runner at the root, bundles under bundles/
// with SHA256SUMS beside them, so that `cd bundles && sha256sum -c
// SHA256SUMS` checks the bundles and the runner (listed as ../airadm), and
// `airadm verify bundles/<node>.bundle` finds SHA256SUMS where it looks.
const (
	RunnerPath  = "airadm"
	BundleDir   = "bundles"
	InstallPath = "INSTALL.txt"
)

// Mount says how a medium is mounted, for INSTALL.txt: its label, and
// whether it is FAT (which has no modes, so it is mounted umask=077).
type Mount struct {
	Label string
	FAT   bool
}

func (m Mount) command() string {
	if m.FAT {
		return "mount -o ro,umask=077 LABEL=" + m.Label + " /mnt"
	}
	return "mount -o ro LABEL=" + m.Label + " /mnt       # or: mount -o ro /dev/sr0 /mnt"
}

// ClusterTree is the content of the cluster ISO and USB image: the runner,
// INSTALL.txt, and every bundle of src with its SHA256SUMS lines.
func ClusterTree(src *Source, runner string, m Mount) (Tree, error) {
	r, sum, err := runnerFile(runner)
	if err != nil {
		return nil, err
	}
	t := Tree{r, {Path: InstallPath, Mode: 0o644, Data: installText(src, sum, m)}}
	return append(t, bundleFiles(src, src.Bundles, sum)...).metered(src.Meter), nil
}

// SeedTree is node's cloud-init NoCloud seed: meta-data, network-config
// and user-data at the root (where NoCloud looks), with the runner, the
// node's bundle and SHA256SUMS in the cluster layout, so that one attached
// volume is all a machine needs.
func SeedTree(src *Source, runner, node string, fat bool) (Tree, error) {
	b, ok := src.Bundle(node)
	if !ok {
		return nil, inputErrorf("writing the seed of %s: its bundle was not opened", node)
	}
	r, sum, err := runnerFile(runner)
	if err != nil {
		return nil, err
	}
	seed := Seed(src.Cluster, b.Node, b.ManifestDigest)
	one := &Source{Cluster: src.Cluster, Dir: src.Dir, Bundles: []Bundle{b}, Signed: src.Signed}
	if b.pack != "" {
		one.Pack = src.Pack
	}
	t := Tree{
		{Path: "meta-data", Mode: 0o644, Data: seed.MetaData},
		{Path: "network-config", Mode: 0o644, Data: seed.NetworkConfig},
		{Path: "user-data", Mode: 0o644, Data: seed.UserData},
		r,
		{Path: InstallPath, Mode: 0o644, Data: installText(one, sum, Mount{Label: SeedLabel, FAT: fat})},
	}
	return append(t, bundleFiles(one, one.Bundles, sum)...).metered(src.Meter), nil
}

// WriteSeed writes node's NoCloud seed at path, as an ISO 9660 image
// ("iso") or a bare FAT32 volume ("fat"), both labelled CIDATA: what
// `airadm media cidata` writes, for tests and tools that attach it to a VM.
func WriteSeed(path string, src *Source, runner, node, format string, epoch time.Time) error {
	// A seed carries one bundle, so verifying it first costs little; the
	// Tree copies the Bundle, so it must be verified before SeedTree.
	if err := src.Verify(); err != nil {
		return err
	}
	t, err := SeedTree(src, runner, node, format == "fat")
	if err != nil {
		return err
	}
	switch format {
	case "iso":
		return WriteISO(path, t, ISOOptions{Label: SeedLabel, Epoch: epoch})
	case "fat":
		return WriteFAT(path, t, FATOptions{Label: SeedLabel, Epoch: epoch})
	}
	return inputErrorf("seed format %q: want iso or fat", format)
}

func runnerFile(p string) (File, string, error) {
	f, err := os.Open(p)
	if err != nil {
		return File{}, "", &InputError{fmt.Errorf("reading the runner: %w", err)}
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return File{}, "", fmt.Errorf("reading the runner %s: %w", p, err)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	return File{Path: RunnerPath, Mode: 0o755, From: p, Size: n, sum: sum}, sum, nil
}

// bundleFiles lists bundles/SHA256SUMS and the bundles. The medium's
// SHA256SUMS keeps the build's lines for these bundles only (a subset
// medium lists no file it lacks) and adds the runner.
func bundleFiles(src *Source, bs []Bundle, runnerSum string) Tree {
	sums := trust.Sums{"../" + RunnerPath: {File: runnerSum}}
	for _, b := range bs {
		sums[b.Name] = trust.Sum{File: b.SHA256, Manifest: b.ManifestDigest}
	}
	if src.Pack != nil {
		sums[src.Pack.Name] = trust.Sum{File: src.Pack.SHA256}
	}
	t := Tree{{Path: path.Join(BundleDir, trust.SumsFile), Mode: 0o644, Data: sums.Encode()}}
	if src.Signed != nil {
		// The build's own SHA256SUMS, which the signature covers: it may
		// list bundles this medium lacks (sha256sum -c --ignore-missing),
		// and not the runner, whose sha256 INSTALL.txt gives.
		t = Tree{
			{Path: path.Join(BundleDir, trust.SumsFile), Mode: 0o644, Data: src.Signed.Sums},
			{Path: path.Join(BundleDir, trust.SigFile), Mode: 0o644, Data: src.Signed.Sig},
		}
	}
	for i := range bs {
		b := &bs[i]
		t = append(t, File{Path: path.Join(BundleDir, b.Name), Mode: 0o600, From: b.Path, Size: b.Size, bundle: b, sum: b.SHA256})
	}
	if p := src.Pack; p != nil {
		// Once, beside the bundles, where apply looks for it.
		t = append(t, File{Path: path.Join(BundleDir, p.Name), Mode: 0o644, From: p.Path, Size: p.Size, bundle: p, sum: p.SHA256})
	}
	return t
}

// installText is INSTALL.txt: the exact commands, per node.
func installText(src *Source, runnerSum string, m Mount) []byte {
	c := src.Cluster
	var b strings.Builder
	fmt.Fprintf(&b, "airadm install medium for cluster %s (Kubernetes %s)\n\n", c.Name, c.KubernetesVersion)
	fmt.Fprintf(&b, "On each node, as root, mount this medium read-only:\n  %s\n\n", m.command())
	if src.Signed != nil {
		b.WriteString(`Check every file, then the node's bundle, then bring the node up:
  cd /mnt/bundles && sha256sum -c --ignore-missing SHA256SUMS && cd /
  sha256sum /mnt/airadm     # must be the runner's sha256 below
  /mnt/airadm verify /mnt/bundles/NODE.bundle
  /mnt/airadm apply /mnt/bundles/NODE.bundle

SHA256SUMS is signed (bundles/SHA256SUMS.sig, namespace airadm): a host
with the signing key in /etc/airadm/trusted-keys (or --trust-key KEY.pub)
accepts only bundles it signed; ssh-keygen -Y verify -n airadm checks it too.
`)
	} else {
		b.WriteString(`Check every file, then the node's bundle, then bring the node up:
  cd /mnt/bundles && sha256sum -c SHA256SUMS && cd /
  /mnt/airadm verify /mnt/bundles/NODE.bundle
  /mnt/airadm apply /mnt/bundles/NODE.bundle
`)
	}
	b.WriteString(`
Apply control-plane nodes first; workers join once the API answers.
If the medium is mounted noexec, copy the runner first:
  install -m 0755 /mnt/airadm /usr/local/bin/airadm

`)
	b.WriteString("Nodes on this medium:\n")
	for _, bd := range src.Bundles {
		fmt.Fprintf(&b, "  %-12s %-13s %-15s bundles/%s  manifest %s\n", bd.Node.Name, bd.Node.Role, bd.Node.Address, bd.Name, bd.ManifestDigest)
	}
	fmt.Fprintf(&b, "\nrunner: airadm  sha256 %s\n", runnerSum)
	return []byte(b.String())
}
