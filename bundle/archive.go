package bundle

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"

	"github.com/klauspost/compress/zstd"
)

// ArchiveEntry is one regular file of a host archive: its name relative to
// the directory the archive is unpacked into, after stripping, and its
// permission bits.
type ArchiveEntry struct {
	Name string
	Mode fs.FileMode
	Size int64
}

// ArchiveError says what is wrong with an archive, and with which entry.
type ArchiveError struct {
	Entry string // the name as the archive spells it; empty for the whole archive
	Err   error
}

func (e *ArchiveError) Error() string {
	if e.Entry == "" {
		return e.Err.Error()
	}
	return fmt.Sprintf("entry %q: %v", e.Entry, e.Err)
}

func (e *ArchiveError) Unwrap() error { return e.Err }

// maxArchiveEntries bounds how many entries one archive may hold, so that a
// hostile archive of empty headers cannot make a manifest without end.
const maxArchiveEntries = 100000

// ReadArchive walks a tar archive, plain or compressed with gzip or zstd
// (told apart by their magic numbers, not by a file name), and calls visit
// for each regular file with its contents. Only regular files and
// directories are allowed: absolute names, names with "..", links,
// devices, FIFOs and duplicate names (after cleaning and stripping) are
// refused, naming the entry, because unpacked on a host any of them could
// write outside the directory or replace a file that should be there.
// Directories only give structure: the bundle carries files, and apply
// creates their parents. Modes keep only the permission bits. strip drops
// that many leading path components, as tar --strip-components does; a
// file with no more components than that is refused rather than dropped.
func ReadArchive(r io.Reader, strip int, visit func(ArchiveEntry, io.Reader) error) error {
	br := bufio.NewReaderSize(r, 1<<16)
	magic, _ := br.Peek(4)
	var in io.Reader = br
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		gz, err := gzip.NewReader(br)
		if err != nil {
			return &ArchiveError{Err: fmt.Errorf("reading gzip: %w", err)}
		}
		defer gz.Close()
		in = gz
	case bytes.Equal(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return &ArchiveError{Err: fmt.Errorf("reading zstd: %w", err)}
		}
		defer zr.Close()
		in = zr
	}
	tr := tar.NewReader(in)
	seen := map[string]seenAs{} // by cleaned, stripped name
	for n := 0; ; n++ {
		hdr, err := tr.Next()
		if err == io.EOF {
			if n == 0 {
				return &ArchiveError{Err: errors.New("no entries: not a tar archive, or an empty one")}
			}
			return nil
		}
		if err != nil {
			return &ArchiveError{Err: fmt.Errorf("reading tar: %w", err)}
		}
		if n >= maxArchiveEntries {
			return &ArchiveError{Err: fmt.Errorf("more than %d entries", maxArchiveEntries)}
		}
		fail := func(format string, args ...any) error {
			return &ArchiveError{Entry: hdr.Name, Err: fmt.Errorf(format, args...)}
		}
		isDir := false
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeRegA:
		case tar.TypeDir:
			isDir = true
		case tar.TypeXGlobalHeader:
			continue // git archive's pax comment; it names no file
		case tar.TypeSymlink:
			return fail("is a symlink (to %q): only regular files and directories may be unpacked", hdr.Linkname)
		case tar.TypeLink:
			return fail("is a hard link (to %q): only regular files and directories may be unpacked", hdr.Linkname)
		case tar.TypeChar, tar.TypeBlock:
			return fail("is a device: only regular files and directories may be unpacked")
		case tar.TypeFifo:
			return fail("is a FIFO: only regular files and directories may be unpacked")
		default:
			return fail("has type %q: only regular files and directories may be unpacked", hdr.Typeflag)
		}
		name, err := archiveName(hdr.Name, strip, isDir)
		if err != nil {
			return fail("%v", err)
		}
		if name == "" {
			continue // a directory stripped away, or the archive's root
		}
		switch prev, ok := seen[name]; {
		case ok && prev != impliedDir:
			return fail("names %s a second time", name)
		case ok && !isDir:
			return fail("is a file, but earlier entries lie under %s", name)
		}
		for p := path.Dir(name); p != "."; p = path.Dir(p) {
			if seen[p] == explicitFile {
				return fail("lies under %s, a file of the same archive", p)
			}
			if _, ok := seen[p]; !ok {
				seen[p] = impliedDir
			}
		}
		seen[name] = explicitFile
		if isDir {
			seen[name] = explicitDir
		}
		if isDir {
			continue
		}
		if hdr.Size < 0 {
			return fail("has a negative size")
		}
		if err := visit(ArchiveEntry{Name: name, Mode: fs.FileMode(hdr.Mode).Perm(), Size: hdr.Size}, tr); err != nil {
			var ae *ArchiveError
			if errors.As(err, &ae) {
				return err
			}
			return fail("%w", err)
		}
	}
}

// seenAs is what an archive has said a name is.
type seenAs int

const (
	explicitFile seenAs = iota + 1
	explicitDir
	impliedDir // a parent of an entry, with no entry of its own (yet)
)

// archiveName cleans an entry's name and strips its leading components. It
// refuses absolute names and any ".." component before cleaning (a name
// like a/../../b is refused even though only its second ".." escapes), and
// names a bundle could not carry.
func archiveName(raw string, strip int, isDir bool) (string, error) {
	if raw == "" {
		return "", errors.New("has an empty name")
	}
	if strings.HasPrefix(raw, "/") {
		return "", errors.New("has an absolute name")
	}
	for _, part := range strings.Split(strings.TrimSuffix(raw, "/"), "/") {
		if part == ".." {
			return "", errors.New("has a \"..\" component")
		}
	}
	for i := 0; i < len(raw); i++ {
		if raw[i] < 0x20 || raw[i] >= 0x7f || raw[i] == '\\' {
			return "", errors.New("has characters outside printable ASCII")
		}
	}
	clean := path.Clean(raw)
	if clean == "." {
		return "", nil
	}
	parts := strings.Split(clean, "/")
	if len(parts) <= strip {
		if isDir {
			return "", nil
		}
		return "", fmt.Errorf("has %d path components, not more than strip = %d", len(parts), strip)
	}
	return strings.Join(parts[strip:], "/"), nil
}
