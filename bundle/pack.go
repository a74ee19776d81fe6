package bundle

import (
	"archive/tar"
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// The image pack is the companion format of thin bundles: one file that
// carries every image of a cluster once, as an OCI image layout in a tar,
// with an index as its first entry so that a node reads only its own blobs
// (docs/bundle-format.md, "The image pack").
const (
	PackFormatVersion = 1
	// PackFile is the pack's name beside the bundles.
	PackFile = "images.pack"
	// PackIndexName is the pack's first entry.
	PackIndexName     = "airadm-pack.json"
	packBlobsPrefix   = "blobs/sha256/"
	packIndexJSON     = "index.json"
	packOCILayoutName = "oci-layout"
)

// ErrOtherPack means the pack is intact but not the one the bundle names:
// another build's.
var ErrOtherPack = errors.New("the pack is not the one this bundle was built with")

// PackIndex is airadm-pack.json: the pack's images and blobs. The position
// of each blob in the file follows from it (Pack.layout), so it lists none.
type PackIndex struct {
	FormatVersion int          `json:"formatVersion"`
	Images        []ImageEntry `json:"images"`
	Blobs         []BlobEntry  `json:"blobs"`
}

var packIndexSchema = []member{
	{name: "formatVersion", kind: kInteger},
	manifestSchema[7], // images
	manifestSchema[8], // blobs
}

// DecodePackIndex parses airadm-pack.json as strictly as DecodeManifest
// parses a manifest.
func DecodePackIndex(b []byte) (*PackIndex, error) {
	if len(b) > maxManifestLen {
		return nil, fmt.Errorf("decoding %s: %d bytes is larger than the %d an index may have", PackIndexName, len(b), maxManifestLen)
	}
	if err := checkSchema(b, "the pack index", packIndexSchema); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", PackIndexName, err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var ix PackIndex
	if err := dec.Decode(&ix); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", PackIndexName, err)
	}
	if ix.FormatVersion != PackFormatVersion {
		return nil, fmt.Errorf("checking %s: pack format version %d is not supported (this airadm reads version %d)", PackIndexName, ix.FormatVersion, PackFormatVersion)
	}
	if err := validateImages(ix.Images, ix.Blobs); err != nil {
		return nil, fmt.Errorf("checking %s: %w", PackIndexName, err)
	}
	return &ix, nil
}

// packEntry is one entry of the pack: where its data starts and how long
// it is.
type packEntry struct {
	name      string
	off, size int64
	sha256    string // hex, for blobs
	content   []byte // exact bytes, for index.json and oci-layout
}

func padded(n int64) int64 { return (n + blockSize - 1) / blockSize * blockSize }

// layout places every entry after an index of indexLen bytes, as writers
// write them, and returns the file's total size.
func (ix *PackIndex) layout(indexLen int64) ([]packEntry, int64, error) {
	index, err := (&Manifest{Images: ix.Images}).IndexJSON()
	if err != nil {
		return nil, 0, err
	}
	var out []packEntry
	off := blockSize + padded(indexLen)
	add := func(e packEntry) {
		e.off = off + blockSize
		out = append(out, e)
		off = e.off + padded(e.size)
	}
	for _, b := range ix.Blobs {
		hexDigest := strings.TrimPrefix(b.Digest, "sha256:")
		add(packEntry{name: packBlobsPrefix + hexDigest, size: b.Size, sha256: hexDigest})
	}
	add(packEntry{name: packIndexJSON, size: int64(len(index)), content: index})
	add(packEntry{name: packOCILayoutName, size: int64(len(ociLayout)), content: []byte(ociLayout)})
	return out, off + 2*blockSize, nil
}

// WritePack writes the pack holding images, each blob once, copying blobs
// from store and checking them against their digests. It returns the index
// and the pack digest (the sha256 of the index), which thin bundles name.
func WritePack(w io.Writer, images []Image, store BlobStore) (*PackIndex, string, error) {
	ix := &PackIndex{FormatVersion: PackFormatVersion}
	var unique []Image
	seen := map[string]bool{}
	for _, im := range images {
		if !seen[im.Ref] {
			seen[im.Ref] = true
			unique = append(unique, im)
		}
	}
	ix.Images, ix.Blobs = imageEntries(unique)
	if err := validateImages(ix.Images, ix.Blobs); err != nil {
		return nil, "", fmt.Errorf("building %s: %w", PackIndexName, err)
	}
	ib, err := json.MarshalIndent(ix, "", "  ")
	if err != nil {
		return nil, "", fmt.Errorf("encoding %s: %w", PackIndexName, err)
	}
	ib = append(ib, '\n')
	entries, _, err := ix.layout(int64(len(ib)))
	if err != nil {
		return nil, "", err
	}
	tw := tar.NewWriter(w)
	if err := writeEntry(tw, PackIndexName, 0o644, int64(len(ib)), func(w io.Writer) error { _, err := w.Write(ib); return err }); err != nil {
		return nil, "", err
	}
	buf := newHashPipe()
	for _, e := range entries {
		fill := func(w io.Writer) error { _, err := w.Write(e.content); return err }
		if e.content == nil {
			h, err := v1.NewHash("sha256:" + e.sha256)
			if err != nil {
				return nil, "", err
			}
			fill = func(w io.Writer) error { return copyBlob(w, store, h, e.size, buf) }
		}
		if err := writeEntry(tw, e.name, 0o644, e.size, fill); err != nil {
			return nil, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, "", fmt.Errorf("finishing pack: %w", err)
	}
	sum := sha256.Sum256(ib)
	return ix, "sha256:" + hex.EncodeToString(sum[:]), nil
}

// Pack is an opened image pack: its index has been read and checked, and
// nothing else.
type Pack struct {
	Index *PackIndex
	// Digest is the sha256 of the index: the pack digest thin bundles name.
	Digest  string
	r       io.ReaderAt
	entries []packEntry
	byBlob  map[string]packEntry // by digest
}

// OpenPack reads the pack's first entry, its index, and checks that the
// file has exactly the length the index implies; it reads nothing else.
// Blobs are verified as they are read (ReadBlobs), or all at once
// (VerifyPack).
func OpenPack(r io.ReaderAt, size int64) (*Pack, error) {
	ix, digest, ib, err := readPackIndex(io.NewSectionReader(r, 0, size))
	if err != nil {
		return nil, err
	}
	entries, total, err := ix.layout(int64(len(ib)))
	if err != nil {
		return nil, &EntryError{Entry: PackIndexName, Err: err}
	}
	switch {
	case size < total:
		return nil, &EntryError{Err: fmt.Errorf("the pack is %d bytes, its index implies %d: %w", size, total, ErrTruncated)}
	case size > total:
		return nil, &EntryError{Err: fmt.Errorf("the pack is %d bytes, its index implies %d: data after the end of the archive", size, total)}
	}
	p := &Pack{Index: ix, Digest: digest, r: r, entries: entries, byBlob: map[string]packEntry{}}
	for _, e := range entries {
		if e.sha256 != "" {
			p.byBlob["sha256:"+e.sha256] = e
		}
	}
	return p, nil
}

// readPackIndex reads the index entry (header, data, padding) from the
// start of a pack.
func readPackIndex(r io.Reader) (*PackIndex, string, []byte, error) {
	var blk [blockSize]byte
	if _, err := io.ReadFull(r, blk[:]); err != nil {
		return nil, "", nil, &EntryError{Entry: PackIndexName, Err: fmt.Errorf("reading its header: %w", truncated(err))}
	}
	h, err := parseHeader(blk[:])
	if err != nil {
		return nil, "", nil, &EntryError{Entry: PackIndexName, Err: err}
	}
	if h.name != PackIndexName {
		return nil, "", nil, &EntryError{Entry: h.name, Err: fmt.Errorf("the first entry of a pack must be %s", PackIndexName)}
	}
	if h.size > maxManifestLen {
		return nil, "", nil, &EntryError{Entry: PackIndexName, Err: fmt.Errorf("%d bytes is larger than the %d an index may have", h.size, maxManifestLen)}
	}
	if want := canonicalHeader(PackIndexName, h.size); !bytes.Equal(blk[:], want) {
		return nil, "", nil, &EntryError{Entry: PackIndexName, Err: errors.New("header differs from the one writers write")}
	}
	ib := make([]byte, padded(h.size))
	if _, err := io.ReadFull(r, ib); err != nil {
		return nil, "", nil, &EntryError{Entry: PackIndexName, Err: truncated(err)}
	}
	if !allZero(ib[h.size:]) {
		return nil, "", nil, &EntryError{Entry: PackIndexName, Err: errors.New("the padding after the entry is not zero")}
	}
	ib = ib[:h.size]
	ix, err := DecodePackIndex(ib)
	if err != nil {
		return nil, "", nil, &EntryError{Entry: PackIndexName, Err: err}
	}
	sum := sha256.Sum256(ib)
	return ix, "sha256:" + hex.EncodeToString(sum[:]), ib, nil
}

// canonicalHeader is the one header writers write for a pack entry.
func canonicalHeader(name string, size int64) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	// Cannot fail for the names and sizes a validated index yields; a
	// failure leaves b short, and the comparison fails.
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size, ModTime: epoch, Format: tar.FormatUSTAR})
	return b.Bytes()
}

// Check makes sure the pack is the one m names and holds m's images as m
// lists them, reading nothing.
func (p *Pack) Check(m *Manifest) error {
	if m.Pack == "" {
		return &EntryError{Entry: ManifestName, Err: errors.New("the bundle is self-contained: it names no pack")}
	}
	if m.Pack != p.Digest {
		return &EntryError{Entry: PackIndexName, Err: fmt.Errorf("%w (another build's?): its digest is %s, the bundle names %s", ErrOtherPack, p.Digest, m.Pack)}
	}
	// With equal digests these hold; they are checked so that a reader
	// never depends on that argument alone.
	images := map[string]ImageEntry{}
	for _, im := range p.Index.Images {
		images[im.Ref] = im
	}
	for _, im := range m.Images {
		if got, ok := images[im.Ref]; !ok || got != im {
			return &EntryError{Entry: PackIndexName, Err: fmt.Errorf("image %s: the pack does not hold it as the bundle lists it", im.Ref)}
		}
	}
	for _, b := range m.Blobs {
		if e, ok := p.byBlob[b.Digest]; !ok || e.size != b.Size {
			return &EntryError{Entry: packBlobsPrefix + strings.TrimPrefix(b.Digest, "sha256:"), Err: errors.New("the pack does not hold this blob of the bundle")}
		}
	}
	return nil
}

// ReadBlobs reads the blobs m lists, and only those, from the pack, in the
// pack's order, verifying each against its digest at its end (unless
// v.BlobDigestsCheckedByConsumer) and the images' references at the end.
// v.Blob sees each blob as Read's does, and v.Held may pass over blobs as
// in Read; v.File is not used.
func (p *Pack) ReadBlobs(m *Manifest, v Visitor) error {
	if err := p.Check(m); err != nil {
		return err
	}
	manifests := map[string][]byte{}
	for _, im := range m.Images {
		manifests[strings.TrimPrefix(im.Digest, "sha256:")] = nil
	}
	buf := make([]byte, 1<<20)
	for _, b := range m.Blobs {
		e := p.byBlob[b.Digest]
		vr := &verifyingReader{r: io.NewSectionReader(p.r, e.off, e.size), size: e.size}
		if !v.BlobDigestsCheckedByConsumer || v.Blob == nil {
			vr.sum, vr.wantHex = sha256.New(), e.sha256
		}
		if _, ok := manifests[e.sha256]; ok {
			vr.keep = &bytes.Buffer{}
		} else if v.Held != nil && v.Held(HeldEntry{Blob: &b}) {
			continue
		}
		if v.Blob != nil {
			if err := v.Blob(b, vr); err != nil {
				var ee *EntryError
				if errors.As(err, &ee) {
					return err
				}
				return &EntryError{Entry: e.name, Err: err}
			}
		}
		if _, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, vr, buf); err != nil {
			return &EntryError{Entry: e.name, Err: err}
		}
		if vr.keep != nil {
			manifests[e.sha256] = vr.keep.Bytes()
		}
	}
	return checkReferences(m, manifests)
}

// VerifyPack streams a whole pack, checking every byte: the index, each
// header against the one writers write, each blob's digest, the derived
// index.json and oci-layout, zero padding, the end-of-archive marker and
// that nothing follows, and that the images' references match the blobs.
// It reads r to its end, so a caller can hash the file in the same pass.
func VerifyPack(r io.Reader) (*PackIndex, string, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	ix, digest, ib, err := readPackIndex(br)
	if err != nil {
		return nil, "", err
	}
	entries, _, err := ix.layout(int64(len(ib)))
	if err != nil {
		return nil, "", &EntryError{Entry: PackIndexName, Err: err}
	}
	manifests := map[string][]byte{}
	for _, im := range ix.Images {
		manifests[strings.TrimPrefix(im.Digest, "sha256:")] = nil
	}
	var blk [blockSize]byte
	buf := make([]byte, 1<<20)
	for _, e := range entries {
		if _, err := io.ReadFull(br, blk[:]); err != nil {
			return nil, "", &EntryError{Entry: e.name, Err: fmt.Errorf("reading its header: %w", truncated(err))}
		}
		if !bytes.Equal(blk[:], canonicalHeader(e.name, e.size)) {
			got, _ := parseHeader(blk[:])
			return nil, "", &EntryError{Entry: e.name, Err: fmt.Errorf("missing where %q stands, or its header differs from the one writers write", got.name)}
		}
		vr := &verifyingReader{r: io.LimitReader(br, e.size), size: e.size, want: e.content}
		if e.sha256 != "" {
			vr.sum, vr.wantHex = sha256.New(), e.sha256
		}
		if _, ok := manifests[e.sha256]; ok && e.sha256 != "" {
			vr.keep = &bytes.Buffer{}
		}
		if _, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, vr, buf); err != nil {
			return nil, "", &EntryError{Entry: e.name, Err: err}
		}
		if vr.keep != nil {
			manifests[e.sha256] = vr.keep.Bytes()
		}
		pad := blk[:padded(e.size)-e.size]
		if _, err := io.ReadFull(br, pad); err != nil {
			return nil, "", &EntryError{Entry: e.name, Err: fmt.Errorf("reading the padding: %w", truncated(err))}
		}
		if !allZero(pad) {
			return nil, "", &EntryError{Entry: e.name, Err: errors.New("the padding after the entry is not zero")}
		}
	}
	for i := 0; i < 2; i++ {
		if _, err := io.ReadFull(br, blk[:]); err != nil {
			return nil, "", &EntryError{Err: fmt.Errorf("reading the end-of-archive marker: %w", truncated(err))}
		}
		if !allZero(blk[:]) {
			got, _ := parseHeader(blk[:])
			return nil, "", &EntryError{Entry: got.name, Err: errors.New("unknown entry: not in the pack index")}
		}
	}
	if _, err := br.ReadByte(); err != io.EOF {
		return nil, "", &EntryError{Err: errors.New("data after the end of the archive")}
	}
	if err := checkReferences(&Manifest{Images: ix.Images, Blobs: ix.Blobs}, manifests); err != nil {
		return nil, "", err
	}
	return ix, digest, nil
}
