package bundle

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// ent is one tar entry of a test archive.
type ent struct {
	name string
	typ  byte
	mode int64
	body string
	link string
}

func mkTar(t testing.TB, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := e.mode
		if mode == 0 {
			mode = 0o755
		}
		hdr := &tar.Header{Name: e.name, Typeflag: typ, Mode: mode, Linkname: e.link}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gz(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	w.Close()
	return buf.Bytes()
}

func zst(t testing.TB, b []byte) []byte {
	w, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	return w.EncodeAll(b, nil)
}

// readAll unpacks an archive into name -> "mode body".
func readAll(b []byte, strip int) (map[string]string, error) {
	out := map[string]string{}
	err := ReadArchive(bytes.NewReader(b), strip, func(e ArchiveEntry, r io.Reader) error {
		body, err := io.ReadAll(r)
		if err != nil {
			return err
		}
		if int64(len(body)) != e.Size {
			return fmt.Errorf("size %d, read %d", e.Size, len(body))
		}
		out[e.Name] = fmt.Sprintf("%04o %s", e.Mode, body)
		return nil
	})
	return out, err
}

func TestReadArchiveFormats(t *testing.T) {
	// containerd's release tarball: bin/ holding the binaries.
	plain := mkTar(t,
		ent{name: "bin/", typ: tar.TypeDir},
		ent{name: "bin/containerd", body: "ctrd", mode: 0o4755}, // setuid is dropped
		ent{name: "bin/ctr", body: "ctr", mode: 0o700},
		ent{name: "./bin/sub/x", body: "x", mode: 0o644},
	)
	want := map[string]string{"bin/containerd": "0755 ctrd", "bin/ctr": "0700 ctr", "bin/sub/x": "0644 x"}
	for _, tc := range []struct {
		name string
		b    []byte
	}{{"tar", plain}, {"gzip", gz(t, plain)}, {"zstd", zst(t, plain)}} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readAll(tc.b, 0)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("got %v, want %v", got, want)
			}
		})
	}
	got, err := readAll(plain, 1)
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]string{"containerd": "0755 ctrd", "ctr": "0700 ctr", "sub/x": "0644 x"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("strip 1: got %v, want %v", got, want)
	}
}

func TestReadArchiveRefusesHostile(t *testing.T) {
	for _, tc := range []struct {
		name  string
		b     []byte
		strip int
		want  string
	}{
		{"dotdot", mkTar(t, ent{name: "../etc/passwd", body: "x"}), 0, `entry "../etc/passwd": has a ".." component`},
		{"dotdot inside", mkTar(t, ent{name: "a/../../b", body: "x"}), 0, `entry "a/../../b": has a ".." component`},
		{"dotdot harmless still refused", mkTar(t, ent{name: "a/../b", body: "x"}), 0, `entry "a/../b": has a ".." component`},
		{"absolute", mkTar(t, ent{name: "/usr/bin/x", body: "x"}), 0, `entry "/usr/bin/x": has an absolute name`},
		{"symlink", mkTar(t, ent{name: "bin/sh", typ: tar.TypeSymlink, link: "/bin/busybox"}), 0, `entry "bin/sh": is a symlink (to "/bin/busybox"): only regular files and directories may be unpacked`},
		{"hardlink", mkTar(t, ent{name: "a", body: "x"}, ent{name: "b", typ: tar.TypeLink, link: "a"}), 0, `entry "b": is a hard link (to "a")`},
		{"char device", mkTar(t, ent{name: "dev/null", typ: tar.TypeChar}), 0, `entry "dev/null": is a device`},
		{"block device", mkTar(t, ent{name: "dev/sda", typ: tar.TypeBlock}), 0, `entry "dev/sda": is a device`},
		{"fifo", mkTar(t, ent{name: "p", typ: tar.TypeFifo}), 0, `entry "p": is a FIFO`},
		{"duplicate", mkTar(t, ent{name: "bin/x", body: "1"}, ent{name: "bin/x", body: "2"}), 0, `entry "bin/x": names bin/x a second time`},
		{"duplicate after cleaning", mkTar(t, ent{name: "bin/x", body: "1"}, ent{name: "./bin//x", body: "2"}), 0, `entry "./bin//x": names bin/x a second time`},
		{"duplicate after strip", mkTar(t, ent{name: "a/x", body: "1"}, ent{name: "b/x", body: "2"}), 1, `entry "b/x": names x a second time`},
		{"duplicate directory", mkTar(t, ent{name: "d/", typ: tar.TypeDir}, ent{name: "d", typ: tar.TypeDir}), 0, `entry "d": names d a second time`},
		{"file under file", mkTar(t, ent{name: "a", body: "1"}, ent{name: "a/b", body: "2"}), 0, `entry "a/b": lies under a, a file of the same archive`},
		{"file over directory", mkTar(t, ent{name: "a/b", body: "1"}, ent{name: "a", body: "2"}), 0, `entry "a": is a file, but earlier entries lie under a`},
		{"too short for strip", mkTar(t, ent{name: "x", body: "1"}), 1, `entry "x": has 1 path components, not more than strip = 1`},
		{"control character", mkTar(t, ent{name: "a\nb", body: "1"}), 0, "entry \"a\\nb\": has characters outside printable ASCII"},
		{"not an archive", []byte("hello, this is not a tar file at all"), 0, "reading tar"},
		{"empty", mkTar(t), 0, "no entries"},
		{"truncated gzip", gz(t, mkTar(t, ent{name: "a", body: strings.Repeat("x", 4096)}))[:40], 0, "unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := readAll(tc.b, tc.strip)
			var ae *ArchiveError
			if !errors.As(err, &ae) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want an *ArchiveError containing %q", err, tc.want)
			}
		})
	}
}

// FuzzReadArchive: whatever the bytes, ReadArchive returns, and every name
// it hands out is relative, clean, unique and free of "..".
func FuzzReadArchive(f *testing.F) {
	f.Add(mkTar(f, ent{name: "bin/", typ: tar.TypeDir}, ent{name: "bin/x", body: "x"}), 0)
	f.Add(gz(f, mkTar(f, ent{name: "a/b/c", body: "c"}, ent{name: "a/d", body: "d"})), 1)
	f.Add(zst(f, mkTar(f, ent{name: "x", body: "x"})), 0)
	f.Add(mkTar(f, ent{name: "l", typ: tar.TypeSymlink, link: "../x"}), 0)
	f.Fuzz(func(t *testing.T, b []byte, strip int) {
		if strip < 0 || strip > 8 {
			return
		}
		seen := map[string]bool{}
		ReadArchive(bytes.NewReader(b), strip, func(e ArchiveEntry, r io.Reader) error {
			if e.Name == "" || strings.HasPrefix(e.Name, "/") || strings.Contains("/"+e.Name+"/", "/../") ||
				strings.Contains("/"+e.Name+"/", "/./") || strings.Contains(e.Name, "//") || strings.HasSuffix(e.Name, "/") {
				t.Fatalf("unsafe name %q", e.Name)
			}
			if seen[e.Name] {
				t.Fatalf("name %q handed out twice", e.Name)
			}
			for p := range seen {
				if strings.HasPrefix(e.Name, p+"/") || strings.HasPrefix(p, e.Name+"/") {
					t.Fatalf("%q and %q are a file and a directory at once", p, e.Name)
				}
			}
			if e.Mode&^fs.ModePerm != 0 {
				t.Fatalf("mode %v has more than permission bits", e.Mode)
			}
			seen[e.Name] = true
			_, err := io.Copy(io.Discard, io.LimitReader(r, 1<<20))
			return err
		})
	})
}
