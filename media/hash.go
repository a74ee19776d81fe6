package media

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"
	"sync/atomic"

	"airadm.dev/airadm/trust"
)

// pipeHash hashes with sha256, on a goroutine of its own, the chunks
// handed to it, so that hashing a large file overlaps reading and writing
// it (or, in verify, the bundle reader's own hashing) on another core.
// Chunks live in a few buffers that cycle between the caller and the
// hasher.
type pipeHash struct {
	h    hash.Hash
	todo chan []byte
	free chan []byte
	done chan struct{}
}

const (
	chunkSize    = 4 * mib
	chunkBuffers = 4
)

func newPipeHash() *pipeHash {
	p := &pipeHash{h: sha256.New(), todo: make(chan []byte, chunkBuffers), free: make(chan []byte, chunkBuffers), done: make(chan struct{})}
	for range chunkBuffers {
		p.free <- make([]byte, chunkSize)
	}
	go func() {
		defer close(p.done)
		for b := range p.todo {
			p.h.Write(b)
			p.free <- b[:cap(b)]
		}
	}()
	return p
}

// buffer returns a free chunk buffer.
func (p *pipeHash) buffer() []byte { return <-p.free }

// hash hands b (from buffer) to the hasher; the caller must not touch it
// again.
func (p *pipeHash) hash(b []byte) { p.todo <- b }

// Write copies b into chunks and hashes them: an io.Writer for a
// TeeReader.
func (p *pipeHash) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		c := p.buffer()
		k := copy(c, b)
		p.hash(c[:k])
		b = b[k:]
	}
	return n, nil
}

// sum waits for the hasher and returns the hex sha256 of all chunks; the
// pipeHash is done with after it.
func (p *pipeHash) sum() string {
	close(p.todo)
	<-p.done
	return hex.EncodeToString(p.h.Sum(nil))
}

// copyInto copies tf.From to w in large pieces and checks, in the same
// pass, that it still has the size and sha256 it had when it was verified,
// so the medium carries exactly the bytes that were verified. It refuses a
// file that has not been verified before reading a byte of it.
func copyInto(w io.Writer, tf File) error {
	if err := checkVerified(tf); err != nil {
		return err
	}
	return checkCopied(tf, copyHashed(w, tf, chunkSize))
}

// checkVerified refuses a file of a Tree whose Source has not been
// verified: its sums are only claimed (a Tree of a Source from Scan).
func checkVerified(tf File) error {
	if tf.bundle != nil && !tf.bundle.verified {
		return fmt.Errorf("copying %s: it has not been verified (Source.Verify)", tf.From)
	}
	return nil
}

// copied is what copyHashed found.
type copied struct {
	n   int64
	sum string
	err error
}

// copyHashed copies tf.From to w in large pieces, hashing them with sha256
// on another core. It reads nothing of tf.bundle, which verification may
// be writing meanwhile: checkCopied judges the result once it is done.
// The first piece is first bytes long (at most chunkSize).
func copyHashed(w io.Writer, tf File, first int) copied {
	in, err := os.Open(tf.From)
	if err != nil {
		return copied{err: err}
	}
	defer in.Close()
	p := newPipeHash()
	n, err := copyChunks(tf.meter.copying(w), io.LimitReader(in, tf.Size+1), p, first) // one byte past the size tells a file that grew
	return copied{n: n, sum: p.sum(), err: err}
}

// checkCopied says whether c carried exactly the size and sha256 tf had
// when it was verified. For a bundle verified by its entries alone
// (VerifyEntries) the sha256 is its line in SHA256SUMS, whose manifest
// digest the verification matched: this check is then the one that binds
// the two. Call it only once verification is over.
func checkCopied(tf File, c copied) error {
	if c.err != nil {
		return fmt.Errorf("copying %s: %w", tf.From, c.err)
	}
	if c.n != tf.Size || c.sum != tf.sum {
		if tf.bundle != nil && !tf.bundle.fileChecked && c.n == tf.Size {
			// Verified by its entries alone (VerifyEntries): this is the
			// first look at its whole-file sha256.
			return &InputError{fmt.Errorf("verifying %s: file sha256 %s is not %s from %s (the file was altered outside its entries, is another build, or changed after it was verified): %w", tf.From, c.sum, tf.sum, trust.SumsFile, trust.ErrUntrusted)}
		}
		return inputErrorf("%s changed after it was verified; run again once nothing writes it", tf.From)
	}
	return nil
}

// copyChunks copies r to w, and hands every piece to p, in order, once
// written. The writes run on a goroutine of their own, so that reading the
// next piece overlaps writing this one (an O_DIRECT write waits for the
// disk), and the sha256 of the one before runs on p's.
func copyChunks(w io.Writer, r io.Reader, p *pipeHash, first int) (int64, error) {
	todo := make(chan []byte, chunkBuffers)
	werr := make(chan error, 1)
	var failed atomic.Bool
	go func() {
		var err error
		for c := range todo {
			if err == nil && len(c) > 0 {
				if _, err = w.Write(c); err != nil {
					failed.Store(true)
				}
			}
			p.hash(c)
		}
		werr <- err
	}()
	var n int64
	var rerr error
	for !failed.Load() {
		c := p.buffer()
		if n == 0 {
			c = c[:first]
		}
		k, err := io.ReadFull(r, c)
		n += int64(k)
		todo <- c[:k]
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			rerr = err
			break
		}
	}
	close(todo)
	if err := <-werr; err != nil {
		return n, err
	}
	return n, rerr
}
