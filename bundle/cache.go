package bundle

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"airadm.dev/airadm/atomicfile"
)

// Cache is a content-addressed blob store on the build machine, shared by
// every node and every build: blobs/sha256/<hex>. A blob enters only after
// its bytes hashed to its name, through a temp file and a rename, so
// concurrent pulls and crashes never leave a wrong blob under a right name
// (go-containerregistry's layout writes straight to the final path).
type Cache struct {
	dir string
}

// OpenCache creates the cache directory if needed.
func OpenCache(dir string) (*Cache, error) {
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return nil, fmt.Errorf("opening image cache: %w", err)
	}
	return &Cache{dir: dir}, nil
}

// Dir is the cache's directory.
func (c *Cache) Dir() string { return c.dir }

func (c *Cache) path(h v1.Hash) string {
	return filepath.Join(c.dir, "blobs", h.Algorithm, h.Hex)
}

// Has reports whether the blob is cached with the given size.
func (c *Cache) Has(h v1.Hash, size int64) bool {
	info, err := os.Stat(c.path(h))
	return err == nil && info.Mode().IsRegular() && info.Size() == size
}

// Open returns the cached blob.
func (c *Cache) Open(h v1.Hash) (io.ReadCloser, error) {
	f, err := os.Open(c.path(h))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("blob %s is not in the image cache %s", h, c.dir)
	}
	return f, err
}

// Put stores r as blob h if its bytes match h and size.
func (c *Cache) Put(h v1.Hash, size int64, r io.Reader) error {
	if h.Algorithm != "sha256" {
		return fmt.Errorf("caching blob %s: only sha256 digests are supported", h)
	}
	err := atomicfile.WriteFrom(c.path(h), 0o644, func(w io.Writer) error {
		sum := sha256.New()
		n, err := io.Copy(io.MultiWriter(w, sum), io.LimitReader(r, size+1))
		if err != nil {
			return err
		}
		return checkDigest(sum, n, size, h.Hex)
	})
	if err != nil {
		return fmt.Errorf("caching blob %s: %w", h, err)
	}
	return nil
}

// Size is the cache's total size in bytes, for reports and tests.
func (c *Cache) Size() (int64, error) {
	var total int64
	err := filepath.WalkDir(filepath.Join(c.dir, "blobs"), func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		if err == nil {
			total += info.Size()
		}
		return err
	})
	return total, err
}
