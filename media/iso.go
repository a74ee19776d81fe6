package media

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
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
}

// WriteISO writes t as an ISO 9660 image at path, with Rock Ridge (modes,
// long names) and Joliet (long names for Windows), atomically: a failure
// leaves nothing at path. The image is 0600, as the bundles it carries.
//
// go-diskfs builds the image from a workspace directory. The bundles and
// the runner are hard-linked into it where the filesystem allows (they are
// large, and go-diskfs copies each once more into the image), else copied.
// go-diskfs records the wall clock and the workspace's owners, ctimes and
// link counts; normaliseISO then rewrites those fields so that the same
// tree and epoch give the same bytes.
func WriteISO(path string, t Tree, o ISOOptions) error {
	if err := CheckISOLabel(o.Label); err != nil {
		return &InputError{err}
	}
	dir := filepath.Dir(path)
	ws, err := os.MkdirTemp(dir, ".airadm-iso-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.RemoveAll(ws)
	if err := fillWorkspace(ws, t); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return atomicfile.WriteFrom(path, 0o600, func(w io.Writer) error {
		f, ok := w.(*os.File)
		if !ok {
			return errors.New("the image needs a file it can write at offsets")
		}
		bw := &bufferedWriterAt{File: f, buf: make([]byte, 0, 4*mib)}
		fsys, err := iso9660.Create(file.New(bw, false), 0, 0, 2048, ws)
		if err != nil {
			return fmt.Errorf("creating the ISO 9660 filesystem: %w", err)
		}
		if err := fsys.Finalize(iso9660.FinalizeOptions{
			RockRidge: true, Joliet: true, VolumeIdentifier: o.Label, PublisherIdentifier: "airadm",
		}); err != nil {
			return fmt.Errorf("writing the ISO 9660 filesystem: %w", err)
		}
		if err := bw.flush(); err != nil {
			return fmt.Errorf("writing the ISO 9660 filesystem: %w", err)
		}
		if err := unchanged(t); err != nil {
			return err
		}
		return normaliseISO(f, o.Epoch)
	})
}

// fillWorkspace lays t out under ws.
func fillWorkspace(ws string, t Tree) error {
	for _, f := range t {
		p := filepath.Join(ws, filepath.FromSlash(f.Path))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.Chmod(filepath.Dir(p), 0o755); err != nil { // past the umask
			return err
		}
		if f.From == "" {
			if err := os.WriteFile(p, f.Data, f.Mode); err != nil {
				return err
			}
			if err := os.Chmod(p, f.Mode); err != nil { // past the umask
				return err
			}
			continue
		}
		linked, err := link(f, p)
		if err != nil {
			return err
		}
		if linked {
			continue
		}
		if err := copyFile(f.From, p, f.Mode); err != nil {
			return err
		}
	}
	return nil
}

// link hard-links f.From to p when they share a filesystem and f.From has
// the mode wanted, since the image records the inode's mode.
func link(f File, p string) (bool, error) {
	fi, err := os.Stat(f.From)
	if err != nil {
		return false, err
	}
	if fi.Mode().Perm() != f.Mode {
		return false, nil
	}
	err = os.Link(f.From, p)
	if errors.Is(err, syscall.EXDEV) || errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EMLINK) {
		return false, nil
	}
	return err == nil, err
}

func copyFile(from, to string, mode os.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Chmod(mode); err != nil { // past the umask
		out.Close()
		return err
	}
	return out.Close()
}

// unchanged checks that no bundle changed since it was verified.
func unchanged(t Tree) error {
	for _, f := range t {
		if f.bundle != nil {
			if err := f.bundle.unchanged(); err != nil {
				return err
			}
		}
	}
	return nil
}

// bufferedWriterAt gathers consecutive WriteAt calls into large writes.
// go-diskfs v1.9.4 copies file data into the image 2 KiB at a time, one
// pwrite each, which on these machines costs more than the copy itself.
// Reads and seeks flush first, so go-diskfs always sees what it wrote. The
// first error sticks, since go-diskfs ignores some WriteAt results.
type bufferedWriterAt struct {
	*os.File
	buf []byte
	off int64 // the image offset of buf[0]
	err error
}

func (w *bufferedWriterAt) WriteAt(p []byte, off int64) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	if len(w.buf) > 0 && (off != w.off+int64(len(w.buf)) || len(w.buf)+len(p) > cap(w.buf)) {
		if err := w.flush(); err != nil {
			return 0, err
		}
	}
	if len(p) >= cap(w.buf) {
		n, err := w.File.WriteAt(p, off)
		w.err = err
		return n, err
	}
	if len(w.buf) == 0 {
		w.off = off
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

func (w *bufferedWriterAt) flush() error {
	if w.err == nil && len(w.buf) > 0 {
		_, w.err = w.File.WriteAt(w.buf, w.off)
		w.buf = w.buf[:0]
	}
	return w.err
}

func (w *bufferedWriterAt) ReadAt(p []byte, off int64) (int, error) {
	if err := w.flush(); err != nil {
		return 0, err
	}
	return w.File.ReadAt(p, off)
}

func (w *bufferedWriterAt) Read(p []byte) (int, error) {
	if err := w.flush(); err != nil {
		return 0, err
	}
	return w.File.Read(p)
}

func (w *bufferedWriterAt) Seek(off int64, whence int) (int64, error) {
	if err := w.flush(); err != nil {
		return 0, err
	}
	return w.File.Seek(off, whence)
}
