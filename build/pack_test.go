package build

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

func packBuild(t *testing.T, cfg, out string, pack bool, nodes ...string) *Result {
	t.Helper()
	c, err := render.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Run(context.Background(), Options{
		ConfigPath: cfg, Cluster: c, Out: out, CacheDir: filepath.Join(filepath.Dir(cfg), ".cache"), Jobs: 4,
		BuildTime: time.Unix(1767225600, 0), Now: time.Now, Rand: rand.Reader, Pack: pack, Nodes: nodes,
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestBuildPack: --pack writes images.pack (listed in SHA256SUMS, verified
// whole), thin bundles naming its digest, each small; the same pack again
// for a build of one node; and a build without --pack removes it.
func TestBuildPack(t *testing.T) {
	cfg := quickstart(t)
	out := filepath.Join(t.TempDir(), "out")
	res := packBuild(t, cfg, out, true)
	if res.Pack == nil {
		t.Fatal("no pack in the result")
	}
	checkSums(t, out, "after --pack")
	sums, err := trust.ReadSums(filepath.Join(out, trust.SumsFile))
	if err != nil || sums[bundle.PackFile].File != res.Pack.SHA256 {
		t.Fatalf("SHA256SUMS: %v %v, want a line for %s", sums, err, bundle.PackFile)
	}
	packBytes, err := os.ReadFile(res.Pack.Path)
	if err != nil {
		t.Fatal(err)
	}
	ix, d, err := bundle.VerifyPack(bytes.NewReader(packBytes))
	if err != nil || d != res.Pack.Digest {
		t.Fatalf("VerifyPack: %v; digest %s, want %s", err, d, res.Pack.Digest)
	}
	total := int64(len(packBytes))
	var workers int64
	for _, b := range res.Bundles {
		f, err := os.Open(b.Bundle)
		if err != nil {
			t.Fatal(err)
		}
		m, _, err := bundle.Read(f, bundle.Visitor{})
		fi, _ := f.Stat()
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if m.Pack != res.Pack.Digest || len(m.Images) == 0 {
			t.Errorf("%s: pack %q with %d images, want thin, naming %s", b.Node, m.Pack, len(m.Images), res.Pack.Digest)
		}
		p, err := bundle.OpenPack(bytes.NewReader(packBytes), int64(len(packBytes)))
		if err == nil {
			err = p.ReadBlobs(m, bundle.Visitor{})
		}
		if err != nil {
			t.Errorf("%s: its images in the pack: %v", b.Node, err)
		}
		if m.Role == "worker" {
			// The size target: the pack plus 32 KiB a worker.
			if fi.Size() > 32<<10 {
				t.Errorf("%s: thin worker bundle is %d bytes, want at most 32 KiB", b.Node, fi.Size())
			}
			workers++
		}
		total += fi.Size()
	}
	t.Logf("pack %d bytes (%d images, %d blobs); total output %d bytes for %d bundles", len(packBytes), len(ix.Images), len(ix.Blobs), total, len(res.Bundles))

	// One worker again: the same pack, the other bundles still right.
	again := packBuild(t, cfg, out, true, "w1")
	if again.Pack.Digest != res.Pack.Digest || again.Pack.SHA256 != res.Pack.SHA256 {
		t.Errorf("a build of w1 wrote another pack: %+v, was %+v", again.Pack, res.Pack)
	}
	checkSums(t, out, "after a --pack build of w1")

	// Self-contained again: the pack goes, with its line.
	plain := packBuild(t, cfg, out, false)
	if !slices.Contains(plain.Removed, res.Pack.Path) {
		t.Errorf("removed %v, want %s among them", plain.Removed, res.Pack.Path)
	}
	if _, err := os.Stat(res.Pack.Path); !os.IsNotExist(err) {
		t.Errorf("%s still there after a build without --pack: %v", res.Pack.Path, err)
	}
	checkSums(t, out, "after a build without --pack")
}
