package bundle_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"flag"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

var benchBytes = flag.Int64("bundle.bytes", 1<<30, "layer bytes in the bundle benchmarks")

// bigContents fills a cache with layers totalling *benchBytes, streamed
// from a fast PRNG so that generating them needs no memory.
func bigContents(b *testing.B) (bundle.Contents, *bundle.Cache, []string) {
	b.Helper()
	cache, err := bundle.OpenCache(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	const layerSize = 128 << 20
	rng := rand.NewChaCha8([32]byte{1})
	var layers []v1.Descriptor
	var paths []string
	for left := *benchBytes; left > 0; left -= layerSize {
		n := min(int64(layerSize), left)
		tmp := filepath.Join(b.TempDir(), "layer")
		f, _ := os.Create(tmp)
		h := sha256.New()
		w := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
		if _, err := io.CopyN(w, rng, n); err != nil {
			b.Fatal(err)
		}
		w.Flush()
		f.Close()
		d := v1.Hash{Algorithm: "sha256", Hex: hexOf(h.Sum(nil))}
		f, _ = os.Open(tmp)
		if err := cache.Put(d, n, f); err != nil {
			b.Fatal(err)
		}
		f.Close()
		os.Remove(tmp)
		layers = append(layers, v1.Descriptor{MediaType: types.OCILayer, Digest: d, Size: n})
		paths = append(paths, filepath.Join(cache.Dir(), "blobs", "sha256", d.Hex))
	}
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	cd := put(b, cache, config)
	man := v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1,
		Config: v1.Descriptor{MediaType: types.OCIConfigJSON, Digest: cd, Size: int64(len(config))}, Layers: layers}
	raw, _ := json.Marshal(man)
	md := put(b, cache, raw)
	c := bundle.Contents{
		Cluster: "bench", Node: "cp1", Role: "control-plane", KubernetesVersion: render.KubernetesVersion, BuildTime: time.Unix(0, 0),
		Files: []render.File{{Path: "/etc/kubernetes/pki/ca.crt", Mode: 0o644, Data: []byte("ca")}},
		Images: []bundle.Image{{Ref: "registry.example/big:1", Platform: "linux/amd64",
			Manifest: v1.Descriptor{MediaType: types.OCIManifestSchema1, Digest: md, Size: int64(len(raw))},
			Blobs:    append([]v1.Descriptor{man.Config}, layers...)}},
	}
	return c, cache, paths
}

func put(b *testing.B, c *bundle.Cache, data []byte) v1.Hash {
	sum := sha256.Sum256(data)
	h := v1.Hash{Algorithm: "sha256", Hex: hexOf(sum[:])}
	if err := c.Put(h, int64(len(data)), bytes.NewReader(data)); err != nil {
		b.Fatal(err)
	}
	return h
}

func hexOf(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, len(b)*2)
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

// resetPeakRSS makes VmHWM start again from the current RSS (Linux).
func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

func peakRSSMiB() float64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	return -1
}

// BenchmarkWrite writes a bundle of *benchBytes of layers and, as the
// baseline in the same run, copies the same blobs to the same disk while
// hashing them. "ratio" is bundle/baseline (target <= 1.2).
func BenchmarkWrite(b *testing.B) {
	c, cache, paths := bigContents(b)
	dir := b.TempDir()
	var ours, base time.Duration
	var peak float64
	for b.Loop() {
		t0 := time.Now()
		out, _ := os.Create(filepath.Join(dir, "copy"))
		for _, p := range paths {
			in, _ := os.Open(p)
			h := sha256.New()
			if _, err := io.CopyBuffer(io.MultiWriter(out, h), in, make([]byte, 1<<20)); err != nil {
				b.Fatal(err)
			}
			in.Close()
		}
		out.Sync()
		out.Close()
		t1 := time.Now()
		resetPeakRSS()
		f, _ := os.Create(filepath.Join(dir, "cp1.bundle"))
		w := bufio.NewWriterSize(f, 1<<20)
		if _, _, err := bundle.Write(w, c, cache); err != nil {
			b.Fatal(err)
		}
		w.Flush()
		f.Sync()
		f.Close()
		ours += time.Since(t1)
		base += t1.Sub(t0)
		peak = max(peak, peakRSSMiB())
	}
	b.SetBytes(*benchBytes)
	b.ReportMetric(float64(ours)/float64(base), "ratio")
	b.ReportMetric(peak, "peak-RSS-MiB")
}

// BenchmarkVerify reads a bundle through the verifying reader and, as the
// baseline, hashes the same file with sha256. "speed" is verify speed as a
// fraction of sha256's (target >= 0.8).
func BenchmarkVerify(b *testing.B) {
	c, cache, _ := bigContents(b)
	path := filepath.Join(b.TempDir(), "cp1.bundle")
	f, _ := os.Create(path)
	w := bufio.NewWriterSize(f, 1<<20)
	if _, _, err := bundle.Write(w, c, cache); err != nil {
		b.Fatal(err)
	}
	w.Flush()
	f.Close()
	var ours, base time.Duration
	var peak float64
	for b.Loop() {
		t0 := time.Now()
		in, _ := os.Open(path)
		h := sha256.New()
		io.CopyBuffer(h, in, make([]byte, 1<<20))
		in.Close()
		t1 := time.Now()
		resetPeakRSS()
		in, _ = os.Open(path)
		if _, _, err := bundle.Read(in, bundle.Visitor{}); err != nil {
			b.Fatal(err)
		}
		in.Close()
		ours += time.Since(t1)
		base += t1.Sub(t0)
		peak = max(peak, peakRSSMiB())
	}
	b.SetBytes(*benchBytes)
	b.ReportMetric(float64(base)/float64(ours), "speed")
	b.ReportMetric(peak, "peak-RSS-MiB")
}
