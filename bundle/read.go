package bundle

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"path"
	"strings"
)

// EntryError is the one kind of error reading a bundle returns: which entry
// (or "" for the archive as a whole) and what is wrong with it.
type EntryError struct {
	Entry string
	Err   error
}

func (e *EntryError) Error() string {
	if e.Entry == "" {
		return e.Err.Error()
	}
	return fmt.Sprintf("entry %s: %v", e.Entry, e.Err)
}

func (e *EntryError) Unwrap() error { return e.Err }

// ErrTruncated means the bundle ends early.
var ErrTruncated = errors.New("bundle is truncated")

// Visitor receives entries as they stream past. Each callback's reader
// yields the entry's bytes and fails at its end if they do not match the
// manifest, so a callback must treat what it read as unverified until the
// reader has returned io.EOF, and the bundle as a whole until Read returns
// nil. A nil callback skips those entries (they are still verified).
type Visitor struct {
	// Manifest, if set, sees the decoded manifest and its digest before
	// any other entry is read; an error ends the read there. A caller that
	// trusts a digest checks it here, so that each entry after it is
	// authentic as soon as its reader has returned io.EOF.
	Manifest func(m *Manifest, digest string) error
	File     func(f FileEntry, r io.Reader) error
	Blob     func(b BlobEntry, r io.Reader) error
	// BlobDigestsCheckedByConsumer skips hashing blobs in this reader
	// because the Blob callback hands them to a store that refuses content
	// whose digest differs (containerd's content commit does). Sizes,
	// names, order and everything else are still checked here.
	BlobDigestsCheckedByConsumer bool
	// Held names the entries the consumer already holds, verified by
	// digest in a place of its own: blobs in a content-addressed store
	// that checks digests at commit (containerd's), files on the host
	// whose bytes hash to the manifest's digest. The manifest digest
	// covers them, and nothing reads them from this bundle, so their data
	// is neither hashed nor, when r can seek, read at all. Everything
	// about the entry but its data is still checked. Image manifests and
	// the files of a worker's bundle that are scanned for keys are always
	// read. Leave it nil to verify every byte (`airadm verify` does).
	Held func(e HeldEntry) bool
}

// HeldEntry is an entry offered to Visitor.Held: a file (File set) or a
// blob (Blob set).
type HeldEntry struct {
	File *FileEntry
	Blob *BlobEntry
}

// Read streams a bundle, verifying every entry against the manifest: names
// and order, strict ustar headers (regular files, normalised times, owners
// and modes), zero padding, sizes, sha256 digests, nothing missing,
// duplicated or extra, every image's blobs present, and no key in a
// worker's files. It reads r to its end, so a caller can hash the whole
// file in the same pass (through an io.TeeReader), and refuses any byte
// after the end-of-archive marker. It returns the manifest and its digest;
// the caller compares the digest with one it trusts (SHA256SUMS or the
// build output) to authenticate the whole.
func Read(r io.Reader, v Visitor) (*Manifest, string, error) {
	tr := &ustarReader{r: bufio.NewReaderSize(r, 1<<20)}
	if sk, ok := r.(io.ReadSeeker); ok {
		tr.seeker = sk
	}

	hdr, err := tr.next("")
	if err == io.EOF {
		return nil, "", &EntryError{Entry: ManifestName, Err: errors.New("missing: the bundle is empty")}
	}
	if err != nil {
		return nil, "", err
	}
	if hdr.name != ManifestName {
		return nil, "", &EntryError{Entry: hdr.name, Err: fmt.Errorf("the first entry must be %s", ManifestName)}
	}
	if err := hdr.checkMode(0o644); err != nil {
		return nil, "", err
	}
	if hdr.size > maxManifestLen {
		return nil, "", &EntryError{Entry: ManifestName, Err: fmt.Errorf("%d bytes is larger than the %d a manifest may have", hdr.size, maxManifestLen)}
	}
	mb := make([]byte, hdr.size)
	if _, err := io.ReadFull(tr.r, mb); err != nil {
		return nil, "", &EntryError{Entry: ManifestName, Err: truncated(err)}
	}
	if err := tr.padding(hdr); err != nil {
		return nil, "", err
	}
	m, err := DecodeManifest(mb)
	if err != nil {
		return nil, "", &EntryError{Entry: ManifestName, Err: err}
	}
	sum := sha256.Sum256(mb)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if v.Manifest != nil {
		if err := v.Manifest(m, digest); err != nil {
			return nil, "", err
		}
	}

	index, err := m.IndexJSON()
	if err != nil {
		return nil, "", &EntryError{Entry: ManifestName, Err: err}
	}
	want := m.entries(index)
	known := map[string]bool{ManifestName: true}
	for _, e := range want {
		known[e.name] = true
	}
	files := map[string]FileEntry{}
	for _, f := range m.Files {
		files[f.Path] = f
	}
	blobs := map[string]BlobEntry{}
	for _, b := range m.Blobs {
		blobs[strings.TrimPrefix(b.Digest, "sha256:")] = b
	}
	imageManifests := map[string][]byte{}
	for _, im := range m.Images {
		imageManifests[strings.TrimPrefix(im.Digest, "sha256:")] = nil
	}

	seen := map[string]bool{ManifestName: true}
	buf := make([]byte, 1<<20)
	for i := 0; ; i++ {
		hdr, err := tr.next(lastName(want, i))
		if err == io.EOF {
			if i < len(want) {
				return nil, "", &EntryError{Entry: want[i].name, Err: errors.New("missing")}
			}
			break
		}
		if err != nil {
			if i < len(want) && errors.Is(err, ErrTruncated) {
				// Cut at or in a header: name what is missing.
				return nil, "", &EntryError{Entry: want[i].name, Err: ErrTruncated}
			}
			return nil, "", err
		}
		name := hdr.name
		switch {
		case seen[name]:
			return nil, "", &EntryError{Entry: name, Err: errors.New("duplicate entry")}
		case escapes(name):
			return nil, "", &EntryError{Entry: name, Err: errors.New("path escapes the bundle")}
		case !known[name]:
			return nil, "", &EntryError{Entry: name, Err: errors.New("unknown entry: not in the manifest")}
		}
		if i >= len(want) || name != want[i].name {
			return nil, "", &EntryError{Entry: want[i].name, Err: fmt.Errorf("missing where %s stands", name)}
		}
		seen[name] = true
		e := want[i]
		if hdr.size != e.size {
			return nil, "", &EntryError{Entry: name, Err: &MismatchError{What: "size", Got: fmt.Sprint(hdr.size), Want: fmt.Sprint(e.size)}}
		}
		if err := hdr.checkMode(e.mode); err != nil {
			return nil, "", err
		}
		vr := &verifyingReader{r: io.LimitReader(tr.r, e.size), sum: sha256.New(), size: e.size, wantHex: e.sha256, want: e.content}
		if v.BlobDigestsCheckedByConsumer && v.Blob != nil && strings.HasPrefix(name, blobsPrefix) {
			vr.sum, vr.wantHex = nil, ""
		}
		if e.file != "" && m.Role == "worker" && contentScanned(e.file) && !files[e.file].Encrypted() {
			// Ciphertext is not scanned (apply scans the plaintext,
			// ScanSecrets): a reader without the key cannot see it.
			vr.secrets = &secretScan{}
		}
		if v.Held != nil {
			var held HeldEntry
			hexDigest := strings.TrimPrefix(name, blobsPrefix)
			_, isImageManifest := imageManifests[hexDigest]
			switch {
			case e.file != "" && vr.secrets == nil:
				fe := files[e.file]
				held.File = &fe
			case e.file == "" && strings.HasPrefix(name, blobsPrefix) && !isImageManifest:
				be := blobs[hexDigest]
				held.Blob = &be
			}
			if (held.File != nil || held.Blob != nil) && v.Held(held) {
				if err := tr.skip(name, e.size); err != nil {
					return nil, "", err
				}
				if err := tr.padding(hdr); err != nil {
					return nil, "", err
				}
				continue
			}
		}
		var visit func() error
		switch {
		case e.file != "" && v.File != nil:
			visit = func() error { return v.File(files[e.file], vr) }
		case strings.HasPrefix(name, blobsPrefix):
			hexDigest := strings.TrimPrefix(name, blobsPrefix)
			if _, isManifest := imageManifests[hexDigest]; isManifest {
				// Keep image manifests (small) to check their references.
				vr.keep = &bytes.Buffer{}
			}
			if v.Blob != nil {
				visit = func() error { return v.Blob(blobs[hexDigest], vr) }
			}
		}
		if visit != nil {
			if err := visit(); err != nil {
				var ee *EntryError
				if errors.As(err, &ee) {
					return nil, "", err
				}
				return nil, "", &EntryError{Entry: name, Err: err}
			}
		}
		// Hide io.Discard's ReadFrom, whose small buffer would cut the
		// reads into 8 KiB pieces.
		if _, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, vr, buf); err != nil {
			return nil, "", &EntryError{Entry: name, Err: err}
		}
		if err := tr.padding(hdr); err != nil {
			return nil, "", err
		}
		if vr.keep != nil {
			imageManifests[strings.TrimPrefix(name, blobsPrefix)] = vr.keep.Bytes()
		}
	}
	if m.Pack == "" {
		// A thin bundle's references are checked as its blobs are read
		// from the pack (Pack.ReadBlobs).
		if err := checkReferences(m, imageManifests); err != nil {
			return nil, "", err
		}
	}
	return m, digest, nil
}

func lastName(want []expected, i int) string {
	if i > 0 && i-1 < len(want) {
		return want[i-1].name
	}
	return ManifestName
}

func truncated(err error) error {
	if errors.Is(err, io.ErrUnexpectedEOF) || err == io.EOF {
		return ErrTruncated
	}
	return err
}

func escapes(name string) bool {
	return strings.HasPrefix(name, "/") || path.Clean(name) != name || name == ".." || strings.HasPrefix(name, "../") || strings.Contains(name, "\\")
}

// checkReferences makes sure every blob an image manifest names is in the
// bundle, and every blob in the bundle belongs to some image.
func checkReferences(m *Manifest, manifests map[string][]byte) error {
	present := map[string]int64{}
	for _, b := range m.Blobs {
		present[b.Digest] = b.Size
	}
	used := map[string]bool{}
	for _, im := range m.Images {
		used[im.Digest] = true
		var doc struct {
			Config struct {
				Digest string `json:"digest"`
			} `json:"config"`
			Layers []struct {
				Digest string `json:"digest"`
			} `json:"layers"`
		}
		if err := json.Unmarshal(manifests[strings.TrimPrefix(im.Digest, "sha256:")], &doc); err != nil {
			return &EntryError{Entry: blobName(im.Digest), Err: fmt.Errorf("image %s: decoding manifest: %w", im.Ref, err)}
		}
		refs := []string{doc.Config.Digest}
		for _, l := range doc.Layers {
			refs = append(refs, l.Digest)
		}
		total := im.Size
		for _, d := range refs {
			size, ok := present[d]
			if !ok {
				return &EntryError{Entry: blobName(im.Digest), Err: fmt.Errorf("image %s references %s, which the bundle lacks", im.Ref, d)}
			}
			used[d] = true
			total += size
		}
		if total != im.TotalSize {
			return &EntryError{Entry: ManifestName, Err: fmt.Errorf("image %s: %w", im.Ref, &MismatchError{What: "total size", Got: fmt.Sprint(total), Want: fmt.Sprint(im.TotalSize)})}
		}
	}
	for _, b := range m.Blobs {
		if !used[b.Digest] {
			return &EntryError{Entry: blobName(b.Digest), Err: errors.New("no image references this blob")}
		}
	}
	return nil
}

// verifyingReader yields an entry's bytes and, at their end, reports a
// mismatch instead of io.EOF.
type verifyingReader struct {
	r       io.Reader
	sum     hash.Hash
	n, size int64
	wantHex string
	want    []byte
	keep    *bytes.Buffer
	secrets *secretScan // for files of a worker's bundle
	checked bool
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.n += int64(n)
	if n > 0 {
		if v.sum != nil {
			v.sum.Write(p[:n])
		}
		if v.keep != nil {
			v.keep.Write(p[:n])
		}
		if v.secrets != nil {
			v.secrets.write(p[:n])
		}
		if v.want != nil && !bytes.Equal(p[:n], v.want[v.n-int64(n):min(v.n, int64(len(v.want)))]) {
			return n, &MismatchError{What: "content", Got: "different bytes", Want: "the bytes the manifest implies"}
		}
	}
	if err == io.EOF && !v.checked {
		v.checked = true
		if v.n != v.size {
			return n, ErrTruncated
		}
		if v.wantHex != "" {
			if got := hex.EncodeToString(v.sum.Sum(nil)); got != v.wantHex {
				return n, &MismatchError{What: "sha256", Got: got, Want: v.wantHex}
			}
		}
		if v.secrets != nil && v.secrets.found != nil {
			// Name the marker, never the bytes around it: they are a secret.
			return n, fmt.Errorf("holds %q: a worker's bundle must not carry a private key", v.secrets.found)
		}
	}
	if err != nil && err != io.EOF {
		return n, truncated(err)
	}
	return n, err
}

// ScanSecrets applies the worker rule on file contents (docs/bundle-format.md,
// "Secrets") to the plaintext of an encrypted file of m, which Read could
// not see: apply calls it once it has decrypted the entry.
func ScanSecrets(m *Manifest, f FileEntry, plaintext []byte) error {
	if m.Role != "worker" || !contentScanned(f.Path) {
		return nil
	}
	for _, mk := range secretMarkers {
		if bytes.Contains(plaintext, mk) {
			return fmt.Errorf("file %s holds %q: a worker's bundle must not carry a private key", f.Path, mk)
		}
	}
	return nil
}
