package bundle

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"sort"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"airadm.dev/airadm/render"
)

// Image is a pulled image ready to be written: the platform manifest and
// every blob it references, all present in a BlobStore.
type Image struct {
	Ref         string
	Platform    string
	Manifest    v1.Descriptor // the platform-specific manifest
	IndexDigest string        // set when Ref named a multi-platform index
	Blobs       []v1.Descriptor
}

// BlobStore hands out blobs by digest.
type BlobStore interface {
	Open(v1.Hash) (io.ReadCloser, error)
}

// Contents is everything one node's bundle holds.
type Contents struct {
	Cluster           string
	Node              string
	Role              string
	KubernetesVersion string
	BuildTime         time.Time
	Files             []render.File
	// StoredFiles are host files whose bytes are blobs of the BlobStore
	// (host binaries), streamed into the bundle rather than held in memory.
	StoredFiles []StoredFile
	Images      []Image
	// Pack, when set, is the digest of the image pack that carries Images:
	// the bundle is thin, listing its images and blobs without holding them.
	Pack string
	// Recipient and Encrypted: the Files at the paths in Encrypted hold
	// age files encrypted to Recipient (trust.EncryptSecrets makes them),
	// which the manifest marks as such.
	Recipient string
	Encrypted map[string]bool
}

// StoredFile is a host file whose contents are the blob Digest.
type StoredFile struct {
	Path   string
	Mode   fs.FileMode
	Digest v1.Hash
	Size   int64
}

// epoch is every entry's mtime: times in the tar carry no information, and a
// fixed one keeps output byte-identical across builds.
var epoch = time.Unix(0, 0).UTC()

// Manifest computes the manifest of c.
func (c Contents) Manifest() (*Manifest, error) {
	m := &Manifest{
		Cluster:           c.Cluster,
		Node:              c.Node,
		Role:              c.Role,
		KubernetesVersion: c.KubernetesVersion,
		BuildTime:         c.BuildTime.UTC().Truncate(time.Second),
		Files:             []FileEntry{},
		Images:            []ImageEntry{},
		Blobs:             []BlobEntry{},
		Pack:              c.Pack,
		Recipient:         c.Recipient,
	}
	for _, f := range c.Files {
		sum := sha256.Sum256(f.Data)
		fe := FileEntry{Path: f.Path, Mode: fmt.Sprintf("%04o", f.Mode.Perm()), Size: int64(len(f.Data)), SHA256: hex.EncodeToString(sum[:])}
		if c.Encrypted[f.Path] {
			fe.Encryption = Encryption
		}
		m.Files = append(m.Files, fe)
	}
	for _, f := range c.StoredFiles {
		m.Files = append(m.Files, FileEntry{Path: f.Path, Mode: fmt.Sprintf("%04o", f.Mode.Perm()), Size: f.Size, SHA256: f.Digest.Hex})
	}
	sort.Slice(m.Files, func(i, j int) bool { return m.Files[i].Path < m.Files[j].Path })
	m.Images, m.Blobs = imageEntries(c.Images)
	m.FormatVersion = m.lowestVersion()
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("building manifest: %w", err)
	}
	return m, nil
}

// imageEntries lists images by ref and their blobs, each once, by digest.
func imageEntries(images []Image) ([]ImageEntry, []BlobEntry) {
	out, list := []ImageEntry{}, []BlobEntry{}
	blobs := map[string]int64{}
	for _, im := range images {
		total := im.Manifest.Size
		for _, b := range im.Blobs {
			total += b.Size
		}
		out = append(out, ImageEntry{
			Ref: im.Ref, Digest: im.Manifest.Digest.String(), MediaType: string(im.Manifest.MediaType),
			Size: im.Manifest.Size, TotalSize: total, Platform: im.Platform, IndexDigest: im.IndexDigest,
		})
		blobs[im.Manifest.Digest.String()] = im.Manifest.Size
		for _, b := range im.Blobs {
			blobs[b.Digest.String()] = b.Size
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	for d, size := range blobs {
		list = append(list, BlobEntry{Digest: d, Size: size})
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Digest < list[j].Digest })
	return out, list
}

// Write writes the bundle of c to w, copying blobs from store as they are
// (no recompression) while checking them against their digests. It returns
// the manifest and its sha256, which authenticates the whole bundle.
func Write(w io.Writer, c Contents, store BlobStore) (*Manifest, string, error) {
	m, err := c.Manifest()
	if err != nil {
		return nil, "", err
	}
	mb, err := m.Encode()
	if err != nil {
		return nil, "", err
	}
	index, err := m.IndexJSON()
	if err != nil {
		return nil, "", err
	}
	tw := tar.NewWriter(w)
	if err := writeEntry(tw, ManifestName, 0o644, int64(len(mb)), func(w io.Writer) error { _, err := w.Write(mb); return err }); err != nil {
		return nil, "", err
	}
	data := map[string]render.File{}
	for _, f := range c.Files {
		data[f.Path] = f
	}
	stored := map[string]StoredFile{}
	for _, f := range c.StoredFiles {
		stored[f.Path] = f
	}
	buf := newHashPipe()
	for _, e := range m.entries(index) {
		var mode int64 = 0o644
		var fill func(io.Writer) error
		switch {
		case e.content != nil:
			fill = func(w io.Writer) error { _, err := w.Write(e.content); return err }
		case e.file != "" && stored[e.file].Path != "":
			f := stored[e.file]
			mode = int64(f.Mode.Perm())
			fill = func(w io.Writer) error { return copyBlob(w, store, f.Digest, f.Size, buf) }
		case e.file != "":
			f := data[e.file]
			mode = int64(f.Mode.Perm())
			fill = func(w io.Writer) error { _, err := w.Write(f.Data); return err }
		default:
			h, err := v1.NewHash("sha256:" + e.sha256)
			if err != nil {
				return nil, "", err
			}
			fill = func(w io.Writer) error { return copyBlob(w, store, h, e.size, buf) }
		}
		if err := writeEntry(tw, e.name, mode, e.size, fill); err != nil {
			return nil, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, "", fmt.Errorf("finishing bundle: %w", err)
	}
	sum := sha256.Sum256(mb)
	return m, "sha256:" + hex.EncodeToString(sum[:]), nil
}

func writeEntry(tw *tar.Writer, name string, mode, size int64, fill func(io.Writer) error) error {
	hdr := &tar.Header{
		Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: size,
		ModTime: epoch, Format: tar.FormatUSTAR,
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("writing entry %s: %w", name, err)
	}
	if err := fill(tw); err != nil {
		return fmt.Errorf("writing entry %s: %w", name, err)
	}
	return nil
}

func copyBlob(w io.Writer, store BlobStore, h v1.Hash, size int64, p *hashPipe) error {
	rc, err := store.Open(h)
	if err != nil {
		return err
	}
	defer rc.Close()
	sum := sha256.New()
	n, err := p.copy(w, io.LimitReader(rc, size+1), sum)
	if err != nil {
		return err
	}
	return checkDigest(sum, n, size, h.Hex)
}

// hashPipe copies while hashing what it copies on another goroutine: the
// caller's writer usually hashes the whole bundle too, and the two hashes
// of each byte then run on two cores instead of one after the other, which
// keeps writing a bundle of large blobs (host binaries, layers) close to
// the cost of one copy with one hash.
type hashPipe struct {
	free chan []byte
}

const pipeChunk = 1 << 20

// newHashPipe makes a pipe whose buffers are allocated at its first copy:
// a bundle without blobs (a thin worker's) never pays for them.
func newHashPipe() *hashPipe {
	return &hashPipe{}
}

// copy copies r to w, feeding the same bytes to sum, and returns how many
// bytes it copied. Every buffer is back in the pool when it returns.
func (p *hashPipe) copy(w io.Writer, r io.Reader, sum hash.Hash) (int64, error) {
	if p.free == nil {
		p.free = make(chan []byte, 3)
		for i := 0; i < cap(p.free); i++ {
			p.free <- make([]byte, pipeChunk)
		}
	}
	work := make(chan []byte, cap(p.free))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for b := range work {
			sum.Write(b)
			p.free <- b[:cap(b)]
		}
	}()
	var n int64
	var err error
	for {
		b := <-p.free
		k, rerr := io.ReadFull(r, b)
		if k > 0 {
			// Both read b; neither writes it, and it returns to the
			// pool only once hashed, after Write has returned.
			work <- b[:k]
			if _, werr := w.Write(b[:k]); werr != nil {
				err = werr
				break
			}
			n += int64(k)
		} else {
			p.free <- b
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			err = rerr
			break
		}
	}
	close(work)
	<-done
	return n, err
}

func checkDigest(sum hash.Hash, n, size int64, wantHex string) error {
	if n != size {
		return &MismatchError{What: "size", Got: fmt.Sprint(n), Want: fmt.Sprint(size)}
	}
	if got := hex.EncodeToString(sum.Sum(nil)); got != wantHex {
		return &MismatchError{What: "sha256", Got: got, Want: wantHex}
	}
	return nil
}

// MismatchError says content differs from what it should be.
type MismatchError struct {
	What      string // size or sha256
	Got, Want string
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("%s mismatch: got %s, want %s", e.What, e.Got, e.Want)
}
