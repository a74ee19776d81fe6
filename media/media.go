// Package media writes install media from built bundles: an ISO 9660 image
// for a cluster, a raw USB disk image (GPT, one FAT32 partition) with the same
// content, and a per-node cloud-init NoCloud seed (ISO or FAT, labelled
// CIDATA). It reads what airadm build wrote (the bundles and SHA256SUMS) and
// the config (for node addresses), verifies every bundle before anything is
// written, and writes images through github.com/diskfs/go-diskfs.
//
// Writing is split in two so that tests and other tools can reuse the
// halves: a Tree says what a medium holds (ClusterTree, SeedTree), and
// WriteISO and WriteFAT lay a Tree out as an image.
package media

import (
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

// InputError is bad input found before anything was written: a missing or
// unvouched-for bundle, an unknown node, a runner for the wrong platform, a
// file too large for the chosen filesystem. The CLI exits 2.
type InputError struct{ Err error }

func (e *InputError) Error() string { return e.Err.Error() }
func (e *InputError) Unwrap() error { return e.Err }

func inputErrorf(format string, args ...any) error {
	return &InputError{fmt.Errorf(format, args...)}
}

// Bundle is one verified bundle.
type Bundle struct {
	Node render.Node
	// Name is the file name, <node>.bundle, as SHA256SUMS lists it.
	Name string
	Path string
	Size int64
	// SHA256 is the whole file's hex sha256 and ManifestDigest its
	// manifest's digest, both as verified.
	SHA256         string
	ManifestDigest string
	BuildTime      time.Time
	modTime        time.Time
	// pack is the pack digest a thin bundle names.
	pack string
	// verified is set once every byte has been read and checked; until
	// then the fields above are what the manifest and SHA256SUMS claim.
	// fileChecked says whether that check included SHA256 (see
	// VerifyEntries).
	verified, fileChecked bool
}

// Source is the verified input of every medium: the bundles of the chosen
// nodes, in config order.
type Source struct {
	Cluster *render.Cluster
	Dir     string
	Bundles []Bundle
	// Pack is the build's images.pack, verified, when the bundles are thin;
	// every medium carries it once.
	Pack *Bundle
	// Meter, when set, counts what Verify reads and what the Trees made
	// of this Source copy.
	Meter *Meter
	// Signed holds the build's SHA256SUMS and SHA256SUMS.sig, byte for
	// byte, when the build was signed: a medium then carries both as they
	// are, since any other SHA256SUMS would break the signature.
	Signed *SignedSums
}

// SignedSums is a signed build's SHA256SUMS and its signature.
type SignedSums struct {
	Sums, Sig []byte
}

// SizeLimit is the largest file a filesystem holds; the zero value is no
// limit.
type SizeLimit struct {
	Bytes      int64
	Filesystem string
}

// FAT32 is FAT32's limit: 4 GiB less one byte.
func FAT32() SizeLimit { return SizeLimit{FATMaxFile, "FAT32"} }

// Open verifies the bundles of nodes (all of the cluster's when empty) in
// dir against dir/SHA256SUMS: each file's sha256 must match its line, and
// each bundle must pass the reader's checks of every entry and be the
// named node's bundle of this cluster. Sizes are checked against limit
// before any bundle is read, so a file too large for the chosen filesystem
// is refused at once. It is Scan and then Verify.
func Open(dir string, c *render.Cluster, nodes []string, limit SizeLimit) (*Source, error) {
	s, err := Scan(dir, c, nodes, limit)
	if err != nil {
		return nil, err
	}
	if err := s.Verify(); err != nil {
		return nil, err
	}
	return s, nil
}

// Scan does what Open does short of reading every byte: it checks the
// nodes, SHA256SUMS and its signature, each file's size against limit and
// its line, and reads each bundle's manifest (its node, cluster, build time,
// pack and digest: all a Tree needs). What a manifest claims is checked
// against the line and the config, and a bundle that fails is verified at
// once, so its error is the verifying reader's, as from Open. The Source
// must pass Verify before any of its bytes reach a medium: copies refuse a
// file that has not (see copyInto and checkVerified), and WriteISO runs
// Verify while go-diskfs lays the image out, copying into a temporary file
// meanwhile that it renames into place only once Verify has passed.
func Scan(dir string, c *render.Cluster, nodes []string, limit SizeLimit) (*Source, error) {
	var chosen []render.Node
	if len(nodes) == 0 {
		chosen = c.Nodes
	}
	for _, name := range nodes {
		n, ok := c.Node(name)
		if !ok {
			var names []string
			for _, n := range c.Nodes {
				names = append(names, n.Name)
			}
			return nil, inputErrorf("choosing nodes: no node %q in the config (nodes: %s)", name, strings.Join(names, ", "))
		}
		if !slices.ContainsFunc(chosen, func(o render.Node) bool { return o.Name == name }) {
			chosen = append(chosen, n)
		}
	}
	sumsPath := filepath.Join(dir, trust.SumsFile)
	sums, err := trust.ReadSums(sumsPath)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, inputErrorf("reading %s: no such file: build the bundles first (airadm build -o %s)", sumsPath, dir)
		}
		return nil, &InputError{err}
	}
	src := &Source{Cluster: c, Dir: dir}
	if sig, err := os.ReadFile(filepath.Join(dir, trust.SigFile)); err == nil {
		raw, err := os.ReadFile(sumsPath)
		if err != nil {
			return nil, &InputError{fmt.Errorf("reading %s: %w", sumsPath, err)}
		}
		// Checked here against the key it names, and again, with the
		// whole SHA256SUMS, as each bundle is verified (trust.Find).
		if _, err := trust.CheckSignature(raw, sig, nil); err != nil {
			return nil, &InputError{err}
		}
		src.Signed = &SignedSums{Sums: raw, Sig: sig}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("reading %s: %w", trust.SigFile, err)
	}
	for _, n := range chosen {
		b := Bundle{Node: n, Name: n.Name + ".bundle"}
		b.Path = filepath.Join(dir, b.Name)
		fi, err := os.Stat(b.Path)
		if err != nil {
			return nil, inputErrorf("reading bundle of %s: %w: build it first (airadm build -o %s %s)", n.Name, err, dir, n.Name)
		}
		if limit.Bytes > 0 && fi.Size() > limit.Bytes {
			return nil, inputErrorf("%s is %s, larger than %s allows (%s): %s", b.Path, humanSize(fi.Size()), limit.Filesystem, humanSize(limit.Bytes), tooLargeHint)
		}
		s, ok := sums[b.Name]
		if !ok || s.File == "" {
			return nil, inputErrorf("verifying %s: %s has no sha256 line for %s; rebuild with airadm build -o %s", b.Path, sumsPath, b.Name, dir)
		}
		b.Size, b.modTime = fi.Size(), fi.ModTime()
		src.Bundles = append(src.Bundles, b)
	}
	// Every size is known to fit; now read what each bundle claims.
	for i := range src.Bundles {
		b := &src.Bundles[i]
		if b.peek(c.Name, sums[b.Name]) {
			continue
		}
		if err := b.verify(c.Name, true, nil); err != nil {
			return nil, err
		}
	}
	if err := src.scanPack(sums, limit); err != nil {
		return nil, err
	}
	return src, nil
}

// peek reads b's manifest and records what it claims, reporting whether
// that is consistent: the node and cluster it should be, and the manifest
// digest its line gives. A bundle that is not is left to the verifying
// reader, whose checks say why.
func (b *Bundle) peek(cluster string, line trust.Sum) bool {
	f, err := os.Open(b.Path)
	if err != nil {
		return false
	}
	defer f.Close()
	m, digest, err := bundle.PeekManifest(f)
	if err != nil || m.Node != b.Node.Name || m.Cluster != cluster || (line.Manifest != "" && line.Manifest != digest) {
		return false
	}
	b.SHA256, b.ManifestDigest, b.BuildTime, b.pack = line.File, digest, m.BuildTime, m.Pack
	return true
}

// Verify reads every byte of every file s names that has not been verified
// yet: each bundle through the verifying reader and against its line in
// SHA256SUMS, and the image pack whole. A bundle must also be what Scan
// found in it, unchanged since.
func (s *Source) Verify() error { return s.verifyAll(true) }

// VerifyEntries is Verify without the sha256 of each whole bundle file
// when SHA256SUMS gives its manifest digest, and of the image pack, whose
// pack digest the bundles name: the entries and the manifest
// digest are checked, every byte read. It serves a medium whose copy pass
// hashes each file against its line anyway (copyInto): by the bundle
// format a manifest digest admits exactly one file (docs/bundle-format.md,
// Authenticity; apply reads by trust.Vouch.ManifestBound for the same
// reason), so a third sha256 of every byte, before the copy, proves
// nothing the copy does not, and costs a core for as long as the read.
func (s *Source) VerifyEntries() error { return s.verifyAll(false) }

func (s *Source) verifyAll(wholeFile bool) error {
	s.Meter.expectVerify(s)
	for i := range s.Bundles {
		b := &s.Bundles[i]
		if b.verified {
			continue
		}
		peeked := *b
		if err := b.verify(s.Cluster.Name, wholeFile, s.Meter); err != nil {
			return err
		}
		if b.ManifestDigest != peeked.ManifestDigest || b.SHA256 != peeked.SHA256 {
			b.verified = false // a Tree made before holds what Scan saw
			return inputErrorf("verifying %s: it changed while it was read; run again once nothing writes it", b.Path)
		}
	}
	if s.Pack != nil && !s.Pack.verified {
		return s.verifyPack(wholeFile)
	}
	return nil
}

// scanPack finds the image pack the thin bundles name, checks its size
// and its line in SHA256SUMS; verifyPack reads it.
func (s *Source) scanPack(sums trust.Sums, limit SizeLimit) error {
	want := ""
	for _, b := range s.Bundles {
		switch {
		case b.pack == "":
		case want == "":
			want = b.pack
		case b.pack != want:
			return inputErrorf("verifying %s: its bundles name two image packs (%s and %s); rebuild them together", s.Dir, want, b.pack)
		}
	}
	if want == "" {
		return nil
	}
	p := &Bundle{Name: bundle.PackFile, Path: filepath.Join(s.Dir, bundle.PackFile)}
	fi, err := os.Stat(p.Path)
	if err != nil {
		return inputErrorf("opening the image pack the thin bundles need: %w", err)
	}
	if limit.Bytes > 0 && fi.Size() > limit.Bytes {
		return inputErrorf("%s is %s, larger than %s allows (%s): write an ISO instead (airadm media iso), which has no such limit", p.Path, humanSize(fi.Size()), limit.Filesystem, humanSize(limit.Bytes))
	}
	line, ok := sums[bundle.PackFile]
	if !ok || line.File == "" {
		return inputErrorf("verifying %s: %s has no sha256 line for it; rebuild with airadm build --pack", p.Path, trust.SumsFile)
	}
	p.Size, p.modTime, p.SHA256, p.ManifestDigest = fi.Size(), fi.ModTime(), line.File, want
	s.Pack = p
	return nil
}

// verifyPack verifies the image pack, every byte, against the digest the
// bundles name and, with wholeFile, its line in SHA256SUMS. Without it the
// copy pass checks that line (checkCopied), as for a bundle verified by its
// entries: the pack digest vouches for the whole pack as a manifest digest
// does for a bundle (docs/bundle-format.md, The image pack).
func (s *Source) verifyPack(wholeFile bool) error {
	p := s.Pack
	f, err := os.Open(p.Path)
	if err != nil {
		return inputErrorf("opening the image pack the thin bundles need: %w", err)
	}
	defer f.Close()
	r := s.Meter.verifying(f)
	h := sha256.New()
	if wholeFile {
		r = io.TeeReader(r, h)
	}
	_, digest, err := bundle.VerifyPack(r)
	if err != nil {
		return &InputError{fmt.Errorf("verifying %s: %w", p.Path, err)}
	}
	if wholeFile {
		if got := hex.EncodeToString(h.Sum(nil)); got != p.SHA256 {
			return inputErrorf("verifying %s: its sha256 is %s, %s says %s", p.Path, got, trust.SumsFile, p.SHA256)
		}
	}
	if digest != p.ManifestDigest {
		return inputErrorf("verifying %s: it is not the pack the bundles name (%s, they name %s)", p.Path, digest, p.ManifestDigest)
	}
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("verifying %s: %w", p.Path, err)
	}
	if fi.Size() != p.Size || !fi.ModTime().Equal(p.modTime) {
		return inputErrorf("verifying %s: it changed while it was read; run again once nothing writes it", p.Path)
	}
	p.verified, p.fileChecked = true, wholeFile
	return nil
}

// tooLargeHint says what to do about a bundle over the FAT32 limit.
const tooLargeHint = "write an ISO instead (airadm media iso), which has no such limit, or build that node's bundle smaller (fewer [images] extra or [host] files)"

// verify reads b through the verifying reader; with wholeFile, or when
// SHA256SUMS gives no manifest digest, it also hashes the whole file
// against its line (see VerifyEntries).
func (b *Bundle) verify(cluster string, wholeFile bool, m *Meter) error {
	v, err := trust.Find(b.Path, "", nil)
	if err != nil {
		return &InputError{err}
	}
	f, err := os.Open(b.Path)
	if err != nil {
		return &InputError{fmt.Errorf("opening bundle: %w", err)}
	}
	defer f.Close()
	r := m.verifying(f)
	wantFile := v.FileSHA256
	wholeFile = wholeFile || v.ManifestDigest == ""
	var man *bundle.Manifest
	var digest, got string
	if wholeFile {
		// trust.Verify would hash the whole file in the reader's pass;
		// hashing it on another core instead halves the wall time of
		// this pass, which reads every byte before anything is written.
		whole := newPipeHash()
		v.FileSHA256 = ""
		man, digest, err = trust.Verify(io.TeeReader(r, whole), v, bundle.Visitor{})
		if err == nil {
			// The reader stops at the end of the archive; anything after
			// it still counts, as it does for sha256sum.
			_, err = io.Copy(whole, r)
		}
		got = whole.sum()
	} else {
		// The reader still reads to the end and refuses any byte after
		// the archive.
		man, digest, err = trust.Verify(r, v.ManifestBound(), bundle.Visitor{})
		got = wantFile // as claimed; copyInto checks it
	}
	if err != nil {
		// Damaged, truncated or another build: refused as bad input
		// (the reader's own error types stay inside).
		return &InputError{fmt.Errorf("verifying %s: %w", b.Path, err)}
	}
	if got != wantFile {
		return &InputError{fmt.Errorf("verifying %s: file sha256 %s is not %s from %s (the file was altered outside its entries, or is another build): %w", b.Path, got, wantFile, v.From, trust.ErrUntrusted)}
	}
	if man.Node != b.Node.Name || man.Cluster != cluster {
		return inputErrorf("verifying %s: it is node %s of cluster %s, not node %s of cluster %s", b.Path, man.Node, man.Cluster, b.Node.Name, cluster)
	}
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("verifying %s: %w", b.Path, err)
	}
	if fi.Size() != b.Size || !fi.ModTime().Equal(b.modTime) {
		return inputErrorf("verifying %s: it changed while it was read; run again once nothing writes it", b.Path)
	}
	b.SHA256, b.ManifestDigest, b.BuildTime, b.pack = got, digest, man.BuildTime, man.Pack
	b.verified, b.fileChecked = true, wholeFile
	return nil
}

// Epoch is the time every medium records: the latest build time of its
// bundles (which honours SOURCE_DATE_EPOCH at build time), so the same
// bundles give the same image bytes.
func (s *Source) Epoch() time.Time {
	var t time.Time
	for _, b := range s.Bundles {
		if b.BuildTime.After(t) {
			t = b.BuildTime
		}
	}
	return t.UTC()
}

// Bundle returns the verified bundle of node.
func (s *Source) Bundle(node string) (Bundle, bool) {
	for _, b := range s.Bundles {
		if b.Node.Name == node {
			return b, true
		}
	}
	return Bundle{}, false
}

// elfMachine is the ELF machine that binaries for GOARCH arch declare.
func elfMachine(arch string) (elf.Machine, bool) {
	switch arch {
	case "amd64":
		return elf.EM_X86_64, true
	case "arm64":
		return elf.EM_AARCH64, true
	case "arm":
		return elf.EM_ARM, true
	case "386":
		return elf.EM_386, true
	case "ppc64le":
		return elf.EM_PPC64, true
	case "s390x":
		return elf.EM_S390, true
	case "riscv64":
		return elf.EM_RISCV, true
	}
	return 0, false
}

// Runner chooses the airadm binary the media carry for nodes of platform
// (os/arch[/variant]). flag is --runner; self is the running binary and
// goos/goarch its platform. With no flag, self serves when the platforms
// match. A runner given by flag must be an ELF executable for the nodes'
// architecture.
func Runner(platform, flag, self, goos, goarch string) (string, error) {
	parts := strings.Split(platform, "/")
	if len(parts) < 2 || parts[0] != "linux" {
		return "", inputErrorf("choosing the runner: the nodes' platform %q is not linux/<arch>", platform)
	}
	arch := parts[1]
	if flag == "" {
		if goos == "linux" && goarch == arch {
			return self, nil
		}
		return "", inputErrorf("choosing the runner: the nodes are %s and this airadm is %s/%s: pass --runner with an airadm built for them (GOOS=linux GOARCH=%s go build)", platform, goos, goarch, arch)
	}
	want, ok := elfMachine(arch)
	if !ok {
		return "", inputErrorf("choosing the runner: no known ELF machine for architecture %q", arch)
	}
	f, err := elf.Open(flag)
	if err != nil {
		return "", inputErrorf("checking --runner %s: %w: want an airadm built for %s", flag, err, platform)
	}
	defer f.Close()
	if f.Machine != want {
		return "", inputErrorf("checking --runner %s: it is an ELF for %s, not for %s (%s)", flag, f.Machine, platform, want)
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return "", inputErrorf("checking --runner %s: it is an ELF %s, not an executable", flag, f.Type)
	}
	return flag, nil
}

func humanSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
