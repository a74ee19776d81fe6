package media

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

var (
	benchBytes = flag.Int64("media.bytes", 1<<30, "layer bytes of the bundle in the media benchmarks")
	benchCold  = flag.Bool("media.cold", false, "evict the bundle and the runner from the page cache before each side of BenchmarkISO reads them, as for bundles built a while ago")
)

// evict drops the files at paths from the page cache (once on disk), so
// that the next read of them comes from the disk.
func evict(b *testing.B, paths ...string) {
	b.Helper()
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		err = f.Sync()
		if err == nil {
			err = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		}
		f.Close()
		if err != nil {
			b.Fatal(err)
		}
	}
}

// fresh empties dir, where a side of a benchmark writes, and waits for
// the filesystem to free the blocks: on a disk mounted with discard,
// freeing the last iteration's gigabyte costs up to half a second, in
// whichever side's timing its journal commit lands otherwise.
func fresh(b *testing.B, dir string) {
	b.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		b.Fatal(err)
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			b.Fatal(err)
		}
	}
	d, err := os.Open(dir)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		b.Fatal(err)
	}
}

// bigBundle writes out/cp1.bundle, carrying *benchBytes of layers streamed
// from a fast PRNG, and its SHA256SUMS, as airadm build would.
func bigBundle(b *testing.B) (*render.Cluster, string) {
	b.Helper()
	c, err := render.Parse("bench.toml", []byte("name = \"bench\"\n[[nodes]]\nname = \"cp1\"\nrole = \"control-plane\"\naddress = \"10.0.0.11\"\n"))
	if err != nil {
		b.Fatal(err)
	}
	cache, err := bundle.OpenCache(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	put := func(r io.Reader, n int64) v1.Hash {
		tmp := filepath.Join(b.TempDir(), "blob")
		f, _ := os.Create(tmp)
		h := sha256.New()
		w := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
		if _, err := io.CopyN(w, r, n); err != nil {
			b.Fatal(err)
		}
		w.Flush()
		f.Close()
		d := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
		f, _ = os.Open(tmp)
		defer f.Close()
		defer os.Remove(tmp)
		if err := cache.Put(d, n, f); err != nil {
			b.Fatal(err)
		}
		return d
	}
	const layerSize = 128 << 20
	rng := rand.NewChaCha8([32]byte{1})
	var layers []v1.Descriptor
	for left := *benchBytes; left > 0; left -= layerSize {
		n := min(int64(layerSize), left)
		layers = append(layers, v1.Descriptor{MediaType: types.OCILayer, Digest: put(rng, n), Size: n})
	}
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	cfg := v1.Descriptor{MediaType: types.OCIConfigJSON, Digest: put(bytes.NewReader(config), int64(len(config))), Size: int64(len(config))}
	raw, _ := json.Marshal(v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1, Config: cfg, Layers: layers})
	md := put(bytes.NewReader(raw), int64(len(raw)))
	contents := bundle.Contents{
		Cluster: "bench", Node: "cp1", Role: "control-plane", KubernetesVersion: render.KubernetesVersion, BuildTime: time.Unix(0, 0),
		Files: []render.File{{Path: "/etc/kubernetes/pki/ca.crt", Mode: 0o644, Data: []byte("ca")}},
		Images: []bundle.Image{{Ref: "registry.example/big:1", Platform: "linux/amd64",
			Manifest: v1.Descriptor{MediaType: types.OCIManifestSchema1, Digest: md, Size: int64(len(raw))},
			Blobs:    append([]v1.Descriptor{cfg}, layers...)}},
	}
	out := b.TempDir()
	f, _ := os.Create(filepath.Join(out, "cp1.bundle"))
	h := sha256.New()
	w := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
	_, digest, err := bundle.Write(w, contents, cache)
	if err != nil {
		b.Fatal(err)
	}
	w.Flush()
	f.Close()
	sums := trust.Sums{"cp1.bundle": {File: hex.EncodeToString(h.Sum(nil)), Manifest: digest}}
	if err := sums.Write(filepath.Join(out, trust.SumsFile)); err != nil {
		b.Fatal(err)
	}
	return c, out
}

// BenchmarkISO writes the cluster ISO of a bundle of *benchBytes as
// airadm media iso does (Scan, then WriteISO verifying while it lays the
// image out), and, as the baseline in the same run, copies the same files
// (bundle and runner) to the same disk while hashing them with sha256,
// syncing both. "ratio" is ISO/baseline (target <= 1.3). With
// -media.cold, each side reads the files from the disk.
func BenchmarkISO(b *testing.B) {
	c, out := bigBundle(b)
	self := runner(b)
	dir := b.TempDir()
	var ours, base, baseSync time.Duration
	bundlePath := filepath.Join(out, "cp1.bundle")
	for b.Loop() {
		fresh(b, dir)
		if *benchCold {
			evict(b, bundlePath, self)
		}
		t0 := time.Now()
		for _, p := range []string{filepath.Join(out, "cp1.bundle"), self} {
			in, _ := os.Open(p)
			cp, _ := os.Create(filepath.Join(dir, "copy-"+filepath.Base(p)))
			h := sha256.New()
			if _, err := io.CopyBuffer(io.MultiWriter(cp, h), in, make([]byte, 1<<20)); err != nil {
				b.Fatal(err)
			}
			in.Close()
			ts := time.Now()
			cp.Sync()
			baseSync += time.Since(ts)
			cp.Close()
		}
		base += time.Since(t0)
		fresh(b, dir)
		if *benchCold {
			evict(b, bundlePath, self)
		}
		t1 := time.Now()
		src, err := Scan(out, c, nil, SizeLimit{})
		if err != nil {
			b.Fatal(err)
		}
		t, err := ClusterTree(src, self, Mount{Label: "AIRADM"})
		if err != nil {
			b.Fatal(err)
		}
		if err := WriteISO(filepath.Join(dir, "c.iso"), t, ISOOptions{Label: "AIRADM", Epoch: src.Epoch(), Verify: src.VerifyEntries}); err != nil {
			b.Fatal(err)
		}
		ours += time.Since(t1)
	}
	b.SetBytes(*benchBytes)
	b.ReportMetric(float64(ours)/float64(base), "ratio")
	// Each side's own time, since on a shared machine the ratio moves
	// with whichever side the other load slows more.
	b.ReportMetric(ours.Seconds()/float64(b.N), "iso-s/op")
	b.ReportMetric(base.Seconds()/float64(b.N), "base-s/op")
	// The baseline writes through the page cache and waits for the disk
	// only in its fsync, after the copy; WriteISO's copy writes to the
	// disk while it reads, hashes and verifies. This says how much of the
	// baseline is that wait, which is why the ratio can fall below 1.
	b.ReportMetric(baseSync.Seconds()/float64(b.N), "base-sync-s/op")
}
