package media

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"syscall"
	"time"

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
	// or Verify of the Source from Scan). It runs while go-diskfs lays the image out, which reads
	// none of their bytes, instead of before: on two cores that hides most
	// of a full read and two sha256 passes. Its error aborts the write
	// before any of those bytes are copied.
	Verify func() error
}

// WriteISO writes t as an ISO 9660 image at path, with Rock Ridge (modes,
// long names) and Joliet (long names for Windows), atomically: a failure
// leaves nothing at path. The image is 0600, as the bundles it carries.
//
// go-diskfs builds the image from a workspace directory and copies every
// file's data into it 2 KiB at a time. The bundles and the runner are
// large, so the workspace holds only sparse stand-ins of their sizes:
// go-diskfs lays out the image from them, its writes of their zeros are
// left as holes (see imageWriter), and fillExtents then copies each source
// into the extent go-diskfs gave it, in large pieces, hashing it in the
// same pass. So every bundle byte is read once and written once, and the
// bytes on the medium are the ones verified.
// go-diskfs records the wall clock and the workspace's owners, ctimes and
// link counts; normaliseISO then rewrites those fields so that the same
// tree and epoch give the same bytes.
func WriteISO(path string, t Tree, o ISOOptions) error {
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
	if err := fillWorkspace(ws, t); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	err = atomicfile.WriteFrom(path, 0o600, func(w io.Writer) error {
		f, ok := w.(*os.File)
		if !ok {
			return errors.New("the image needs a file it can write at offsets")
		}
		iw := newImageWriter(f, 4*mib)
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
		// Bad input first: it says what the operator must fix.
		if verr := wait(); verr != nil {
			return verr
		}
		if err != nil {
			return fmt.Errorf("writing the ISO 9660 filesystem: %w", err)
		}
		if err := fillExtents(f, iw.size, t); err != nil {
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
// as sparse files of their size and mode, which cost no disk space.
func fillWorkspace(ws string, t Tree) error {
	for _, f := range t {
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
		} else {
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

// fillExtents copies every From file of t into the image f of size bytes,
// at the extent go-diskfs recorded for it, as go-diskfs reads it back.
func fillExtents(f *os.File, size int64, t Tree) error {
	fsys, err := iso9660.Read(file.New(f, true), size, 0, isoSector)
	if err != nil {
		return fmt.Errorf("reading back the ISO 9660 filesystem: %w", err)
	}
	for _, tf := range t {
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
		if err := copyInto(io.NewOffsetWriter(f, int64(ie.Location())*isoSector), tf); err != nil {
			return err
		}
	}
	return nil
}

// imageWriter gathers go-diskfs's consecutive WriteAt calls into large
// writes (go-diskfs v1.9.4 writes file data 2 KiB at a time, one pwrite
// each), and leaves as holes the zeros it writes where nothing was written
// yet: mostly the stand-ins' data, which fillExtents then overwrites. Holes
// read as zeros, so the image's bytes are what go-diskfs wrote. Reads and
// seeks flush first, so go-diskfs always sees what it wrote. The first
// error sticks, since go-diskfs ignores some WriteAt results.
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
}

type extent struct{ start, end int64 }

func newImageWriter(f *os.File, bufSize int) *imageWriter {
	return &imageWriter{File: f, buf: make([]byte, 0, bufSize), zero: make([]byte, bufSize)}
}

func (w *imageWriter) WriteAt(p []byte, off int64) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	if len(w.buf) > 0 && (off != w.off+int64(len(w.buf)) || len(w.buf)+len(p) > cap(w.buf)) {
		if err := w.flush(); err != nil {
			return 0, err
		}
	}
	if len(p) >= cap(w.buf) {
		w.write(p, off)
		return len(p), w.err
	}
	if len(w.buf) == 0 {
		w.off = off
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
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
