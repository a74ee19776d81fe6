package bundle_test

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

// countingSeeker counts the bytes read, to prove that held entries are
// passed over, not read.
type countingSeeker struct {
	*bytes.Reader
	read int
}

func (c *countingSeeker) Read(p []byte) (int, error) {
	n, err := c.Reader.Read(p)
	c.read += n
	return n, err
}

// TestHeldEntriesAreNotRead: entries the consumer holds are neither hashed
// nor, when the reader can seek, read; everything else is still checked,
// and a bundle cut short inside a held entry is still truncated.
func TestHeldEntriesAreNotRead(t *testing.T) {
	c, store := tinyContents(t)
	big := bytes.Repeat([]byte{'b'}, 4<<20)
	c.Files = append(c.Files, render.File{Path: "/usr/local/bin/big", Mode: 0o755, Data: big})
	b := writeContents(t, c, store)
	layerAt := bytes.Index(b, []byte("layer bytes"))
	bigAt := bytes.Index(b, big)

	holdAll := func(e bundle.HeldEntry) bool { return true }
	var held []string
	record := func(e bundle.HeldEntry) bool {
		switch {
		case e.File != nil:
			held = append(held, e.File.Path)
		default:
			held = append(held, e.Blob.Digest)
		}
		return true
	}
	in := &countingSeeker{Reader: bytes.NewReader(b)}
	if _, _, err := bundle.Read(in, bundle.Visitor{Held: record}); err != nil {
		t.Fatal(err)
	}
	// The image manifest and the worker's scanned files are never offered.
	if len(held) != 3 || held[0] != "/usr/local/bin/big" {
		t.Errorf("offered %v, want the big file, the config and the layer", held)
	}
	if in.read > len(b)-len(big)+(1<<20) {
		t.Errorf("read %d of %d bytes: the held 4 MiB file was read", in.read, len(b))
	}

	for _, tc := range []struct {
		name string
		at   int
	}{{"held layer", layerAt}, {"held file", bigAt + 1000}} {
		bad := bytes.Clone(b)
		bad[tc.at] ^= 0xff
		if _, _, err := bundle.Read(bytes.NewReader(bad), bundle.Visitor{Held: holdAll}); err != nil {
			t.Errorf("%s flipped, but held: %v", tc.name, err)
		}
		if _, _, err := bundle.Read(bytes.NewReader(bad), bundle.Visitor{}); err == nil {
			t.Errorf("%s flipped, not held: accepted", tc.name)
		}
	}
	for _, r := range []func([]byte) io.Reader{
		func(b []byte) io.Reader { return bytes.NewReader(b) },                      // seeks
		func(b []byte) io.Reader { return struct{ io.Reader }{bytes.NewReader(b)} }, // reads past
	} {
		_, _, err := bundle.Read(r(b[:bigAt+1000]), bundle.Visitor{Held: holdAll})
		if !errors.Is(err, bundle.ErrTruncated) {
			t.Errorf("cut inside a held file: %v, want truncated", err)
		}
	}
}
