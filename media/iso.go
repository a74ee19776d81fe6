package media

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/diskfs/go-diskfs/backend/file"
	"github.com/diskfs/go-diskfs/filesystem/iso9660"

	"airadm.dev/airadm/atomicfile"
)

// labelRE is what an ISO volume identifier may hold (d-characters, at most
// 32); FAT labels are further limited to 11 (see WriteFAT).
var labelRE = regexp.MustCompile(`^[A-Z0-9_]{1,32}$`)

// CheckISOLabel says whether label can name an ISO 9660 volume.
func CheckISOLabel(label string) error {
	if !labelRE.MatchString(label) {
		return fmt.Errorf("label %q: want 1 to 32 of A-Z, 0-9 and _ (ISO 9660 d-characters)", label)
	}
	return nil
}

// ISOOptions shape an ISO image.
type ISOOptions struct {
	Label string
	// Epoch is every timestamp the image records.
	Epoch time.Time
	// Verify, when set, verifies the files the tree copies (VerifyEntries
	// or Verify of the Source from Scan). It runs while go-diskfs lays the
	// image out, which reads none of their bytes, instead of before: on two
	// cores that hides most of a full read and a sha256 pass. The copy into
	// the image runs meanwhile too, into a temporary file; an error of
	// Verify, or a file of the tree it leaves unverified, discards that
	// file, so no byte it did not pass reaches the image's path.
	Verify func() error
}

// WriteISO writes t as an ISO 9660 image at path, with Rock Ridge (modes,
// long names) and Joliet (long names for Windows), atomically: a failure
// leaves nothing at path. The image is 0600, as the bundles it carries.
//
// go-diskfs builds the image from a workspace directory and copies every
// file's data into it 2 KiB at a time. The bundles and the runner are
// large, so the workspace holds only sparse stand-ins of their sizes, each
// beginning with a marker of its own: go-diskfs lays out the image from
// them, and when it starts writing a stand-in's data (the marker, at the
// start of its extent; see imageWriter) a copier copies the real file into
// that extent, in large pieces, hashing it in the same pass, while
// go-diskfs goes on (its writes of the stand-in are dropped). So every
// bundle byte is read once and written once, the bytes on the medium are
// the ones verified, and the copy costs little wall time beyond
// go-diskfs's own. The image is read back afterwards to check that every
// extent copied into is the one go-diskfs recorded; a file whose marker
// never came is copied then (fillExtents).
// go-diskfs records the wall clock and the workspace's owners, ctimes and
// link counts; normaliseISO then rewrites those fields so that the same
// tree and epoch give the same bytes.
func WriteISO(path string, t Tree, o ISOOptions) error { return writeISO(path, t, o, true) }

// writeISO is WriteISO; without standIns, no stand-in has a marker, so
// that every file is copied after Finalize, as with a go-diskfs that
// wrote file data otherwise (for tests).
func writeISO(path string, t Tree, o ISOOptions, standIns bool) error {
	if err := CheckISOLabel(o.Label); err != nil {
		return &InputError{err}
	}
	verified := make(chan error, 1)
	if o.Verify == nil {
		verified <- nil
	} else {
		go func() { verified <- o.Verify() }()
	}
	waited := false
	wait := func() error {
		waited = true
		return <-verified
	}
	// Every return waits, so that no read of the sources outlives the call.
	defer func() {
		if !waited {
			<-verified
		}
	}()
	ws, err := os.MkdirTemp(workspaceParent(filepath.Dir(path)), ".airadm-iso-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.RemoveAll(ws)
	markers := make([][]byte, len(t))
	if standIns {
		markers = standInMarkers(t)
	}
	if err := fillWorkspace(ws, t, markers); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	// The copy runs before verification is over, and may copy bytes that
	// then fail it (or a Tree nothing verifies): that is safe only because
	// the image is atomicfile's temporary file, renamed to path only once
	// verification has passed and every copy's sha256 matched; any error
	// here removes it, so nothing unverified ever reaches path.
	err = atomicfile.WriteFrom(path, 0o600, func(w io.Writer) error {
		f, ok := w.(*os.File)
		if !ok {
			return errors.New("the image needs a file it can write at offsets")
		}
		cp := startCopier(f, t)
		copierWaited := false
		defer func() {
			if !copierWaited {
				cp.stop()
			}
		}()
		iw := newImageWriter(f, 4*mib)
		iw.expect(t, markers, cp.copy)
		fsys, err := iso9660.Create(file.New(iw, false), 0, 0, isoSector, ws)
		if err != nil {
			return fmt.Errorf("creating the ISO 9660 filesystem: %w", err)
		}
		err = fsys.Finalize(iso9660.FinalizeOptions{
			RockRidge: true, Joliet: true, VolumeIdentifier: o.Label, PublisherIdentifier: "airadm",
		})
		if err == nil {
			err = iw.flush()
		}
		verr := wait()
		copierWaited = true
		if verr != nil || err != nil {
			cp.stop()
		} else {
			cp.wait()
		}
		// Bad input first: it says what the operator must fix.
		if verr != nil {
			return verr
		}
		if err != nil {
			return fmt.Errorf("writing the ISO 9660 filesystem: %w", err)
		}
		if err := fillExtents(f, iw.size, t, cp.results); err != nil {
			return err
		}
		return normaliseISO(f, o.Epoch)
	})
	// Bad input (a bundle that fails verification, or changed since) is
	// said as Open says it, not as a failure to write path.
	var ie *InputError
	if errors.As(err, &ie) {
		return ie
	}
	return err
}

// markerLen is the length of a stand-in's marker.
const markerLen = sha256.Size

// standInMarkers gives each From file of t at least markerLen long (by its
// index in t; nil for the others) the marker its stand-in begins with: the
// sha256 of all t holds (paths, modes, sizes, sums, the small files' data)
// and the file's index. It is the same for the same tree, so the
// workspace and go-diskfs's layout are too (and the marker never reaches
// the image); and no file of t holds another's marker, since a small file
// that did would hold a sha256 of its own content.
func standInMarkers(t Tree) [][]byte {
	h := sha256.New()
	for _, f := range t {
		fmt.Fprintf(h, "%q %o %d %s %s\n", f.Path, f.Mode, f.Size, f.From, f.sum)
		d := sha256.Sum256(f.Data)
		h.Write(d[:])
	}
	tree := h.Sum(nil)
	m := make([][]byte, len(t))
	for i, f := range t {
		if f.From == "" || f.Size < markerLen {
			continue
		}
		s := sha256.Sum256(fmt.Appendf(slices.Clip(tree), " stand-in %d", i))
		m[i] = s[:]
	}
	return m
}

// workspaceParent is where the workspace goes: a tmpfs when there is one
// (/dev/shm), since go-diskfs reads each stand-in 2 KiB at a time and
// tmpfs answers reads of a hole from the zero page, where a disk
// filesystem fills page cache with zeros; else dir, beside the image. The
// workspace holds only the small files, so either has room.
func workspaceParent(dir string) string {
	const (
		shm        = "/dev/shm"
		tmpfsMagic = 0x01021994 // statfs(2)
		wx         = 0o3        // access(2): W_OK|X_OK
	)
	var st syscall.Statfs_t
	if syscall.Statfs(shm, &st) == nil && st.Type == tmpfsMagic && syscall.Access(shm, wx) == nil {
		return shm
	}
	return dir
}

// fillWorkspace lays t out under ws: small files whole, the others (From)
// as sparse files of their size and mode, which cost no disk space, each
// beginning with its marker, if any.
func fillWorkspace(ws string, t Tree, markers [][]byte) error {
	for i, f := range t {
		p := filepath.Join(ws, filepath.FromSlash(f.Path))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.Chmod(filepath.Dir(p), 0o755); err != nil { // past the umask
			return err
		}
		out, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, f.Mode)
		if err != nil {
			return err
		}
		if f.From == "" {
			_, err = out.Write(f.Data)
		} else if _, err = out.Write(markers[i]); err == nil {
			err = out.Truncate(f.Size)
		}
		if err == nil {
			err = out.Chmod(f.Mode) // past the umask
		}
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// fillExtents checks, as go-diskfs reads the image f of size bytes back,
// that the copier copied every From file of t into the extent go-diskfs
// recorded for it, with the bytes verified (copied holds, by index in t,
// what it did), and copies any file it did not.
func fillExtents(f *os.File, size int64, t Tree, copied []copyResult) error {
	fsys, err := iso9660.Read(file.New(f, true), size, 0, isoSector)
	if err != nil {
		return fmt.Errorf("reading back the ISO 9660 filesystem: %w", err)
	}
	for i, tf := range t {
		if tf.From == "" {
			continue
		}
		e, err := fsys.OpenFile("/"+tf.Path, os.O_RDONLY)
		if err != nil {
			return fmt.Errorf("finding %s in the ISO 9660 filesystem: %w", tf.Path, err)
		}
		ie, ok := e.(*iso9660.File)
		if !ok {
			return fmt.Errorf("finding %s in the ISO 9660 filesystem: go-diskfs returned a %T", tf.Path, e)
		}
		off := int64(ie.Location()) * isoSector
		c := copied[i]
		if !c.started {
			// No marker seen (a stand-in too small for one, or a go-diskfs
			// that writes file data otherwise): copy it now.
			if err := copyInto(io.NewOffsetWriter(f, off), tf); err != nil {
				return err
			}
			continue
		}
		if err := checkVerified(tf); err != nil {
			return err
		}
		if c.off != off {
			return fmt.Errorf("copying %s: copied at byte %d of the image, where go-diskfs records it at byte %d", tf.From, c.off, off)
		}
		if err := checkCopied(tf, c.copied); err != nil {
			return err
		}
	}
	return nil
}

// copier copies From files into the image's extents as imageWriter finds
// them, one after another on a goroutine of its own, while go-diskfs goes
// on laying out the image: pwrite at offsets go-diskfs no longer writes
// (imageWriter drops its writes there) is safe beside its writes
// elsewhere. One file at a time keeps the reads sequential and leaves the
// other core to go-diskfs, verification and the copy's sha256.
type copier struct {
	f    *os.File
	t    Tree
	todo chan copyJob
	halt atomic.Bool
	done chan struct{}
	// direct is the image opened O_DIRECT, when its filesystem allows:
	// the copy's aligned pieces go to the disk while go-diskfs works,
	// instead of filling the page cache for the final fsync to write.
	direct *os.File
	// results holds, by index in t, where each file was copied and what
	// the copy found; it is the copier's until done is closed.
	results []copyResult
}

type copyJob struct {
	index int
	off   int64
}

type copyResult struct {
	started bool
	off     int64
	copied
}

var errHalted = errors.New("the write was abandoned")

func startCopier(f *os.File, t Tree) *copier {
	c := &copier{f: f, t: t, todo: make(chan copyJob, len(t)), done: make(chan struct{}), results: make([]copyResult, len(t))}
	if d, err := os.OpenFile(f.Name(), os.O_WRONLY|syscall.O_DIRECT, 0); err == nil {
		c.direct = d
	}
	go func() {
		defer close(c.done)
		if c.direct != nil {
			defer c.direct.Close()
		}
		for j := range c.todo {
			r := &c.results[j.index]
			r.started, r.off = true, j.off
			if c.halt.Load() {
				r.err = errHalted
				continue
			}
			var w io.Writer = io.NewOffsetWriter(c.f, j.off)
			first := chunkSize
			if c.direct != nil {
				w = &directWriter{c.f, c.direct, j.off}
				if r := int(j.off % directAlign); r != 0 {
					// The extent starts off a block: a first piece up to
					// the next block, so that every piece after starts
					// aligned in the image as in its buffer.
					first = directAlign - r
				}
			}
			r.copied = copyHashed(haltWriter{w, &c.halt}, c.t[j.index], first)
		}
	}()
	return c
}

// copy queues t[i] to be copied at byte off of the image; it never blocks
// (each file is queued at most once).
func (c *copier) copy(i int, off int64) { c.todo <- copyJob{i, off} }

// wait waits for every queued copy.
func (c *copier) wait() {
	close(c.todo)
	<-c.done
}

// stop abandons the copies, for a write that failed, and waits for the
// copier to let go of the image and the sources.
func (c *copier) stop() {
	c.halt.Store(true)
	c.wait()
}

// directAlign is the alignment of O_DIRECT writes: the disks' 4 KiB
// physical block (a 512-byte logical block would be allowed, but writes
// that are not whole physical blocks are many times slower).
const directAlign = 4096

// directWriter writes at off onward, through direct the pieces that are
// aligned in the image and in memory, the rest through f. A filesystem
// that refuses a direct write (EINVAL: it wants another alignment) gets
// that piece and the rest through f.
type directWriter struct {
	f, direct *os.File
	off       int64
}

func (w *directWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		dst, k := w.f, len(p)
		if r := w.off % directAlign; r != 0 {
			k = min(k, int(directAlign-r))
		} else if w.direct != nil && k >= directAlign && uintptr(unsafe.Pointer(&p[0]))%directAlign == 0 {
			dst, k = w.direct, k-k%directAlign
		}
		_, err := dst.WriteAt(p[:k], w.off)
		if err != nil && dst == w.direct && errors.Is(err, syscall.EINVAL) {
			w.direct = nil
			_, err = w.f.WriteAt(p[:k], w.off)
		}
		if err != nil {
			return n - len(p), err
		}
		p, w.off = p[k:], w.off+int64(k)
	}
	return n, nil
}

// haltWriter fails once halt is set, so that an abandoned write does not
// go on copying a large file.
type haltWriter struct {
	w    io.Writer
	halt *atomic.Bool
}

func (h haltWriter) Write(p []byte) (int, error) {
	if h.halt.Load() {
		return 0, errHalted
	}
	return h.w.Write(p)
}

// imageWriter gathers go-diskfs's consecutive WriteAt calls into large
// writes (go-diskfs v1.9.4 writes file data 2 KiB at a time, one pwrite
// each), and leaves as holes the zeros it writes where nothing was written
// yet. Holes read as zeros, so the image's bytes are what go-diskfs wrote,
// except in the From files' extents: a write that begins with a stand-in's
// marker (see expect) is where go-diskfs starts writing that file's data,
// sequentially from its extent's first byte, so the file's extent is found
// there; the copier is told, and go-diskfs's writes inside the extent
// (only the stand-in's marker and zeros) are dropped. Reads and seeks
// flush first, so go-diskfs always sees what it wrote. The first error
// sticks, since go-diskfs ignores some WriteAt results.
type imageWriter struct {
	*os.File
	buf  []byte
	off  int64 // the image offset of buf[0]
	zero []byte
	// written holds the ranges written, in order, adjacent ones merged
	// (a few: directories, path tables, small files); go-diskfs writes
	// Joliet's directories past the file data before the data itself.
	written []extent
	size    int64 // the image's size: the end of the last write, hole or not
	err     error
	// markers maps each marker not seen yet to its stand-in; found is
	// told of each extent found, and claimed holds them, in order.
	markers map[string]standIn
	found   func(i int, off int64)
	claimed []extent
}

type extent struct{ start, end int64 }

// standIn is a From file of the tree, by its index, and its size.
type standIn struct {
	index int
	size  int64
}

func newImageWriter(f *os.File, bufSize int) *imageWriter {
	return &imageWriter{File: f, buf: make([]byte, 0, bufSize), zero: make([]byte, bufSize)}
}

// expect makes w look for the markers of t's stand-ins (by index in t,
// nil for none) and call found with each file and its extent's offset.
func (w *imageWriter) expect(t Tree, markers [][]byte, found func(i int, off int64)) {
	w.markers, w.found = map[string]standIn{}, found
	for i, m := range markers {
		if m != nil {
			w.markers[string(m)] = standIn{i, t[i].Size}
		}
	}
}

func (w *imageWriter) WriteAt(p []byte, off int64) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	n := len(p)
	if len(w.markers) > 0 && len(p) >= markerLen {
		if s, ok := w.markers[string(p[:markerLen])]; ok {
			delete(w.markers, string(p[:markerLen]))
			w.claim(extent{off, off + s.size}, s.index)
		}
	}
	// Keep only what lies outside the claimed extents: nearly always all
	// of p or none of it.
	for _, c := range w.claimed {
		end := off + int64(len(p))
		if len(p) == 0 || c.start >= end {
			break
		}
		if c.end <= off {
			continue
		}
		if c.start > off {
			w.put(p[:c.start-off], off)
		}
		if c.end >= end {
			p = nil
			break
		}
		p, off = p[c.end-off:], c.end
	}
	if len(p) > 0 {
		w.put(p, off)
	}
	return n, w.err
}

// claim drops go-diskfs's writes in e from now on and has the copier copy
// file i there. What w holds is written first, so that nothing written
// before can land over the copier's bytes later; and the image is
// extended over e, if it is not already, so that the copier's writes
// never lie past the size w knows (which write's Truncate would cut them
// off at).
func (w *imageWriter) claim(e extent, i int) {
	if w.flush() != nil {
		return
	}
	if e.end > w.size {
		w.size = e.end
		if w.err = w.File.Truncate(e.end); w.err != nil {
			return
		}
	}
	w.claimed = append(w.claimed, e)
	slices.SortFunc(w.claimed, func(a, b extent) int { return cmp.Compare(a.start, b.start) })
	w.found(i, e.start)
}

// put is WriteAt's coalescing, for p that lies outside every claimed
// extent.
func (w *imageWriter) put(p []byte, off int64) {
	if w.err != nil {
		return
	}
	if len(w.buf) > 0 && (off != w.off+int64(len(w.buf)) || len(w.buf)+len(p) > cap(w.buf)) {
		if w.flush() != nil {
			return
		}
	}
	if len(p) >= cap(w.buf) {
		w.write(p, off)
		return
	}
	if len(w.buf) == 0 {
		w.off = off
	}
	w.buf = append(w.buf, p...)
}

// write writes p at off, or, when p is zeros where nothing was written,
// only extends the file over it (sparse).
func (w *imageWriter) write(p []byte, off int64) {
	e := extent{off, off + int64(len(p))}
	if !w.overlaps(e) && w.isZero(p) {
		if e.end > w.size {
			w.size = e.end
			w.err = w.File.Truncate(e.end)
		}
		return
	}
	_, w.err = w.File.WriteAt(p, off)
	w.size = max(w.size, e.end)
	w.record(e)
}

func (w *imageWriter) isZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(w.zero))
		if !bytes.Equal(p[:n], w.zero[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

func (w *imageWriter) overlaps(e extent) bool {
	for _, x := range w.written {
		if x.start < e.end && e.start < x.end {
			return true
		}
	}
	return false
}

// record adds e to written, merging it with the ranges it touches.
func (w *imageWriter) record(e extent) {
	var out []extent
	for _, x := range w.written {
		if x.end < e.start || e.end < x.start {
			out = append(out, x)
			continue
		}
		e = extent{min(e.start, x.start), max(e.end, x.end)}
	}
	out = append(out, e)
	slices.SortFunc(out, func(a, b extent) int { return cmp.Compare(a.start, b.start) })
	w.written = out
}

func (w *imageWriter) flush() error {
	if w.err == nil && len(w.buf) > 0 {
		w.write(w.buf, w.off)
		w.buf = w.buf[:0]
	}
	return w.err
}

func (w *imageWriter) ReadAt(p []byte, off int64) (int, error) {
	if err := w.flush(); err != nil {
		return 0, err
	}
	return w.File.ReadAt(p, off)
}

func (w *imageWriter) Read(p []byte) (int, error) {
	if err := w.flush(); err != nil {
		return 0, err
	}
	return w.File.Read(p)
}

func (w *imageWriter) Seek(off int64, whence int) (int64, error) {
	if err := w.flush(); err != nil {
		return 0, err
	}
	return w.File.Seek(off, whence)
}
