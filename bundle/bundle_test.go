package bundle_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

// testRegistry is a real registry on loopback that counts blob downloads.
type testRegistry struct {
	host  string
	mu    sync.Mutex
	blobs map[string]int // GET /v2/<repo>/blobs/<digest> by digest
}

func newRegistry(t *testing.T) *testRegistry {
	t.Helper()
	r := &testRegistry{blobs: map[string]int{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/sha256:") {
			r.mu.Lock()
			r.blobs[req.URL.Path[strings.LastIndex(req.URL.Path, "/")+1:]]++
			r.mu.Unlock()
		}
		reg.ServeHTTP(w, req)
	}))
	t.Cleanup(srv.Close)
	r.host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

func (r *testRegistry) blobGets() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for k, v := range r.blobs {
		out[k] = v
	}
	return out
}

// pushIndex pushes a two-platform index of random images and returns it
// with its linux/amd64 child.
func pushIndex(t *testing.T, ref string, shared v1.Layer) (v1.ImageIndex, v1.Image) {
	t.Helper()
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	var amd64 v1.Image
	for _, arch := range []string{"amd64", "arm64"} {
		img, err := random.Image(2048, 2)
		if err != nil {
			t.Fatal(err)
		}
		if shared != nil {
			img, err = mutate.AppendLayers(img, shared)
			if err != nil {
				t.Fatal(err)
			}
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: arch}}})
		if arch == "amd64" {
			amd64 = img
		}
	}
	n, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(n, idx); err != nil {
		t.Fatal(err)
	}
	return idx, amd64
}

type fixture struct {
	reg     *testRegistry
	cluster *render.Cluster
	cache   *bundle.Cache
	images  []bundle.Image
	byRef   map[string]bundle.Image
}

// pullFixture pushes a cluster's images to a loopback registry and pulls the
// control plane's set.
func pullFixture(t *testing.T) *fixture {
	t.Helper()
	reg := newRegistry(t)
	c, err := render.Parse("t.toml", []byte(fmt.Sprintf(`
name = "b"
[images]
repository = %q
extra = ["%s/cni/plugin:v1"]
[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.0.0.11"
[[nodes]]
name = "w1"
role = "worker"
address = "10.0.0.21"
[[nodes]]
name = "w2"
role = "worker"
address = "10.0.0.22"
`, reg.host+"/k8s", reg.host)))
	if err != nil {
		t.Fatal(err)
	}
	shared, err := random.Layer(4096, types.OCILayer)
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range c.Images() {
		pushIndex(t, ref, shared)
	}
	cache, err := bundle.OpenCache(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{reg: reg, cluster: c, cache: cache, byRef: map[string]bundle.Image{}}
	f.images = f.pull(t, c.Images())
	return f
}

func (f *fixture) pull(t *testing.T, refs []string) []bundle.Image {
	t.Helper()
	p := &bundle.Puller{Source: bundle.Registry{}, Cache: f.cache, Platform: v1.Platform{OS: "linux", Architecture: "amd64"}, Jobs: 4}
	images, err := p.Pull(context.Background(), refs)
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range images {
		f.byRef[im.Ref] = im
	}
	return images
}

func (f *fixture) contents(t *testing.T, node string) bundle.Contents {
	t.Helper()
	n, _ := f.cluster.Node(node)
	c := bundle.Contents{
		Cluster: "b", Node: node, Role: string(n.Role), KubernetesVersion: render.KubernetesVersion,
		BuildTime: time.Date(2026, 2, 3, 4, 5, 6, 0, time.UTC),
		Files: []render.File{
			{Path: "/etc/kubernetes/pki/ca.crt", Mode: 0o644, Data: []byte("cert")},
			{Path: "/var/lib/kubelet/config.yaml", Mode: 0o644, Data: []byte("kind: KubeletConfiguration\n")},
		},
	}
	for _, r := range f.cluster.NodeImages(n) {
		c.Images = append(c.Images, f.byRef[r])
	}
	return c
}

func write(t *testing.T, c bundle.Contents, store bundle.BlobStore) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	_, digest, err := bundle.Write(&buf, c, store)
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), digest
}

func TestPullMatchesRegistry(t *testing.T) {
	f := pullFixture(t)
	for _, im := range f.images {
		n, _ := name.ParseReference(im.Ref)
		desc, err := remote.Get(n)
		if err != nil {
			t.Fatal(err)
		}
		if im.IndexDigest != desc.Digest.String() {
			t.Errorf("%s: index digest %s, registry says %s", im.Ref, im.IndexDigest, desc.Digest)
		}
		idx, _ := desc.ImageIndex()
		m, _ := idx.IndexManifest()
		var want v1.Hash
		for _, d := range m.Manifests {
			if d.Platform.Architecture == "amd64" {
				want = d.Digest
			}
		}
		if im.Manifest.Digest != want {
			t.Errorf("%s: pulled %s, registry's linux/amd64 manifest is %s", im.Ref, im.Manifest.Digest, want)
		}
		for _, b := range append(im.Blobs, im.Manifest) {
			if !f.cache.Has(b.Digest, b.Size) {
				t.Errorf("%s: blob %s not cached", im.Ref, b.Digest)
			}
		}
	}
	// Every blob crossed the wire once, the shared layer included.
	for d, n := range f.reg.blobGets() {
		if n != 1 {
			t.Errorf("blob %s fetched %d times", d, n)
		}
	}
}

func TestSecondNodeFetchesNothing(t *testing.T) {
	f := pullFixture(t)
	before := f.reg.blobGets()
	size, _ := f.cache.Size()
	n, _ := f.cluster.Node("w2")
	f.pull(t, f.cluster.NodeImages(n))
	if after := f.reg.blobGets(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("adding a node fetched blobs again: before %v, after %v", before, after)
	}
	if after, _ := f.cache.Size(); after != size {
		t.Errorf("cache grew from %d to %d bytes for a node with the same images", size, after)
	}
}

func TestWriteIsReproducibleAndReadable(t *testing.T) {
	f := pullFixture(t)
	a, da := write(t, f.contents(t, "cp1"), f.cache)
	b, db := write(t, f.contents(t, "cp1"), f.cache)
	if sha256.Sum256(a) != sha256.Sum256(b) || da != db {
		t.Fatal("two writes of the same contents differ")
	}
	m, digest, err := bundle.Read(bytes.NewReader(a), bundle.Visitor{})
	if err != nil {
		t.Fatal(err)
	}
	if digest != da || m.Node != "cp1" || len(m.Images) != 8 {
		t.Errorf("read back %s %s with %d images", digest, m.Node, len(m.Images))
	}

	// Standard tools read the images/ layout: go-containerregistry here.
	dir := t.TempDir()
	if err := untar(a, dir); err != nil {
		t.Fatal(err)
	}
	p, err := layout.FromPath(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	idx, _ := p.ImageIndex()
	im, _ := idx.IndexManifest()
	if len(im.Manifests) != 8 {
		t.Fatalf("layout lists %d images", len(im.Manifests))
	}
	for _, d := range im.Manifests {
		ref := d.Annotations["org.opencontainers.image.ref.name"]
		if _, err := name.ParseReference(ref, name.StrictValidation); err != nil || !strings.HasPrefix(ref, f.reg.host) {
			t.Errorf("ref.name %q is not fully qualified", ref)
		}
		img, err := idx.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		layers, _ := img.Layers()
		for _, l := range layers {
			rc, err := l.Compressed() // ggcr verifies the digest while reading
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, rc); err != nil {
				t.Errorf("%s: %v", ref, err)
			}
			rc.Close()
		}
		if d.Digest != f.byRef[ref].Manifest.Digest {
			t.Errorf("%s: layout digest %s, pulled %s", ref, d.Digest, f.byRef[ref].Manifest.Digest)
		}
	}
}

func TestWorkerCarriesOnlyItsImages(t *testing.T) {
	f := pullFixture(t)
	data, _ := write(t, f.contents(t, "w1"), f.cache)
	m, _, err := bundle.Read(bytes.NewReader(data), bundle.Visitor{})
	if err != nil {
		t.Fatal(err)
	}
	var refs []string
	for _, im := range m.Images {
		refs = append(refs, im.Ref[strings.Index(im.Ref, "/"):])
	}
	want := "[/cni/plugin:v1 /k8s/coredns:v1.14.6 /k8s/kube-proxy:v1.37.2 /k8s/pause:3.10.2]"
	if fmt.Sprint(refs) != want {
		t.Errorf("worker images %v, want %s", refs, want)
	}
}

func TestCorruptCacheIsCaught(t *testing.T) {
	f := pullFixture(t)
	c := f.contents(t, "w1")
	layer := c.Images[0].Blobs[1]
	path := filepath.Join(f.cache.Dir(), "blobs", "sha256", layer.Digest.Hex)
	b, _ := os.ReadFile(path)
	b[len(b)/2] ^= 0xff
	os.WriteFile(path, b, 0o644)
	var buf bytes.Buffer
	_, _, err := bundle.Write(&buf, c, f.cache)
	var mm *bundle.MismatchError
	if !errors.As(err, &mm) || mm.What != "sha256" {
		t.Fatalf("writing from a corrupt cache: %v", err)
	}
}
