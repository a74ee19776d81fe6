package bundle

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"airadm.dev/airadm/atomicfile"
)

// SourceError says why a host file's source could not be had: missing,
// unreachable, or not the bytes its sha256 names (a *MismatchError inside).
type SourceError struct {
	Source string
	Err    error
}

func (e *SourceError) Error() string { return fmt.Sprintf("fetching %s: %v", e.Source, e.Err) }
func (e *SourceError) Unwrap() error { return e.Err }

// maxHostSource bounds one downloaded source, so that a server that never
// stops sending cannot fill the build machine's disk.
const maxHostSource = 8 << 30

// Fetcher brings host files' sources (http(s) URLs or local paths) into the
// cache the images share, keyed by sha256: each source is read once however
// many nodes carry it, and never again while the cache holds its blob.
type Fetcher struct {
	Cache *Cache
	// Client fetches URLs; nil means one with Go's defaults: the system's
	// trust store (SSL_CERT_FILE and SSL_CERT_DIR are honoured) and the
	// proxy from the environment.
	Client *http.Client
}

// Fetch makes sure the blob sha256Hex, the contents of source, is in the
// cache, and returns its size and whether it had to be read from source.
func (f *Fetcher) Fetch(ctx context.Context, source, sha256Hex string) (size int64, fetched bool, err error) {
	h := v1.Hash{Algorithm: "sha256", Hex: sha256Hex}
	size, cached := f.Cache.stat(h)
	if isURL(source) {
		if cached {
			return size, false, nil
		}
		n, err := f.download(ctx, source, h)
		if err != nil {
			return 0, false, &SourceError{Source: source, Err: err}
		}
		return n, true, nil
	}
	info, err := os.Stat(source)
	if err != nil {
		return 0, false, &SourceError{Source: source, Err: errors.Unwrap(err)}
	}
	if !info.Mode().IsRegular() {
		return 0, false, &SourceError{Source: source, Err: errors.New("not a regular file")}
	}
	if cached && size == info.Size() {
		return size, false, nil
	}
	in, err := os.Open(source)
	if err != nil {
		return 0, false, &SourceError{Source: source, Err: errors.Unwrap(err)}
	}
	defer in.Close()
	if _, err := f.Cache.putStream(h, in, info.Size()); err != nil {
		return 0, false, &SourceError{Source: source, Err: err}
	}
	return info.Size(), true, nil
}

func isURL(s string) bool {
	return len(s) > 8 && (s[:8] == "https://" || s[:7] == "http://")
}

func (f *Fetcher) download(ctx context.Context, url string, h v1.Hash) (int64, error) {
	client := f.Client
	if client == nil {
		client = &http.Client{}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		var ue interface{ Unwrap() error }
		if errors.As(err, &ue) && ue.Unwrap() != nil {
			// *url.Error repeats the method and URL the caller names.
			err = ue.Unwrap()
		}
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("server answered %s", resp.Status)
	}
	return f.Cache.putStream(h, resp.Body, -1)
}

// stat returns a cached blob's size.
func (c *Cache) stat(h v1.Hash) (int64, bool) {
	info, err := os.Stat(c.path(h))
	if err != nil || !info.Mode().IsRegular() {
		return 0, false
	}
	return info.Size(), true
}

// putStream stores r as blob h if its bytes hash to h; size is checked
// unless negative. Errors are a *MismatchError or the reader's.
func (c *Cache) putStream(h v1.Hash, r io.Reader, size int64) (int64, error) {
	var n int64
	var fillErr error
	err := atomicfile.WriteFrom(c.path(h), 0o644, func(w io.Writer) (err error) {
		defer func() { fillErr = err }()
		sum := sha256.New()
		limit := int64(maxHostSource)
		if size >= 0 {
			limit = size
		}
		n, err = io.CopyBuffer(io.MultiWriter(w, sum), io.LimitReader(r, limit+1), make([]byte, 1<<20))
		if err != nil {
			return err
		}
		if size < 0 {
			if n > limit {
				return fmt.Errorf("larger than %d bytes", limit)
			}
			size = n
		}
		return checkDigest(sum, n, size, h.Hex)
	})
	if fillErr != nil {
		return n, fillErr // the source's fault, not the cache's: no cache path in it
	}
	return n, err
}

// putUnknown stores r as a blob named by its sha256, which it returns.
func (c *Cache) putUnknown(r io.Reader) (v1.Hash, int64, error) {
	dir := filepath.Join(c.dir, "blobs", "sha256")
	tmp, err := os.CreateTemp(dir, ".unpack-*")
	if err != nil {
		return v1.Hash{}, 0, err
	}
	defer os.Remove(tmp.Name())
	sum := sha256.New()
	n, err := io.CopyBuffer(io.MultiWriter(tmp, sum), io.LimitReader(r, maxHostSource+1), make([]byte, 1<<20))
	if err == nil && n > maxHostSource {
		err = fmt.Errorf("larger than %d bytes", int64(maxHostSource))
	}
	if err == nil {
		err = tmp.Close()
	} else {
		tmp.Close()
	}
	if err != nil {
		return v1.Hash{}, 0, err
	}
	h := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum.Sum(nil))}
	if size, ok := c.stat(h); ok && size == n {
		return h, n, nil
	}
	// The bytes were hashed as they were written, so the name is right;
	// a rename makes the blob appear whole or not at all.
	if err := os.Rename(tmp.Name(), c.path(h)); err != nil {
		return v1.Hash{}, 0, err
	}
	return h, n, nil
}

// UnpackedFile is one regular file of an unpacked archive, its bytes a blob
// of the cache.
type UnpackedFile struct {
	Name   string      `json:"name"` // relative to the archive's directory
	Mode   fs.FileMode `json:"mode"`
	Digest v1.Hash     `json:"digest"`
	Size   int64       `json:"size"`
}

// unpackIndexVersion names the rules an unpack index was made under, so
// that a change to ReadArchive's checks is never bypassed by an old index.
const unpackIndexVersion = "v1"

// Unpack unpacks the cached archive blob sha256Hex into the cache, one blob
// per regular file, and lists its files in archive order. The list is kept
// beside the blobs, so a later build reads no archive whose files are all
// still cached.
func (f *Fetcher) Unpack(sha256Hex string, strip int) ([]UnpackedFile, error) {
	index := filepath.Join(f.Cache.dir, "host-archives", fmt.Sprintf("%s-strip%d-%s.json", sha256Hex, strip, unpackIndexVersion))
	if b, err := os.ReadFile(index); err == nil {
		var files []UnpackedFile
		if json.Unmarshal(b, &files) == nil && f.allCached(files) {
			return files, nil
		}
	}
	rc, err := f.Cache.Open(v1.Hash{Algorithm: "sha256", Hex: sha256Hex})
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	files := []UnpackedFile{}
	err = ReadArchive(rc, strip, func(e ArchiveEntry, r io.Reader) error {
		h, n, err := f.Cache.putUnknown(r)
		if err != nil {
			return err
		}
		files = append(files, UnpackedFile{Name: e.Name, Mode: e.Mode, Digest: h, Size: n})
		return nil
	})
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(files)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(index), 0o755); err != nil {
		return nil, fmt.Errorf("caching archive index: %w", err)
	}
	if err := atomicfile.Write(index, b, 0o644); err != nil {
		return nil, fmt.Errorf("caching archive index: %w", err)
	}
	return files, nil
}

func (f *Fetcher) allCached(files []UnpackedFile) bool {
	for _, u := range files {
		if !f.Cache.Has(u.Digest, u.Size) {
			return false
		}
	}
	return true
}
