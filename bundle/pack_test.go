package bundle_test

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	mrand "math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"airadm.dev/airadm/bundle"
)

// testImage makes an image of random layers of the given sizes (seeded),
// adds its blobs to store and returns it ready to write.
func testImage(t testing.TB, store memStore, ref string, seed uint64, sizes ...int) bundle.Image {
	t.Helper()
	rng := mrand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	var diffs []v1.Hash
	for _, n := range sizes {
		data := make([]byte, n)
		rng.Read(data)
		l := static.NewLayer(data, types.OCILayer)
		var err error
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatal(err)
		}
		store[mustDigest(t, l)] = data
		diffs = append(diffs, mustDigest(t, l))
	}
	img, err := mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: "amd64", RootFS: v1.RootFS{Type: "layers", DiffIDs: diffs}})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := img.RawManifest()
	digest, _ := img.Digest()
	store[digest] = raw
	m, _ := img.Manifest()
	cfg, _ := img.RawConfigFile()
	store[m.Config.Digest] = cfg
	return bundle.Image{
		Ref: ref, Platform: "linux/amd64",
		Manifest: v1.Descriptor{MediaType: types.OCIManifestSchema1, Digest: digest, Size: int64(len(raw))},
		Blobs:    append([]v1.Descriptor{m.Config}, m.Layers...),
	}
}

// packFixture is a control plane's large image and a small one every node
// shares, in one pack, and a worker's thin bundle that needs the small one.
type packFixture struct {
	store          memStore
	etcd, pause    bundle.Image
	pack           []byte
	digest         string
	worker         []byte
	workerManifest *bundle.Manifest
}

func newPackFixture(t testing.TB) packFixture {
	t.Helper()
	f := packFixture{store: memStore{}}
	f.etcd = testImage(t, f.store, "registry.example/etcd:3", 1, 300<<10, 5000)
	f.pause = testImage(t, f.store, "registry.example/pause:1", 2, 1234)
	var buf bytes.Buffer
	if _, d, err := bundle.WritePack(&buf, []bundle.Image{f.pause, f.etcd}, f.store); err != nil {
		t.Fatal(err)
	} else {
		f.digest = d
	}
	f.pack = buf.Bytes()
	c, _ := tinyContents(t)
	c.Images, c.Pack = []bundle.Image{f.pause}, f.digest
	f.worker = writeContents(t, c, f.store)
	m, _, err := bundle.Read(bytes.NewReader(f.worker), bundle.Visitor{})
	if err != nil {
		t.Fatal(err)
	}
	f.workerManifest = m
	return f
}

// countingReaderAt counts the bytes read through it.
type countingReaderAt struct {
	r io.ReaderAt
	n atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

func TestPackDeterministicEachBlobOnce(t *testing.T) {
	f := newPackFixture(t)
	var again bytes.Buffer
	// Another order of the same images: the same bytes.
	if _, _, err := bundle.WritePack(&again, []bundle.Image{f.etcd, f.pause, f.pause}, f.store); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again.Bytes(), f.pack) {
		t.Fatal("two packs of the same images differ")
	}
	es := entries(t, f.pack)
	var names []string
	for _, e := range es {
		names = append(names, e.hdr.Name)
	}
	if names[0] != bundle.PackIndexName || names[len(names)-1] != "oci-layout" || names[len(names)-2] != "index.json" {
		t.Fatalf("entries %v: want the index first, then blobs, index.json and oci-layout", names)
	}
	// Two images of 1 and 2 layers: 2 manifests, 2 configs, 3 layers.
	if n := len(names) - 3; n != 7 {
		t.Errorf("%d blobs in the pack, want 7: %v", n, names)
	}
	ix, d, err := bundle.VerifyPack(bytes.NewReader(f.pack))
	if err != nil {
		t.Fatal(err)
	}
	if d != f.digest || len(ix.Images) != 2 {
		t.Errorf("VerifyPack: digest %s, %d images; want %s, 2", d, len(ix.Images), f.digest)
	}
}

// TestThinBundleReadsOnlyItsBlobs: a worker's thin bundle holds no image
// entries, and reading its blobs from the pack touches only those bytes and
// the index, never the control plane's large layer.
func TestThinBundleReadsOnlyItsBlobs(t *testing.T) {
	f := newPackFixture(t)
	for _, e := range entries(t, f.worker) {
		if strings.HasPrefix(e.hdr.Name, "images/") {
			t.Errorf("thin bundle holds %s", e.hdr.Name)
		}
	}
	m := f.workerManifest
	if m.Pack != f.digest || len(m.Images) != 1 || len(m.Blobs) != 3 {
		t.Fatalf("thin manifest: pack %s, %d images, %d blobs", m.Pack, len(m.Images), len(m.Blobs))
	}
	cr := &countingReaderAt{r: bytes.NewReader(f.pack)}
	p, err := bundle.OpenPack(cr, int64(len(f.pack)))
	if err != nil {
		t.Fatal(err)
	}
	var got int64
	err = p.ReadBlobs(m, bundle.Visitor{Blob: func(b bundle.BlobEntry, r io.Reader) error {
		n, err := io.Copy(io.Discard, r)
		got += n
		return err
	}})
	if err != nil {
		t.Fatal(err)
	}
	own := m.Images[0].TotalSize
	indexBytes := int64(512 + len(entries(t, f.pack)[0].data))
	if got != own {
		t.Errorf("visitor saw %d bytes, want the image's %d", got, own)
	}
	if n := cr.n.Load(); n > own+indexBytes+511 {
		t.Errorf("read %d bytes of the %d-byte pack; the worker's images are %d bytes and the index entry %d", n, len(f.pack), own, indexBytes)
	}
	t.Logf("read %d bytes of a %d-byte pack (own images %d, index entry %d)", cr.n.Load(), len(f.pack), own, indexBytes)
}

func TestPackBadInputs(t *testing.T) {
	f := newPackFixture(t)
	blobOff := func(t *testing.T, d v1.Hash) int {
		i := bytes.Index(f.pack, []byte("blobs/sha256/"+d.Hex))
		if i < 0 {
			t.Fatal("no blob", d)
		}
		return i + 512 // the name is the header's first field
	}
	flip := func(off int) []byte {
		b := bytes.Clone(f.pack)
		b[off] ^= 1
		return b
	}
	var other bytes.Buffer
	if _, _, err := bundle.WritePack(&other, []bundle.Image{f.pause}, f.store); err != nil {
		t.Fatal(err)
	}
	es := entries(t, f.pack)
	evil := append(append([]tarEntry(nil), es[:1]...), tarEntry{tar.Header{Typeflag: tar.TypeReg, Name: "../evil", Mode: 0o644, Format: tar.FormatUSTAR}, []byte("x")})
	evil = append(evil, es[1:]...)
	dup := append(append([]tarEntry(nil), es[:2]...), es[1:]...)
	for _, tc := range []struct {
		name string
		pack []byte
		// what OpenPack and ReadBlobs (the worker's selective read) say,
		// and what VerifyPack says; "" is success.
		selective, full string
		is              error
	}{
		{name: "flipped byte in a needed blob", pack: flip(blobOff(t, f.pause.Blobs[1].Digest) + 100), selective: "sha256 mismatch", full: "sha256 mismatch"},
		{name: "flipped byte in another node's blob", pack: flip(blobOff(t, f.etcd.Blobs[1].Digest) + 1000), selective: "", full: "sha256 mismatch"},
		{name: "another build's pack", pack: other.Bytes(), selective: "not the one this bundle was built with", is: bundle.ErrOtherPack},
		{name: "flipped byte in the index", pack: flip(600), selective: "airadm-pack.json"},
		{name: "truncated", pack: f.pack[:len(f.pack)-1024], selective: "truncated", full: "end-of-archive", is: bundle.ErrTruncated},
		{name: "truncated in the index", pack: f.pack[:700], selective: "truncated", full: "truncated", is: bundle.ErrTruncated},
		{name: "byte after the end", pack: append(bytes.Clone(f.pack), 0), selective: "data after the end", full: "data after the end"},
		{name: "escaping entry", pack: retar(t, evil), selective: "index implies", full: "../evil"},
		{name: "duplicate entry", pack: retar(t, dup), selective: "index implies", full: "header differs"},
		{name: "index not first", pack: retar(t, es[1:]), selective: "first entry of a pack must be airadm-pack.json", full: "first entry"},
		{name: "empty", pack: nil, selective: "truncated", full: "truncated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := bundle.OpenPack(bytes.NewReader(tc.pack), int64(len(tc.pack)))
			if err == nil {
				err = p.ReadBlobs(f.workerManifest, bundle.Visitor{})
			}
			check(t, "selective", err, tc.selective, tc.is)
			_, _, err = bundle.VerifyPack(bytes.NewReader(tc.pack))
			if tc.full == "" && tc.selective != "" {
				tc.full = tc.selective
			}
			if tc.name == "another build's pack" {
				tc.full = "" // intact on its own
			}
			check(t, "full", err, tc.full, nil)
			var ee *bundle.EntryError
			if err != nil && !errors.As(err, &ee) {
				t.Errorf("full: %T is not an EntryError (the CLI's exit 2)", err)
			}
		})
	}
}

func check(t *testing.T, what string, err error, want string, is error) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Errorf("%s: %v, want success", what, err)
	case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
		t.Errorf("%s: %v, want an error containing %q", what, err, want)
	case is != nil && !errors.Is(err, is):
		t.Errorf("%s: %v is not %v", what, err, is)
	}
}

func TestPackIndexStrict(t *testing.T) {
	f := newPackFixture(t)
	good := entries(t, f.pack)[0].data
	if _, err := bundle.DecodePackIndex(good); err != nil {
		t.Fatal(err)
	}
	ix, _ := bundle.DecodePackIndex(good)
	first := `"digest": "` + ix.Blobs[0].Digest + `"`
	second := `"digest": "` + ix.Blobs[1].Digest + `"`
	for _, tc := range []struct{ name, from, to, want string }{
		{"newer version", `"formatVersion": 1`, `"formatVersion": 2`, "pack format version 2"},
		{"unknown member", `"formatVersion": 1`, `"formatVersion": 1, "offsets": []`, `"offsets" is unknown`},
		{"duplicate blob", second, first, "listed twice"},
		{"escaping digest", first, `"digest": "sha256:../../etc/passwd"`, "bad digest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Edit the blob list (image digests come earlier).
			i := strings.Index(string(good), `"blobs"`)
			if tc.from == `"formatVersion": 1` {
				i = 0
			}
			b := string(good[:i]) + strings.Replace(string(good[i:]), tc.from, tc.to, 1)
			if b == string(good) {
				t.Fatalf("%q not in the index", tc.from)
			}
			_, err := bundle.DecodePackIndex([]byte(b))
			check(t, "decode", err, tc.want, nil)
		})
	}
}
