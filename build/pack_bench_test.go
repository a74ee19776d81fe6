package build

import (
	"bytes"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io/fs"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

var (
	fleetWorkers    = flag.Int("build.workers", 1000, "workers in BenchmarkPackFleet")
	fleetImageBytes = flag.Int64("build.imagebytes", 300<<20, "bytes of image layers in BenchmarkPackFleet")
)

// packRun is a full --pack build of cfg.
func packRun(ctx context.Context, cfg, out string, at time.Time) (*Result, error) {
	c, err := render.Load(cfg)
	if err != nil {
		return nil, err
	}
	return Run(ctx, Options{
		ConfigPath: cfg, Cluster: c, Out: out, CacheDir: filepath.Join(filepath.Dir(cfg), "..", "cache"), Jobs: 4,
		BuildTime: at, Now: time.Now, Rand: rand.Reader, Pack: true,
	})
}

// fleetLayout writes an OCI layout with every image a cluster needs, its
// layers random bytes adding up to total, split among the images roughly
// as kubeadm's real ones are.
func fleetLayout(b testing.TB, dir string, total int64) string {
	b.Helper()
	share := map[string]int64{ // percent of total
		"kube-apiserver": 28, "kube-controller-manager": 24, "kube-scheduler": 8, "kube-proxy": 10,
		"etcd": 20, "coredns": 8, "pause": 2,
	}
	c, err := render.Parse("cluster.toml", []byte(fleetConfig("x", dir, 0)))
	if err != nil {
		b.Fatal(err)
	}
	p, err := layout.Write(filepath.Join(dir, "layout"), empty.Index)
	if err != nil {
		b.Fatal(err)
	}
	rng := mrand.NewChaCha8([32]byte{13})
	for _, ref := range c.Images() {
		var pct int64
		for name, s := range share {
			if strings.Contains(ref, "/"+name+":") {
				pct = s
			}
		}
		img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
		var diffs []v1.Hash
		size := total * pct / 100
		for _, part := range []int64{size * 2 / 3, size - size*2/3} {
			data := make([]byte, part)
			rng.Read(data)
			l := static.NewLayer(data, types.OCILayer)
			img, _ = mutate.AppendLayers(img, l)
			d, _ := l.Digest()
			diffs = append(diffs, d)
		}
		img, err = mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: "amd64", RootFS: v1.RootFS{Type: "layers", DiffIDs: diffs}})
		if err != nil {
			b.Fatal(err)
		}
		err = p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": ref}),
			layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"}))
		if err != nil {
			b.Fatal(err)
		}
	}
	return filepath.Join(dir, "layout")
}

func fleetConfig(name, layoutDir string, workers int) string {
	var s strings.Builder
	fmt.Fprintf(&s, "name = %q\ncontrol_plane_endpoint = \"10.0.0.10:6443\"\n[network]\npod_subnet = \"10.244.0.0/16\"\nservice_subnet = \"10.96.0.0/12\"\n", name)
	fmt.Fprintf(&s, "[pki]\nalgorithm = \"ECDSA-P256\"\n[images]\nlayout = %q\n", layoutDir)
	fmt.Fprintf(&s, "[[nodes]]\nname = \"cp1\"\nrole = \"control-plane\"\naddress = \"10.0.0.10\"\n")
	for i := 0; i < workers; i++ {
		fmt.Fprintf(&s, "[[nodes]]\nname = \"w%d\"\nrole = \"worker\"\naddress = \"10.1.%d.%d\"\n", i+1, i/250, i%250+1)
	}
	return s.String()
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkPackFleet builds 1 control plane and *fleetWorkers workers with
// --pack from *fleetImageBytes of image layers (random bytes in an OCI
// layout), and the same cluster with 10 workers in the same run, and
// reports:
//   - total-MiB and pack-MiB: the whole output, and the pack in it (target:
//     total <= pack + workers x 32 KiB, checked);
//   - ms/extra-node: (t(workers) - t(10)) / (workers - 10) of warm rebuilds
//     (target <= 10), in wall time and, as cpu-ms/extra-node, in the
//     process's CPU time;
//   - peak-RSS-MiB: the peak RSS (VmHWM) of a child process doing a warm
//     rebuild of the large cluster, and cold-peak-RSS-MiB of one doing the
//     first, cold build (target < 64).
func BenchmarkPackFleet(b *testing.B) {
	dir := b.TempDir()
	lay := fleetLayout(b, dir, *fleetImageBytes)
	config := func(name string, workers int) string {
		d := filepath.Join(dir, name)
		os.MkdirAll(d, 0o755)
		p := filepath.Join(d, "cluster.toml")
		if err := os.WriteFile(p, []byte(fleetConfig(name, lay, workers)), 0o644); err != nil {
			b.Fatal(err)
		}
		return p
	}
	big, small := config("big", *fleetWorkers), config("small", 10)
	bigOut, smallOut := filepath.Join(dir, "big", "out"), filepath.Join(dir, "small", "out")
	// The child reports its own VmHWM: getrusage's maxrss of a child is
	// no good here, since Linux carries the parent's peak (this process
	// held the layers it generated) into the child's at exec.
	child := func(cfg, out string) float64 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "AIRADM_TEST_BUILD_CHILD="+cfg, "AIRADM_TEST_BUILD_OUT="+out, "AIRADM_TEST_BUILD_TIME=1767225600", "AIRADM_TEST_BUILD_PACK=1")
		got, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("child build: %v\n%s", err, got)
		}
		var mib float64
		i := bytes.LastIndex(got, []byte("peak-rss-mib"))
		if _, err := fmt.Sscanf(string(got[max(i, 0):]), "peak-rss-mib %f", &mib); i < 0 || err != nil {
			b.Fatalf("child build: no peak RSS in its output: %v\n%s", err, got)
		}
		return mib
	}
	coldRSS := child(big, bigOut) // fills the cache and big's secrets/
	warmRSS := child(big, bigOut)
	if _, err := packRun(context.Background(), small, smallOut, time.Unix(1767225600, 0)); err != nil {
		b.Fatal(err)
	}
	// Wall time, and this process's CPU time (user and system), which a
	// machine shared with other work inflates less.
	var tBig, tSmall, cBig, cSmall time.Duration
	timed := func(cfg, out string, wall, cpu *time.Duration) {
		syncFS()
		t0, c0 := time.Now(), cpuTime()
		if _, err := packRun(context.Background(), cfg, out, time.Unix(1767225600, 0)); err != nil {
			b.Fatal(err)
		}
		*wall += time.Since(t0)
		*cpu += cpuTime() - c0
	}
	for b.Loop() {
		timed(small, smallOut, &tSmall, &cSmall)
		timed(big, bigOut, &tBig, &cBig)
	}
	var total, pack, largestWorker int64
	filepath.WalkDir(bigOut, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, _ := d.Info()
		total += fi.Size()
		switch {
		case d.Name() == bundle.PackFile:
			pack = fi.Size()
		case strings.HasPrefix(d.Name(), "w"):
			largestWorker = max(largestWorker, fi.Size())
		}
		return nil
	})
	if limit := pack + int64(*fleetWorkers)*32<<10; total > limit {
		b.Errorf("output is %d bytes, more than the pack (%d) + %d x 32 KiB = %d", total, pack, *fleetWorkers, limit)
	}
	extra := float64(b.N) * float64(*fleetWorkers-10) * 1e6
	perNode, cpuPerNode := float64(tBig-tSmall)/extra, float64(cBig-cSmall)/extra
	b.ReportMetric(float64(total)/(1<<20), "total-MiB")
	b.ReportMetric(float64(pack)/(1<<20), "pack-MiB")
	b.ReportMetric(float64(largestWorker)/1024, "max-worker-KiB")
	b.ReportMetric(perNode, "ms/extra-node")
	b.ReportMetric(cpuPerNode, "cpu-ms/extra-node")
	b.ReportMetric(float64(tSmall)/float64(b.N)/1e6, "ms-10-workers")
	b.ReportMetric(coldRSS, "cold-peak-RSS-MiB")
	b.ReportMetric(warmRSS, "peak-RSS-MiB")
}
