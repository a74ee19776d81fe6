package media

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/diskfs/go-diskfs/backend/file"
	"github.com/diskfs/go-diskfs/filesystem/iso9660"
)

// TestImageWriter: the image reads back as if every write had landed, in
// the order go-diskfs makes them (a later region written before an earlier
// one), and the zeros written where nothing was are holes.
func TestImageWriter(t *testing.T) {
	type write struct {
		off  int64
		data []byte
	}
	zeros := func(n int) []byte { return make([]byte, n) }
	fill := func(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }
	tests := []struct {
		name   string
		writes []write
		// maxBlocks bounds the 512-byte blocks the file may take.
		maxBlocks int64
	}{
		{"zeros past everything are holes", []write{{0, fill(100, 1)}, {1 << 20, zeros(8 << 20)}, {9 << 20, fill(10, 2)}}, 64},
		{"zeros over written bytes are written", []write{{0, fill(4096, 1)}, {1024, zeros(1024)}}, 64},
		{"zeros before a later write are holes", []write{{8 << 20, fill(2048, 3)}, {0, fill(2048, 4)}, {2048, zeros(6 << 20)}}, 64},
		{"zeros over part of a later write are written", []write{{4096, fill(4096, 5)}, {0, zeros(6144)}}, 64},
		{"consecutive small writes", []write{{0, fill(2048, 6)}, {2048, fill(2048, 7)}, {4096, zeros(2048)}, {6144, fill(2048, 8)}}, 64},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img")
			f, err := os.Create(p)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			w := newImageWriter(f, 4096)
			var want []byte
			for _, wr := range tt.writes {
				if _, err := w.WriteAt(wr.data, wr.off); err != nil {
					t.Fatal(err)
				}
				if end := int(wr.off) + len(wr.data); end > len(want) {
					want = append(want, make([]byte, end-len(want))...)
				}
				copy(want[wr.off:], wr.data)
			}
			if err := w.flush(); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) || w.size != int64(len(want)) {
				t.Errorf("image differs from the writes (%d bytes, size %d, want %d)", len(got), w.size, len(want))
			}
			var st syscall.Stat_t
			if err := syscall.Stat(p, &st); err != nil {
				t.Fatal(err)
			}
			if st.Blocks > tt.maxBlocks {
				t.Errorf("the image takes %d blocks, want at most %d: zeros were written", st.Blocks, tt.maxBlocks)
			}
		})
	}
}

// TestStandInsFound: go-diskfs writes each stand-in's data from its
// extent's first byte, so imageWriter finds every From file with a marker
// at the extent go-diskfs records for it (read back), none without, and
// the markers never reach the image. WriteISO then carries every file,
// copied while go-diskfs lays out or after it (too small for a marker).
// If a go-diskfs upgrade writes file data otherwise, this says so first;
// WriteISO would still be right, copying every file after Finalize.
func TestStandInsFound(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	var tr Tree
	tr = append(tr, File{Path: "small.txt", Mode: 0o644, Data: []byte("small")})
	for i, n := range []int64{5000, 4096, 10, 1<<20 + 3, markerLen, 0} {
		b := make([]byte, n)
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		p := filepath.Join(dir, "src", string(rune('a'+i)))
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		tr = append(tr, File{Path: "d/" + string(rune('a'+i)), Mode: 0o600, From: p, Size: n, sum: hex.EncodeToString(sum[:])})
	}
	tr = append(tr, File{Path: "z.txt", Mode: 0o644, Data: []byte("last")})

	t.Run("found where go-diskfs puts them", func(t *testing.T) {
		ws := t.TempDir()
		markers := standInMarkers(tr)
		if err := fillWorkspace(ws, tr, markers); err != nil {
			t.Fatal(err)
		}
		f, err := os.Create(filepath.Join(t.TempDir(), "img"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		found := map[int]int64{}
		iw := newImageWriter(f, 4096)
		iw.expect(tr, markers, func(i int, off int64) {
			if _, dup := found[i]; dup {
				t.Errorf("%s found twice", tr[i].Path)
			}
			found[i] = off
		})
		fsys, err := iso9660.Create(file.New(iw, false), 0, 0, isoSector, ws)
		if err != nil {
			t.Fatal(err)
		}
		if err := fsys.Finalize(iso9660.FinalizeOptions{RockRidge: true, Joliet: true, VolumeIdentifier: "T"}); err != nil {
			t.Fatal(err)
		}
		if err := iw.flush(); err != nil {
			t.Fatal(err)
		}
		back, err := iso9660.Read(file.New(f, true), iw.size, 0, isoSector)
		if err != nil {
			t.Fatal(err)
		}
		for i, tf := range tr {
			if tf.From == "" {
				continue
			}
			e, err := back.OpenFile("/"+tf.Path, os.O_RDONLY)
			if err != nil {
				t.Fatal(err)
			}
			loc := int64(e.(*iso9660.File).Location()) * isoSector
			off, ok := found[i]
			switch {
			case markers[i] == nil && ok:
				t.Errorf("%s (%d bytes, no marker) found at %d", tf.Path, tf.Size, off)
			case markers[i] != nil && !ok:
				t.Errorf("%s (%d bytes) not found; go-diskfs puts it at %d", tf.Path, tf.Size, loc)
			case ok && off != loc:
				t.Errorf("%s found at %d; go-diskfs puts it at %d", tf.Path, off, loc)
			}
			if ok {
				got := make([]byte, tf.Size)
				if _, err := f.ReadAt(got, loc); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, make([]byte, tf.Size)) {
					t.Errorf("%s: go-diskfs's writes of its stand-in reached the image", tf.Path)
				}
			}
		}
	})

	t.Run("WriteISO carries every file", func(t *testing.T) {
		img := filepath.Join(t.TempDir(), "img")
		if err := WriteISO(img, tr, ISOOptions{Label: "T", Epoch: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(img)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fi, _ := f.Stat()
		back, err := iso9660.Read(file.New(f, true), fi.Size(), 0, isoSector)
		if err != nil {
			t.Fatal(err)
		}
		for _, tf := range tr {
			want := tf.Data
			if tf.From != "" {
				want, _ = os.ReadFile(tf.From)
			}
			e, err := back.OpenFile("/"+tf.Path, os.O_RDONLY)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(e)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s: the image holds %d bytes other than the file's %d", tf.Path, len(got), len(want))
			}
		}
	})
}

// TestDirectWriter: the copy's writes land as written whatever the
// extent's offset and the piece sizes, part O_DIRECT, part not.
func TestDirectWriter(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 3*directAlign*10+123)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	for _, off := range []int64{0, 2048, 512, directAlign + 7} {
		p := filepath.Join(t.TempDir(), "img")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(off + int64(len(data)))
		// A filesystem without O_DIRECT (tmpfs) leaves only the other
		// path, as WriteISO does there.
		d, err := os.OpenFile(p, os.O_WRONLY|syscall.O_DIRECT, 0)
		if err != nil {
			d = nil
		}
		w := &directWriter{f, d, off}
		first := directAlign - int(off%directAlign)
		for rest := data; len(rest) > 0; {
			buf := make([]byte, 4*directAlign) // page-aligned, as pipeHash's
			k := copy(buf[:min(first, len(buf))], rest)
			if _, err := w.Write(buf[:k]); err != nil {
				t.Fatal(err)
			}
			rest, first = rest[k:], len(buf)
		}
		if d != nil {
			d.Close()
		}
		f.Close()
		got, _ := os.ReadFile(p)
		if !bytes.Equal(got[off:], data) || !bytes.Equal(got[:off], make([]byte, off)) {
			t.Errorf("offset %d: the image differs from what was written", off)
		}
	}
}
