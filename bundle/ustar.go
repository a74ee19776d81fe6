package bundle

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// The bundle's tar is the strict subset of ustar that Write produces
// (docs/bundle-format.md, "Container"). archive/tar cannot check it: its
// reader merges pax and GNU headers into the next entry, turns typeflag NUL
// into '0', accepts base-256 numbers, and skips padding without looking.
// So the reader parses headers itself and checks every byte of them.

const blockSize = 512

// ustar header fields: offset and length.
type field struct{ off, len int }

var (
	fName     = field{0, 100}
	fMode     = field{100, 8}
	fUID      = field{108, 8}
	fGID      = field{116, 8}
	fSize     = field{124, 12}
	fMtime    = field{136, 12}
	fChksum   = field{148, 8}
	fTypeflag = field{156, 1}
	fLinkname = field{157, 100}
	fMagic    = field{257, 6}
	fVersion  = field{263, 2}
	fUname    = field{265, 32}
	fGname    = field{297, 32}
	fDevmajor = field{329, 8}
	fDevminor = field{337, 8}
	fPrefix   = field{345, 155}
	fPad      = field{500, 12}
)

func (f field) of(blk []byte) []byte { return blk[f.off : f.off+f.len] }

type ustarHeader struct {
	name string
	mode int64
	size int64
}

// checkMode compares the header's mode with what writers write: the
// manifest's mode for files, 0644 for the rest. Readers never use it.
func (h ustarHeader) checkMode(want int64) error {
	if h.mode != want {
		return &EntryError{Entry: h.name, Err: fmt.Errorf("header mode is %04o; writers write %04o", h.mode, want)}
	}
	return nil
}

type ustarReader struct {
	r   *bufio.Reader
	blk [blockSize]byte
	// seeker is the file under r, when it can seek: skip then moves past
	// data instead of reading it.
	seeker io.ReadSeeker
}

// skip passes over n bytes of entry name's data without looking at them.
func (t *ustarReader) skip(name string, n int64) error {
	if buffered := int64(t.r.Buffered()); t.seeker != nil && n > buffered {
		t.r.Discard(int(buffered))
		pos, err := t.seeker.Seek(n-buffered, io.SeekCurrent)
		if err != nil {
			return &EntryError{Entry: name, Err: fmt.Errorf("seeking past the entry: %w", err)}
		}
		end, err := t.seeker.Seek(0, io.SeekEnd)
		if err == nil && end < pos {
			return &EntryError{Entry: name, Err: ErrTruncated}
		}
		if _, err := t.seeker.Seek(pos, io.SeekStart); err != nil {
			return &EntryError{Entry: name, Err: fmt.Errorf("seeking past the entry: %w", err)}
		}
		t.r.Reset(t.seeker)
		return nil
	}
	if _, err := t.r.Discard(int(n)); err != nil {
		return &EntryError{Entry: name, Err: truncated(err)}
	}
	return nil
}

// next reads the next header, after the entry named after. At the
// end-of-archive marker it makes sure nothing follows and returns io.EOF.
func (t *ustarReader) next(after string) (ustarHeader, error) {
	blk := t.blk[:]
	n, err := io.ReadFull(t.r, blk)
	if err == io.EOF {
		return ustarHeader{}, &EntryError{Err: fmt.Errorf("the end-of-archive marker is missing: %w", ErrTruncated)}
	}
	if err != nil {
		return ustarHeader{}, &EntryError{Entry: after, Err: fmt.Errorf("reading the header after this entry (%d of 512 bytes): %w", n, truncated(err))}
	}
	if allZero(blk) {
		if _, err := io.ReadFull(t.r, blk); err != nil {
			return ustarHeader{}, &EntryError{Err: fmt.Errorf("reading the end-of-archive marker: %w", truncated(err))}
		}
		if !allZero(blk) {
			return ustarHeader{}, &EntryError{Err: errors.New("the end-of-archive marker is not two zero blocks")}
		}
		// Read to EOF, so that a caller hashing the stream sees every
		// byte; there must be none.
		if _, err := t.r.ReadByte(); err != io.EOF {
			if err != nil {
				return ustarHeader{}, &EntryError{Err: fmt.Errorf("reading after the end of the archive: %w", err)}
			}
			return ustarHeader{}, &EntryError{Err: errors.New("data after the end of the archive")}
		}
		return ustarHeader{}, io.EOF
	}
	h, err := parseHeader(blk)
	if err != nil {
		name := h.name
		if name == "" {
			name = "after " + after
		}
		return h, &EntryError{Entry: name, Err: err}
	}
	return h, nil
}

// padding reads and checks the zeros that fill the entry's last block.
func (t *ustarReader) padding(h ustarHeader) error {
	n := (blockSize - h.size%blockSize) % blockSize
	pad := t.blk[:n]
	if _, err := io.ReadFull(t.r, pad); err != nil {
		return &EntryError{Entry: h.name, Err: fmt.Errorf("reading the padding: %w", truncated(err))}
	}
	if !allZero(pad) {
		return &EntryError{Entry: h.name, Err: errors.New("the padding after the entry is not zero")}
	}
	return nil
}

// parseHeader checks a header block against the one header shape the spec
// allows, and returns its name, mode and size. Errors say which field is
// wrong; h.name is set as soon as it is known, to name the entry.
func parseHeader(blk []byte) (h ustarHeader, err error) {
	name, ok := cString(fName.of(blk))
	prefix, okPrefix := cString(fPrefix.of(blk))
	h.name = name
	if prefix != "" {
		h.name = prefix + "/" + name
	}
	switch magic := string(blk[fMagic.off : fVersion.off+fVersion.len]); magic {
	case "ustar\x0000":
	case "ustar  \x00":
		return h, errors.New("is a GNU tar header; a bundle holds ustar headers only")
	default:
		return h, fmt.Errorf("is not a ustar header (magic and version %q, want \"ustar\\x0000\")", magic)
	}
	if err := checkChecksum(blk); err != nil {
		return h, err
	}
	switch tf := blk[fTypeflag.off]; tf {
	case '0':
	case 'x':
		return h, errors.New("is a pax extended header; a bundle holds ustar headers only")
	case 'g':
		return h, errors.New("is a pax global header; a bundle holds ustar headers only")
	case 'L', 'K':
		return h, errors.New("is a GNU long-name header; a bundle holds ustar headers only")
	case 0:
		return h, errors.New("has typeflag NUL; a regular file's typeflag must be '0'")
	default:
		kinds := map[byte]string{
			'2': "a symbolic link", '1': "a hard link", '3': "a character device",
			'4': "a block device", '6': "a FIFO", '5': "a directory",
		}
		kind, ok := kinds[tf]
		if !ok {
			kind = fmt.Sprintf("of tar type %q", tf)
		}
		return h, fmt.Errorf("is %s; a bundle holds regular files only", kind)
	}
	if !ok || !okPrefix || name == "" {
		return h, errors.New("header name has bytes after its terminating NUL, or is empty")
	}
	if wantPrefix, wantName := splitName(h.name); prefix != wantPrefix || name != wantName {
		return h, fmt.Errorf("header splits the name as prefix %q and name %q; writers write %q and %q", prefix, name, wantPrefix, wantName)
	}
	if h.mode, err = octal("mode", fMode.of(blk)); err != nil {
		return h, err
	}
	if h.size, err = octal("size", fSize.of(blk)); err != nil {
		return h, err
	}
	for _, z := range []struct {
		what string
		f    field
	}{{"uid", fUID}, {"gid", fGID}, {"mtime", fMtime}, {"devmajor", fDevmajor}, {"devminor", fDevminor}} {
		v, err := octal(z.what, z.f.of(blk))
		if err != nil {
			return h, err
		}
		if v != 0 {
			if z.what == "mtime" {
				return h, fmt.Errorf("header mtime is %d (%s); writers write 0", v, time.Unix(v, 0).UTC().Format(time.RFC3339))
			}
			return h, fmt.Errorf("header %s is %d; writers write 0", z.what, v)
		}
	}
	for _, z := range []struct {
		what string
		f    field
	}{{"linkname", fLinkname}, {"user name", fUname}, {"group name", fGname}, {"padding (bytes 500 to 511)", fPad}} {
		if b := z.f.of(blk); !allZero(b) {
			return h, fmt.Errorf("header %s is %q; writers leave it empty", z.what, bytes.TrimRight(b, "\x00"))
		}
	}
	return h, nil
}

// splitName is how writers (archive/tar's ustar writer) divide a name
// between the prefix and name fields: names of up to 100 bytes go whole in
// name; longer ones are split at the last '/' that leaves at most 155 bytes
// of prefix. Requiring this one split keeps one encoding per bundle.
func splitName(full string) (prefix, name string) {
	if len(full) <= fName.len {
		return "", full
	}
	i := strings.LastIndexByte(full[:min(len(full), fPrefix.len+1)], '/')
	if i <= 0 {
		return "", full // not representable; the caller's comparison fails
	}
	return full[:i], full[i+1:]
}

// cString is a NUL-terminated (or full-length) header string; ok is false
// when anything but NULs follows the terminator.
func cString(b []byte) (s string, ok bool) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return string(b), true
	}
	return string(b[:i]), allZero(b[i:])
}

// octal parses a numeric field in the one form writers use: the field's
// length less one of zero-padded octal digits, then a NUL.
func octal(what string, b []byte) (int64, error) {
	digits := b[:len(b)-1]
	if b[len(b)-1] != 0 || bytes.IndexFunc(digits, func(r rune) bool { return r < '0' || r > '7' }) >= 0 {
		return 0, fmt.Errorf("header %s %q is not %d octal digits and a NUL", what, b, len(digits))
	}
	v, err := strconv.ParseInt(string(digits), 8, 64)
	if err != nil {
		return 0, fmt.Errorf("header %s %q: %w", what, b, err)
	}
	return v, nil
}

// checkChecksum requires the checksum field as writers write it (six octal
// digits, NUL, space) holding the unsigned sum of the header's bytes with
// the field itself counted as spaces.
func checkChecksum(blk []byte) error {
	f := fChksum.of(blk)
	var sum int64
	for i, b := range blk {
		if i >= fChksum.off && i < fChksum.off+fChksum.len {
			b = ' '
		}
		sum += int64(b)
	}
	if f[7] != ' ' {
		return fmt.Errorf("header checksum %q is not 6 octal digits, a NUL and a space", f)
	}
	got, err := octal("checksum", f[:7])
	if err != nil {
		return err
	}
	if got != sum {
		return &MismatchError{What: "header checksum", Got: strconv.FormatInt(got, 8), Want: strconv.FormatInt(sum, 8)}
	}
	return nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// secretScan looks for secretMarkers across the chunks of one file.
type secretScan struct {
	tail  []byte // the last bytes seen, to find a marker split across reads
	found []byte
}

func (s *secretScan) write(p []byte) {
	if s.found != nil {
		return
	}
	keep := 0
	for _, m := range secretMarkers {
		keep = max(keep, len(m)-1)
	}
	joined := append(s.tail, p[:min(len(p), keep)]...)
	for _, m := range secretMarkers {
		if bytes.Contains(joined, m) || bytes.Contains(p, m) {
			s.found = m
			return
		}
	}
	if len(p) >= keep {
		s.tail = append(s.tail[:0], p[len(p)-keep:]...)
	} else {
		joined = append(s.tail, p...)
		s.tail = append([]byte(nil), joined[max(0, len(joined)-keep):]...)
	}
}
