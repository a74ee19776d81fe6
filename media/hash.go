package media

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"

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
	chunkBuffers = 3
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
// so the medium carries exactly the bytes that were verified. For a bundle
// verified by its entries alone (VerifyEntries) the sha256 is its line in
// SHA256SUMS, whose manifest digest the verification matched: this check
// is then the one that binds the two.
func copyInto(w io.Writer, tf File) error {
	if tf.bundle != nil && !tf.bundle.verified {
		// A Tree of a Source from Scan: its sums are only claimed.
		return fmt.Errorf("copying %s: it has not been verified (Source.Verify)", tf.From)
	}
	in, err := os.Open(tf.From)
	if err != nil {
		return fmt.Errorf("copying %s: %w", tf.From, err)
	}
	defer in.Close()
	p := newPipeHash()
	n, err := copyChunks(w, io.LimitReader(in, tf.Size+1), p) // one byte past the size tells a file that grew
	sum := p.sum()
	if err != nil {
		return fmt.Errorf("copying %s: %w", tf.From, err)
	}
	if n != tf.Size || sum != tf.sum {
		if tf.bundle != nil && !tf.bundle.fileChecked && n == tf.Size {
			// Verified by its entries alone (VerifyEntries): this is the
			// first look at its whole-file sha256.
			return &InputError{fmt.Errorf("verifying %s: file sha256 %s is not %s from %s (the file was altered outside its entries, is another build, or changed after it was verified): %w", tf.From, sum, tf.sum, trust.SumsFile, trust.ErrUntrusted)}
		}
		return inputErrorf("%s changed after it was verified; run again once nothing writes it", tf.From)
	}
	return nil
}

func copyChunks(w io.Writer, r io.Reader, p *pipeHash) (int64, error) {
	var n int64
	for {
		c := p.buffer()
		k, err := io.ReadFull(r, c)
		if k > 0 {
			if _, err := w.Write(c[:k]); err != nil {
				return n, err
			}
			n += int64(k)
		}
		p.hash(c[:k])
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}
