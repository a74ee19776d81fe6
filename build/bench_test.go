package build

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"airadm.dev/airadm/render"
)

var hostBytes = flag.Int64("build.hostbytes", 250<<20, "bytes of host binaries in BenchmarkHostFiles")

// BenchmarkHostFiles builds one node whose bundle carries *hostBytes of host
// binaries (local sources, split like kubelet, containerd, its shim, runc
// and the CNI plugins) and, as the baseline in the same run, copies the
// same source files to the same disk while hashing them. "ratio" is a
// build with the sources already in the cache over the baseline (target
// <= 1.2); "cold-ratio" is a first build, which also copies every source
// into the cache, over the baseline.
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

// syncFS flushes every dirty page, so that one measured step does not pay
// for the writes of the one before.
func syncFS() { unix.Sync() }

func BenchmarkHostFiles(b *testing.B) {
	cfg := quickstart(b)
	dir := filepath.Dir(cfg)
	rng := mrand.NewChaCha8([32]byte{2})
	shares := []int64{40, 20, 8, 6, 26} // percent
	host := ""
	var sources []string
	for i, pct := range shares {
		n := *hostBytes * pct / 100
		p := filepath.Join(dir, fmt.Sprintf("bin%d", i))
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		h := sha256.New()
		w := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
		if _, err := io.CopyN(w, rng, n); err != nil {
			b.Fatal(err)
		}
		w.Flush()
		f.Close()
		sources = append(sources, p)
		host += fmt.Sprintf("\n[[host.files]]\npath = \"/usr/local/bin/bin%d\"\nsource = %q\nsha256 = %q\n", i, p, hex.EncodeToString(h.Sum(nil)))
	}
	withHost(b, cfg, host)
	c, err := render.Load(cfg)
	if err != nil {
		b.Fatal(err)
	}
	run := func(cache, out string) {
		_, err := Run(context.Background(), Options{
			ConfigPath: cfg, Cluster: c, Out: out, CacheDir: cache, Jobs: 4, Nodes: []string{"w1"},
			BuildTime: time.Unix(1767225600, 0), Now: time.Now, Rand: rand.Reader,
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	baseline := func() time.Duration {
		t0 := time.Now()
		out, _ := os.Create(filepath.Join(dir, "copy"))
		buf := make([]byte, 1<<20)
		for _, p := range sources {
			in, _ := os.Open(p)
			h := sha256.New()
			if _, err := io.CopyBuffer(io.MultiWriter(out, h), in, buf); err != nil {
				b.Fatal(err)
			}
			in.Close()
		}
		out.Sync()
		out.Close()
		// The copy stays: the next one replaces it, as a build replaces
		// the previous bundle.
		return time.Since(t0)
	}
	warmCache := filepath.Join(dir, ".cache")
	out := filepath.Join(dir, "out")
	run(warmCache, out) // fills the cache and secrets/
	var base, warm, cold time.Duration
	var peak float64
	for b.Loop() {
		// Cold first, so that its writes to the cache are not still
		// being flushed while the two being compared run.
		coldCache := filepath.Join(b.TempDir(), "cache")
		t0 := time.Now()
		run(coldCache, out)
		cold += time.Since(t0)
		os.RemoveAll(coldCache)
		syncFS()
		base += baseline()
		syncFS()
		resetPeakRSS()
		t0 = time.Now()
		run(warmCache, out)
		warm += time.Since(t0)
		peak = max(peak, peakRSSMiB())
		syncFS()
	}
	b.SetBytes(*hostBytes)
	b.ReportMetric(float64(warm)/float64(base), "ratio")
	b.ReportMetric(float64(cold)/float64(base), "cold-ratio")
	// Host files stream from the cache: far below *hostBytes.
	b.ReportMetric(peak, "peak-RSS-MiB")
}
