package media

import (
	"encoding/binary"
	"fmt"
	"io"
	"time"
)

// normaliseISO rewrites, in an image go-diskfs has just written, the fields
// that depend on when and by whom it was written rather than on its
// content: the volume descriptors' dates (go-diskfs v1.9.4 writes the wall
// clock there and offers no option), every directory record's recording
// date, and Rock Ridge's TF timestamps, PX owners and link counts (go-diskfs
// copies them from the workspace's inodes, whose ctime no program can set).
// Times become epoch, owners root and files' link counts 1; modes stay the
// tree's.
// It changes no offsets or lengths: the layout is go-diskfs's. It also
// repairs one go-diskfs v1.9.4 defect, in jolietLinks.
func normaliseISO(f io.ReaderAt, epoch time.Time) error {
	w, ok := f.(io.WriterAt)
	if !ok {
		return fmt.Errorf("normalising the ISO: not writable")
	}
	n := &isoNorm{r: f, w: w, short: isoShortTime(epoch), long: isoLongTime(epoch), seen: map[uint32]bool{}}
	for sector := int64(16); ; sector++ {
		vd := make([]byte, isoSector)
		if _, err := f.ReadAt(vd, sector*isoSector); err != nil {
			return fmt.Errorf("normalising the ISO: reading volume descriptor %d: %w", sector, err)
		}
		if string(vd[1:6]) != "CD001" {
			return fmt.Errorf("normalising the ISO: sector %d is not a volume descriptor", sector)
		}
		typ := vd[0]
		if typ == 255 {
			break
		}
		if typ != 1 && typ != 2 { // primary, supplementary (Joliet)
			continue
		}
		// Creation, modification and effective dates; expiration none.
		for _, off := range []int{813, 830, 864} {
			copy(vd[off:off+17], n.long)
		}
		copy(vd[847:864], isoNoTime)
		root := vd[156 : 156+34]
		copy(root[18:25], n.short)
		if _, err := w.WriteAt(vd, sector*isoSector); err != nil {
			return fmt.Errorf("normalising the ISO: %w", err)
		}
		if typ == 2 {
			if err := n.jolietLinks(binary.LittleEndian.Uint32(vd[140:]), binary.LittleEndian.Uint32(vd[132:])); err != nil {
				return fmt.Errorf("normalising the ISO: %w", err)
			}
		}
		if err := n.dir(binary.LittleEndian.Uint32(root[2:]), binary.LittleEndian.Uint32(root[10:])); err != nil {
			return fmt.Errorf("normalising the ISO: %w", err)
		}
		// The path table lists every directory, including ones no record
		// points to: go-diskfs v1.9.4 points Joliet records of
		// subdirectories at the primary directories, leaving the Joliet
		// copies reachable only from the Joliet path table.
		if err := n.pathTable(binary.LittleEndian.Uint32(vd[140:]), binary.LittleEndian.Uint32(vd[132:])); err != nil {
			return fmt.Errorf("normalising the ISO: %w", err)
		}
		if sector > 64 {
			return fmt.Errorf("normalising the ISO: no volume descriptor set terminator")
		}
	}
	return nil
}

const isoSector = 2048

// isoNoTime is an unset 17-byte date.
const isoNoTime = "0000000000000000\x00"

type isoNorm struct {
	r           io.ReaderAt
	w           io.WriterAt
	short, long []byte
	seen        map[uint32]bool
}

// dir normalises the directory extent at lba of size bytes and, depth
// first, its subdirectories.
func (n *isoNorm) dir(lba, size uint32) error {
	if n.seen[lba] {
		return nil
	}
	n.seen[lba] = true
	buf := make([]byte, size)
	if _, err := n.r.ReadAt(buf, int64(lba)*isoSector); err != nil {
		return fmt.Errorf("reading directory at sector %d: %w", lba, err)
	}
	type sub struct{ lba, size uint32 }
	var subs []sub
	for pos := 0; pos < len(buf); {
		l := int(buf[pos])
		if l == 0 { // records do not cross sectors: the rest is padding
			pos = (pos/isoSector + 1) * isoSector
			continue
		}
		if l < 34 || pos+l > len(buf) {
			return fmt.Errorf("directory at sector %d: bad record length %d at %d", lba, l, pos)
		}
		rec := buf[pos : pos+l]
		copy(rec[18:25], n.short)
		isDir := rec[25]&2 != 0
		nameLen := int(rec[32])
		su := 33 + nameLen
		if nameLen%2 == 0 {
			su++
		}
		if su < l {
			if err := n.susp(rec[su:], isDir); err != nil {
				return fmt.Errorf("directory at sector %d: %w", lba, err)
			}
		}
		dot := nameLen == 1 && (rec[33] == 0 || rec[33] == 1)
		if isDir && !dot {
			subs = append(subs, sub{binary.LittleEndian.Uint32(rec[2:]), binary.LittleEndian.Uint32(rec[10:])})
		}
		pos += l
	}
	if _, err := n.w.WriteAt(buf, int64(lba)*isoSector); err != nil {
		return err
	}
	for _, s := range subs {
		if err := n.dir(s.lba, s.size); err != nil {
			return err
		}
	}
	return nil
}

// pathTable normalises every directory an L path table lists.
func (n *isoNorm) pathTable(lba, size uint32) error {
	pt := make([]byte, size)
	if _, err := n.r.ReadAt(pt, int64(lba)*isoSector); err != nil {
		return fmt.Errorf("reading path table at sector %d: %w", lba, err)
	}
	for pos := 0; pos+8 <= len(pt); {
		l := int(pt[pos])
		if l == 0 {
			break
		}
		dir := binary.LittleEndian.Uint32(pt[pos+2:])
		// The directory's size is in its own "." record.
		dot := make([]byte, 34)
		if _, err := n.r.ReadAt(dot, int64(dir)*isoSector); err != nil {
			return fmt.Errorf("reading directory at sector %d: %w", dir, err)
		}
		if err := n.dir(dir, binary.LittleEndian.Uint32(dot[10:])); err != nil {
			return err
		}
		pos += 8 + l + l%2
	}
	return nil
}

// jolietLinks points every Joliet record of a subdirectory at the Joliet
// copy of that directory, as the Joliet path table (L, at lba) lists it.
// go-diskfs v1.9.4 writes the copies but points the records at the primary
// directories, so a reader that follows Joliet records (Windows, isoinfo
// -J) would list a subdirectory's files under their ISO 9660 names
// (CP1.BUN;1) read as UCS-2.
func (n *isoNorm) jolietLinks(lba, size uint32) error {
	pt := make([]byte, size)
	if _, err := n.r.ReadAt(pt, int64(lba)*isoSector); err != nil {
		return fmt.Errorf("reading the Joliet path table: %w", err)
	}
	type entry struct {
		lba    uint32
		parent int
		name   string
	}
	var dirs []entry // directory number i+1, as the table counts
	for pos := 0; pos+8 <= len(pt); {
		l := int(pt[pos])
		if l == 0 || pos+8+l > len(pt) {
			break
		}
		dirs = append(dirs, entry{binary.LittleEndian.Uint32(pt[pos+2:]), int(binary.LittleEndian.Uint16(pt[pos+6:])), string(pt[pos+8 : pos+8+l])})
		pos += 8 + l + l%2
	}
	dirSize := func(lba uint32) (uint32, error) {
		dot := make([]byte, 34)
		if _, err := n.r.ReadAt(dot, int64(lba)*isoSector); err != nil {
			return 0, fmt.Errorf("reading directory at sector %d: %w", lba, err)
		}
		return binary.LittleEndian.Uint32(dot[10:]), nil
	}
	for num, d := range dirs {
		size, err := dirSize(d.lba)
		if err != nil {
			return err
		}
		buf := make([]byte, size)
		if _, err := n.r.ReadAt(buf, int64(d.lba)*isoSector); err != nil {
			return fmt.Errorf("reading directory at sector %d: %w", d.lba, err)
		}
		changed := false
		for pos := 0; pos < len(buf); {
			l := int(buf[pos])
			if l == 0 {
				pos = (pos/isoSector + 1) * isoSector
				continue
			}
			if l < 34 || pos+l > len(buf) {
				return fmt.Errorf("directory at sector %d: bad record length %d at %d", d.lba, l, pos)
			}
			rec := buf[pos : pos+l]
			name := string(rec[33 : 33+int(rec[32])])
			if rec[25]&2 != 0 && len(name) > 1 {
				for _, child := range dirs {
					if child.parent == num+1 && child.name == name && binary.LittleEndian.Uint32(rec[2:]) != child.lba {
						childSize, err := dirSize(child.lba)
						if err != nil {
							return err
						}
						putBoth(rec[2:], child.lba)
						putBoth(rec[10:], childSize)
						changed = true
					}
				}
			}
			pos += l
		}
		if changed {
			if _, err := n.w.WriteAt(buf, int64(d.lba)*isoSector); err != nil {
				return err
			}
		}
	}
	return nil
}

// susp normalises the System Use Sharing Protocol entries in b, following
// a continuation area (CE) if there is one.
func (n *isoNorm) susp(b []byte, isDir bool) error {
	for len(b) >= 4 {
		sig, l := string(b[0:2]), int(b[2])
		if l < 4 || l > len(b) {
			return nil // padding, or not SUSP (a Joliet record)
		}
		e := b[:l]
		switch sig {
		case "TF":
			size := 7
			if e[4]&0x80 != 0 {
				size = 17
			}
			for off := 5; off+size <= l; off += size {
				if size == 7 {
					copy(e[off:off+7], n.short)
				} else {
					copy(e[off:off+17], n.long)
				}
			}
		case "PX":
			if l >= 36 {
				// The workspace's modes are the tree's; drop only
				// setuid, setgid and sticky bits.
				putBoth(e[4:], binary.LittleEndian.Uint32(e[4:])&^0o7000)
				if !isDir {
					putBoth(e[12:], 1)
				}
				putBoth(e[20:], 0)
				putBoth(e[28:], 0)
			}
		case "CE":
			if l >= 28 {
				lba := binary.LittleEndian.Uint32(e[4:])
				off := binary.LittleEndian.Uint32(e[12:])
				size := binary.LittleEndian.Uint32(e[20:])
				at := int64(lba)*isoSector + int64(off)
				area := make([]byte, size)
				if _, err := n.r.ReadAt(area, at); err != nil {
					return fmt.Errorf("reading continuation area: %w", err)
				}
				if err := n.susp(area, isDir); err != nil {
					return err
				}
				if _, err := n.w.WriteAt(area, at); err != nil {
					return err
				}
			}
		case "ST":
			return nil
		}
		b = b[l:]
	}
	return nil
}

// putBoth writes v in ISO 9660's both-byte-order form.
func putBoth(b []byte, v uint32) {
	binary.LittleEndian.PutUint32(b[0:], v)
	binary.BigEndian.PutUint32(b[4:], v)
}

func isoShortTime(t time.Time) []byte {
	t = t.UTC()
	return []byte{byte(t.Year() - 1900), byte(t.Month()), byte(t.Day()), byte(t.Hour()), byte(t.Minute()), byte(t.Second()), 0}
}

func isoLongTime(t time.Time) []byte {
	t = t.UTC()
	return append([]byte(fmt.Sprintf("%04d%02d%02d%02d%02d%02d00", t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second())), 0)
}
