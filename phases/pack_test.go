package phases_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	containerd "github.com/containerd/containerd/v2/client"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/containerdtest"
	"airadm.dev/airadm/phases"
)

// countingReaderAt counts the bytes read through it.
type countingReaderAt struct {
	r io.ReaderAt
	n *atomic.Int64
}

func (c countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// thinWorker writes the quickstart's pack (every node's images) and w1's
// thin bundle beside it.
func thinWorker(t *testing.T) (bundlePath, digest, packPath string, m *bundle.Manifest, other []byte) {
	t.Helper()
	cfg, err := os.ReadFile("../testdata/quickstart/cluster.toml")
	if err != nil {
		t.Fatal(err)
	}
	c := clustertest.New(t, strings.Replace(string(cfg), `layout = "images"`, `layout = "`+mustAbs(t, "../testdata/quickstart/images")+`"`, 1))
	cache, err := bundle.OpenCache(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p := &bundle.Puller{Source: bundle.Layout{Path: c.ImageLayout}, Cache: cache, Platform: v1.Platform{OS: "linux", Architecture: "amd64"}}
	all, err := p.Pull(context.Background(), c.Images())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	packPath = filepath.Join(dir, bundle.PackFile)
	f, err := os.Create(packPath)
	if err != nil {
		t.Fatal(err)
	}
	_, packDigest, err := bundle.WritePack(f, all, cache)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	n, _ := c.Node("w1")
	var mine []bundle.Image
	for _, im := range all {
		for _, r := range c.NodeImages(n) {
			if im.Ref == r {
				mine = append(mine, im)
			}
		}
	}
	// Another build's: w1's images only.
	var buf bytes.Buffer
	if _, _, err := bundle.WritePack(&buf, mine, cache); err != nil {
		t.Fatal(err)
	}
	path, d := c.ThinBundle(t, "w1", mine, packDigest)
	bundlePath = filepath.Join(dir, "w1.bundle")
	if err := os.Rename(path, bundlePath); err != nil {
		t.Fatal(err)
	}
	bf, _ := os.Open(bundlePath)
	defer bf.Close()
	if m, _, err = bundle.Read(bf, bundle.Visitor{}); err != nil {
		t.Fatal(err)
	}
	return bundlePath, d, packPath, m, buf.Bytes()
}

// TestImagesFromPackIntoRealContainerd applies a worker's thin bundle with
// the pack beside it into a real containerd: its images land, and each pass
// over the pack (verify, then import) reads at most the worker's own images
// and the index, never the control plane's. A pack from another build and
// a flipped byte in a needed blob are refused as bad input, before
// anything reaches containerd.
func TestImagesFromPackIntoRealContainerd(t *testing.T) {
	ctd := containerdtest.Start(t)
	path, digest, packPath, m, other := thinWorker(t)
	packInfo, _ := os.Stat(packPath)
	var passes []*atomic.Int64
	var out bytes.Buffer
	o := phases.Options{Bundle: path, ManifestDigest: digest, Root: t.TempDir(), Node: "w1", Only: "images", CRISocket: ctd.Endpoint(), Out: &out,
		WrapPack: func(r io.ReaderAt) io.ReaderAt {
			n := &atomic.Int64{}
			passes = append(passes, n)
			return countingReaderAt{r, n}
		}}
	client, err := containerd.New(ctd.Socket, containerd.WithDefaultNamespace("k8s.io"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()
	// Bad inputs first, into the empty containerd.
	pack, _ := os.ReadFile(packPath)
	for _, tc := range []struct {
		name string
		pack []byte
		want string
		is   error
	}{
		{"another build's pack", other, "not the one this bundle was built with", bundle.ErrOtherPack},
		{"flipped byte in a needed blob", flipBlob(t, pack, m.Blobs[len(m.Blobs)-1].Digest), "sha256 mismatch", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := filepath.Join(t.TempDir(), "bad.pack")
			os.WriteFile(bad, tc.pack, 0o644)
			o := o
			o.Images, o.WrapPack = bad, nil
			err := phases.Apply(ctx, o)
			var be *bundle.EntryError
			if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.As(err, &be) || (tc.is != nil && !errors.Is(err, tc.is)) {
				t.Fatalf("err = %v, want an EntryError (exit 2) containing %q", err, tc.want)
			}
			if imgs, _ := client.ListImages(ctx); len(imgs) != 0 {
				t.Errorf("containerd has %d images after a refused pack", len(imgs))
			}
		})
	}

	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "3 images named, pinned and unpacked") {
		t.Errorf("output:\n%s", out.String())
	}
	var own int64
	for _, im := range m.Images {
		own += im.TotalSize
	}
	idx := indexEntryBytes(t, pack)
	if len(passes) != 2 {
		t.Fatalf("the pack was opened %d times, want 2 (verify, import)", len(passes))
	}
	for i, n := range passes {
		if n.Load() > own+idx {
			t.Errorf("pass %d read %d bytes of the %d-byte pack; the worker's images are %d bytes, the index entry %d", i+1, n.Load(), packInfo.Size(), own, idx)
		}
		t.Logf("pass %d read %d bytes of the %d-byte pack (own images %d, index entry %d)", i+1, n.Load(), packInfo.Size(), own, idx)
	}
	for _, im := range m.Images {
		img, err := client.GetImage(ctx, im.Ref)
		if err != nil {
			t.Errorf("%s not in containerd: %v", im.Ref, err)
			continue
		}
		if ok, err := img.IsUnpacked(ctx, "overlayfs"); err != nil || !ok {
			t.Errorf("%s not unpacked: %v", im.Ref, err)
		}
	}
}

// indexEntryBytes is the pack's first entry: header, index and padding.
func indexEntryBytes(t *testing.T, pack []byte) int64 {
	t.Helper()
	h, err := tar.NewReader(bytes.NewReader(pack)).Next()
	if err != nil || h.Name != bundle.PackIndexName {
		t.Fatalf("first entry %v: %v", h, err)
	}
	return 512 + (h.Size+511)/512*512
}

// flipBlob flips a byte in the middle of blob d's data.
func flipBlob(t *testing.T, pack []byte, d string) []byte {
	t.Helper()
	i := bytes.Index(pack, []byte("blobs/sha256/"+strings.TrimPrefix(d, "sha256:")))
	if i < 0 {
		t.Fatalf("no blob %s in the pack", d)
	}
	h, _ := tar.NewReader(bytes.NewReader(pack[i:])).Next()
	b := bytes.Clone(pack)
	b[i+512+int(h.Size)/2] ^= 1
	return b
}
