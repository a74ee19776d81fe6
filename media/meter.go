package media

import (
	"io"
	"sync/atomic"
)

// Meter counts the bytes a medium's write has verified and copied so far,
// and the totals of what it has begun to verify and copy, for a progress
// line; it is safe to read from any goroutine while the write runs. Set
// it on the Source before Verify and before the Tree is made
// (ClusterTree, SeedTree).
type Meter struct {
	verified, verifyTotal, copied, copyTotal atomic.Int64
}

// Verified is how many bytes of the bundles (and pack) have been read
// through verification, of the total of the verifications begun.
func (m *Meter) Verified() (done, total int64) { return m.verified.Load(), m.verifyTotal.Load() }

// Copied is how many bytes of the files copied onto the medium (bundles,
// pack, runner) have been written, of the total of the Trees made.
func (m *Meter) Copied() (done, total int64) { return m.copied.Load(), m.copyTotal.Load() }

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

// expectVerify adds what s has yet to verify to m's total (nil: not
// counted).
func (m *Meter) expectVerify(s *Source) {
	if m == nil {
		return
	}
	n := int64(0)
	for _, b := range s.Bundles {
		if !b.verified {
			n += b.Size
		}
	}
	if s.Pack != nil && !s.Pack.verified {
		n += s.Pack.Size
	}
	m.verifyTotal.Add(n)
}

// metered counts t's copies on m, and adds them to m's total (nil: not
// counted).
func (t Tree) metered(m *Meter) Tree {
	if m == nil {
		return t
	}
	for i := range t {
		t[i].meter = m
		if t[i].From != "" {
			m.copyTotal.Add(t[i].Size)
		}
	}
	return t
}
