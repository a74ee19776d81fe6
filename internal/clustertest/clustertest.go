// Package clustertest makes clusters and their secrets for tests, with a
// fixed clock and seeded randomness so that every run renders the same bytes.
package clustertest

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"testing/cryptotest"
	"time"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
)

// Now is the fixed clock reading of every test cluster.
var Now = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// Seed makes the test's randomness deterministic, key generation included
// (Go 1.26 crypto ignores custom readers, so this sets the global source;
// benchmarks keep the system source, which they do not need to repeat).
func Seed(t testing.TB, seed uint64) *rand.ChaCha8 {
	t.Helper()
	if tt, ok := t.(*testing.T); ok {
		cryptotest.SetGlobalRandom(tt, seed)
	}
	var s [32]byte
	s[0] = byte(seed)
	return rand.NewChaCha8(s)
}

// Cluster is a parsed config with its secrets directory.
type Cluster struct {
	*render.Cluster
	Secrets *render.Secrets
	Dir     string // holds cluster.toml and secrets/
}

// New writes config to a temp dir, parses it and issues its secrets.
func New(t testing.TB, config string) *Cluster {
	t.Helper()
	rnd := Seed(t, 1)
	dir := t.TempDir()
	path := filepath.Join(dir, "cluster.toml")
	if err := os.WriteFile(path, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := render.Load(path)
	if err != nil {
		t.Fatalf("loading test config: %v", err)
	}
	st, err := secrets.Open(filepath.Join(dir, "secrets"), func() time.Time { return Now }, rnd)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s, err := st.Ensure(c)
	if err != nil {
		t.Fatalf("issuing secrets: %v", err)
	}
	return &Cluster{Cluster: c, Secrets: s, Dir: dir}
}

// Files renders node name or fails the test.
func (c *Cluster) Files(t testing.TB, name string) map[string]render.File {
	t.Helper()
	files, err := render.NodeFiles(c.Cluster, c.Secrets, name)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]render.File{}
	for _, f := range files {
		out[f.Path] = f
	}
	return out
}

// Bundle writes node's bundle with the given images (nil store: none) to a
// temp file and returns its path and manifest digest.
func (c *Cluster) Bundle(t testing.TB, node string, images []bundle.Image, store bundle.BlobStore) (string, string) {
	t.Helper()
	return c.writeBundle(t, node, images, store, "")
}

// ThinBundle writes node's thin bundle, which names the image pack of
// digest pack instead of carrying its images.
func (c *Cluster) ThinBundle(t testing.TB, node string, images []bundle.Image, pack string) (string, string) {
	t.Helper()
	return c.writeBundle(t, node, images, nil, pack)
}

func (c *Cluster) writeBundle(t testing.TB, node string, images []bundle.Image, store bundle.BlobStore, pack string) (string, string) {
	t.Helper()
	n, ok := c.Node(node)
	if !ok {
		t.Fatalf("no node %s", node)
	}
	files, err := render.NodeFiles(c.Cluster, c.Secrets, node)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), node+".bundle")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, digest, err := bundle.Write(f, bundle.Contents{
		Cluster: c.Name, Node: node, Role: string(n.Role), KubernetesVersion: c.KubernetesVersion,
		BuildTime: Now, Files: files, Images: images, Pack: pack,
	}, store)
	if err != nil {
		t.Fatal(err)
	}
	return path, digest
}
