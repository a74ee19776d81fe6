package media

import (
	"io"
	"sync/atomic"
)

// Meter counts the bytes a medium's write has verified and copied so far,
// for a progress line; it is safe to read from any goroutine while the
// write runs. Set it on the Source before Verify and before the Tree is
// made (ClusterTree, SeedTree).
type Meter struct {
	verified, copied atomic.Int64
}

// Verified is how many bytes of the bundles (and pack) have been read
// through verification.
func (m *Meter) Verified() int64 { return m.verified.Load() }

// Copied is how many bytes of the files copied onto the medium (bundles,
// pack, runner) have been written.
func (m *Meter) Copied() int64 { return m.copied.Load() }

// counting adds the length of each read or write to n.
type counting struct {
	r io.Reader
	w io.Writer
	n *atomic.Int64
}

func (c counting) Read(p []byte) (int, error) {
	k, err := c.r.Read(p)
	c.n.Add(int64(k))
	return k, err
}

func (c counting) Write(p []byte) (int, error) {
	k, err := c.w.Write(p)
	c.n.Add(int64(k))
	return k, err
}

// verifying is r, counted as verified by m (nil: not counted).
func (m *Meter) verifying(r io.Reader) io.Reader {
	if m == nil {
		return r
	}
	return counting{r: r, n: &m.verified}
}

// copying is w, counted as copied by m (nil: not counted).
func (m *Meter) copying(w io.Writer) io.Writer {
	if m == nil {
		return w
	}
	return counting{w: w, n: &m.copied}
}

// VerifyBytes is how many bytes Verify reads: every bundle and the pack.
func (s *Source) VerifyBytes() int64 {
	n := int64(0)
	for _, b := range s.Bundles {
		n += b.Size
	}
	if s.Pack != nil {
		n += s.Pack.Size
	}
	return n
}

// CopyBytes is how many bytes writing t copies from files on disk.
func (t Tree) CopyBytes() int64 {
	n := int64(0)
	for _, f := range t {
		if f.From != "" {
			n += f.Size
		}
	}
	return n
}

// metered counts t's copies on m.
func (t Tree) metered(m *Meter) Tree {
	for i := range t {
		t[i].meter = m
	}
	return t
}
