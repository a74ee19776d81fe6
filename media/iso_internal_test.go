package media

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
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
