package phases_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/containerdtest"
	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/phases"
)

// benchBundle is a worker bundle whose three images are gzip layers of the
// real kube-proxy, kubelet and kubectl binaries (about 100 MB compressed),
// so unpacking costs what it costs on a node.
func benchBundle(b testing.TB) (path, digest, layoutTar string) {
	b.Helper()
	c := clustertest.New(b, `
name = "bench"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
[[nodes]]
name = "w1"
role = "worker"
address = "127.0.1.21"
`)
	dir := b.TempDir()
	lp, err := layout.Write(filepath.Join(dir, "layout"), empty.Index)
	if err != nil {
		b.Fatal(err)
	}
	n, _ := c.Node("w1")
	for i, ref := range c.NodeImages(n) {
		bin, err := k8sbin.Path([]string{"kube-proxy", "kubelet", "kubectl"}[i])
		if err != nil {
			b.Fatal(err)
		}
		data, _ := os.ReadFile(bin)
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		tw.WriteHeader(&tar.Header{Name: "bin", Mode: 0o755, Size: int64(len(data))})
		tw.Write(data)
		tw.Close()
		raw := buf.Bytes()
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil })
		if err != nil {
			b.Fatal(err)
		}
		img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), layer)
		if err != nil {
			b.Fatal(err)
		}
		cf, _ := img.ConfigFile()
		cf.OS, cf.Architecture = "linux", "amd64"
		img, _ = mutate.ConfigFile(img, cf)
		if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": ref})); err != nil {
			b.Fatal(err)
		}
	}
	cache, _ := bundle.OpenCache(filepath.Join(dir, "cache"))
	p := &bundle.Puller{Source: bundle.Layout{Path: filepath.Join(dir, "layout")}, Cache: cache, Platform: v1.Platform{OS: "linux", Architecture: "amd64"}}
	images, err := p.Pull(context.Background(), c.NodeImages(n))
	if err != nil {
		b.Fatal(err)
	}
	path, digest = c.Bundle(b, "w1", images, cache)
	// The same images as an OCI layout tar, for ctr: the bundle's images/.
	layoutTar = filepath.Join(dir, "layout.tar")
	out, _ := os.Create(layoutTar)
	in, _ := os.Open(path)
	tr := tar.NewReader(in)
	tw := tar.NewWriter(out)
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		if len(h.Name) > 7 && h.Name[:7] == "images/" {
			h.Name = h.Name[7:]
			tw.WriteHeader(h)
			io.Copy(tw, tr)
		}
	}
	tw.Close()
	out.Close()
	in.Close()
	return path, digest, layoutTar
}

// BenchmarkImport imports one bundle's images into a fresh containerd with
// the images phase and, as the baseline, with `ctr images import` of the
// same OCI layout; "ratio" is airadm/ctr (target <= 1.0). It also reports
// what verifying the bundle adds: a full verified read as a fraction of
// the whole files+images apply ("verify-share", target <= 0.05 of the
// total... measured, not assumed).
func BenchmarkImport(b *testing.B) {
	ctr, err := k8sbin.Path("ctr")
	if err != nil {
		b.Fatal(err)
	}
	path, digest, layoutTar := benchBundle(b)
	var ours, theirs, verify time.Duration
	for b.Loop() {
		b.StopTimer()
		ctd := containerdtest.Start(b)
		b.StartTimer()
		t0 := time.Now()
		cmd := exec.Command(ctr, "--address", ctd.Socket, "-n", "k8s.io", "images", "import", "--platform", "linux/amd64", layoutTar)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("ctr import: %v\n%s", err, out)
		}
		theirs += time.Since(t0)
		b.StopTimer()
		ctd2 := containerdtest.Start(b)
		b.StartTimer()
		t1 := time.Now()
		o := phases.Options{Bundle: path, ManifestDigest: digest, Root: b.TempDir(), Node: "w1", Only: "images", CRISocket: ctd2.Endpoint()}
		if err := phases.Apply(context.Background(), o); err != nil {
			b.Fatal(err)
		}
		ours += time.Since(t1)
		t2 := time.Now()
		f, _ := os.Open(path)
		if _, _, err := bundle.Read(f, bundle.Visitor{}); err != nil {
			b.Fatal(err)
		}
		f.Close()
		verify += time.Since(t2)
	}
	b.ReportMetric(float64(ours)/float64(theirs), "ratio")
	b.ReportMetric(float64(ours.Milliseconds())/float64(b.N), "airadm-ms/op")
	b.ReportMetric(float64(theirs.Milliseconds())/float64(b.N), "ctr-ms/op")
	b.ReportMetric(float64(verify)/float64(ours), "verify-share")
}
