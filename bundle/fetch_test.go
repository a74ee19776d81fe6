package bundle

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func hexSum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestFetchURL(t *testing.T) {
	body := []byte("a host binary")
	requests := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests++
		if r.URL.Path != "/bin" {
			http.NotFound(w, r)
			return
		}
		w.Write(body)
	}))
	defer srv.Close()
	cache, err := OpenCache(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	f := &Fetcher{Cache: cache}
	ctx := context.Background()
	for _, tc := range []struct {
		name, url, sum string
		want           string // error text; empty for success
	}{
		{"not found", srv.URL + "/nope", hexSum(body), "fetching " + srv.URL + "/nope: server answered 404 Not Found"},
		{"mismatch", srv.URL + "/bin", strings.Repeat("0", 64), "fetching " + srv.URL + "/bin: sha256 mismatch: got " + hexSum(body) + ", want " + strings.Repeat("0", 64)},
		{"unreachable", "http://127.0.0.1:1/bin", hexSum(body), "connection refused"},
		{"ok", srv.URL + "/bin", hexSum(body), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			size, fetched, err := f.Fetch(ctx, tc.url, tc.sum)
			if tc.want == "" {
				if err != nil || size != int64(len(body)) || !fetched {
					t.Fatalf("Fetch = %d, %v, %v", size, fetched, err)
				}
				return
			}
			var se *SourceError
			if !errors.As(err, &se) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want a *SourceError containing %q", err, tc.want)
			}
			if cache.Has(v1.Hash{Algorithm: "sha256", Hex: tc.sum}, int64(len(body))) {
				t.Error("a failed fetch left a blob in the cache")
			}
		})
	}
	before := requests
	if size, fetched, err := f.Fetch(ctx, srv.URL+"/bin", hexSum(body)); err != nil || fetched || size != int64(len(body)) {
		t.Errorf("cached Fetch = %d, %v, %v", size, fetched, err)
	}
	if requests != before {
		t.Errorf("a cached blob was requested again")
	}
}

// TestUnpackIndex: a second Unpack of the same archive reads its list from
// the cache, not the archive; a missing unpacked blob makes it unpack again.
func TestUnpackIndex(t *testing.T) {
	cache, err := OpenCache(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	arch := mkTar(t, ent{name: "bin/", typ: tar.TypeDir}, ent{name: "bin/containerd", body: "ctrd"}, ent{name: "bin/ctr", body: "ctr", mode: 0o700})
	src := t.TempDir() + "/containerd.tar"
	os.WriteFile(src, arch, 0o644)
	f := &Fetcher{Cache: cache}
	if _, _, err := f.Fetch(context.Background(), src, hexSum(arch)); err != nil {
		t.Fatal(err)
	}
	first, err := f.Unpack(hexSum(arch), 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(first) != 2 || first[0].Name != "containerd" || first[0].Digest.Hex != hexSum([]byte("ctrd")) || first[1].Mode != 0o700 {
		t.Fatalf("unpacked %+v", first)
	}
	// Without the archive, the index still answers.
	os.Remove(cache.path(v1.Hash{Algorithm: "sha256", Hex: hexSum(arch)}))
	again, err := f.Unpack(hexSum(arch), 1)
	if err != nil || len(again) != 2 || again[1] != first[1] {
		t.Fatalf("second Unpack = %+v, %v", again, err)
	}
	// An unpacked blob gone: the index is not trusted, and the archive is
	// needed again.
	os.Remove(cache.path(first[0].Digest))
	if _, err := f.Unpack(hexSum(arch), 1); err == nil {
		t.Fatal("Unpack with a blob and the archive gone succeeded")
	}
}
