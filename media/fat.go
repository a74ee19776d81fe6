package media

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"strings"
	"time"

	"github.com/diskfs/go-diskfs/backend/file"
	"github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/fat32"
	"github.com/diskfs/go-diskfs/partition/gpt"

	"airadm.dev/airadm/atomicfile"
)

// FATMaxFile is the largest file FAT32 can hold: 4 GiB less one byte.
const FATMaxFile = 1<<32 - 1

var fatLabelRE = regexp.MustCompile(`^[A-Z0-9_]{1,11}$`)

// CheckFATLabel says whether label can name a FAT volume.
func CheckFATLabel(label string) error {
	if !fatLabelRE.MatchString(label) {
		return fmt.Errorf("label %q: want 1 to 11 of A-Z, 0-9 and _ (a FAT volume label)", label)
	}
	return nil
}

// FATOptions shape a FAT image.
type FATOptions struct {
	Label string
	Epoch time.Time
	// Partitioned writes a whole disk: a GPT with one partition holding
	// the filesystem, which dd writes to a USB stick. Without it the image
	// is the bare filesystem (a cloud-init seed volume).
	Partitioned bool
}

const (
	mib = 1 << 20
	// gptReserve is room before the partition (aligned at 1 MiB, as
	// partitioning tools do) and after it (the backup GPT).
	gptReserve = mib
	sector     = 512
)

// WriteFAT writes t as a FAT32 filesystem at path, atomically. FAT has no
// modes or owners: Linux shows every file as executable unless the volume
// is mounted with noexec or showexec, which is why the seed's user-data
// installs the runner with mode 0755 before running it.
func WriteFAT(path string, t Tree, o FATOptions) error {
	if err := CheckFATLabel(o.Label); err != nil {
		return &InputError{err}
	}
	for _, f := range t {
		// go-diskfs opens the label's root entry for a file of the same
		// name (FAT names match case-insensitively).
		if top, _, _ := strings.Cut(f.Path, "/"); strings.EqualFold(top, o.Label) {
			return inputErrorf("label %q: the medium has a file or directory of that name at its root; choose another label", o.Label)
		}
		if f.Size > FATMaxFile || int64(len(f.Data)) > FATMaxFile {
			return inputErrorf("%s is larger than FAT32 allows (4 GiB): %s", f.From, tooLargeHint)
		}
	}
	epoch := o.Epoch.UTC()
	if min := time.Date(1980, 1, 1, 0, 0, 0, 0, time.UTC); epoch.Before(min) {
		epoch = min // FAT cannot record earlier dates
	}
	fsSize := fatSize(t)
	return atomicfile.WriteFrom(path, 0o600, func(w io.Writer) error {
		f, ok := w.(*os.File)
		if !ok {
			return errors.New("the image needs a file it can write at offsets")
		}
		total, start := fsSize, int64(0)
		if o.Partitioned {
			total, start = fsSize+2*gptReserve, gptReserve
		}
		if err := f.Truncate(total); err != nil {
			return err
		}
		d := &disk.Disk{Backend: file.New(f, false), Size: total, LogicalBlocksize: sector, PhysicalBlocksize: sector}
		fsys, err := func() (filesystem.FileSystem, error) {
			if !o.Partitioned {
				return fat32.Create(d.Backend, fsSize, 0, sector, o.Label, true)
			}
			table := &gpt.Table{
				LogicalSectorSize: sector, PhysicalSectorSize: sector, ProtectiveMBR: true,
				GUID: nameUUID("disk", t),
				Partitions: []*gpt.Partition{{
					Index: 1, Start: uint64(start / sector), End: uint64((start+fsSize)/sector - 1), Size: uint64(fsSize),
					Type: gpt.MicrosoftBasicData, Name: o.Label, GUID: nameUUID("partition", t),
				}},
			}
			if err := d.Partition(table); err != nil {
				return nil, fmt.Errorf("writing the partition table: %w", err)
			}
			return d.CreateFilesystem(disk.FilesystemSpec{Partition: 1, FSType: filesystem.TypeFat32, VolumeLabel: o.Label, Reproducible: true})
		}()
		if err != nil {
			return fmt.Errorf("creating the FAT32 filesystem: %w", err)
		}
		return fillFAT(fsys, t, o.Label, epoch)
	})
}

// fillFAT copies t into fsys and sets every time go-diskfs recorded
// (it reads the clock, or SOURCE_DATE_EPOCH from the environment) to epoch.
func fillFAT(fsys filesystem.FileSystem, t Tree, label string, epoch time.Time) error {
	// go-diskfs stamps the label's root entry with the clock too.
	entry := label // the root entry holds it as an 8.3 name
	if len(label) > 8 {
		entry = label[:8] + "." + label[8:]
	}
	if err := fsys.Chtimes("/"+entry, epoch, epoch, epoch); err != nil {
		return fmt.Errorf("setting the label's time: %w", err)
	}
	dirs := map[string]bool{}
	for _, f := range t {
		p := "/" + f.Path
		if d := path.Dir(p); d != "/" && !dirs[d] {
			if err := fsys.Mkdir(d); err != nil {
				return fmt.Errorf("creating %s: %w", d, err)
			}
			dirs[d] = true
		}
		if err := writeFATFile(fsys, p, f); err != nil {
			return fmt.Errorf("writing %s: %w", p, err)
		}
		if err := fsys.Chtimes(p, epoch, epoch, epoch); err != nil {
			return fmt.Errorf("setting the time of %s: %w", p, err)
		}
	}
	for d := range dirs {
		for _, p := range []string{d + "/.", d + "/..", d} {
			if err := fsys.Chtimes(p, epoch, epoch, epoch); err != nil {
				return fmt.Errorf("setting the time of %s: %w", p, err)
			}
		}
	}
	return nil
}

// writeFATFile writes in large chunks, since go-diskfs walks the file's
// cluster chain on every Write, and checks a copied file's sha256 in the
// same pass (see copyInto).
func writeFATFile(fsys filesystem.FileSystem, p string, f File) error {
	out, err := fsys.OpenFile(p, os.O_CREATE|os.O_RDWR)
	if err != nil {
		return err
	}
	defer out.Close()
	if f.From == "" {
		_, err := out.Write(f.Data)
		return err
	}
	return copyInto(out, f)
}

// fatSize is a filesystem size that holds t: every file rounded up to the
// largest cluster go-diskfs picks (32 KiB), the two FATs, and slack, in
// whole MiB, and at least the 64 MiB a FAT32 volume comfortably needs.
func fatSize(t Tree) int64 {
	var data int64
	for _, f := range t {
		n := f.Size + int64(len(f.Data))
		data += (n + 32<<10 - 1) / (32 << 10) * (32 << 10)
	}
	data += 1 * mib                // directories
	size := data + data/64 + 4*mib // FATs at 4 bytes per 512-byte cluster at worst
	size = (size + mib - 1) / mib * mib
	size = max(size, 64*mib)
	for !fatTableFits(size) {
		size += mib
	}
	return size
}

// fatTableFits repeats go-diskfs v1.9.4's FAT32 layout for a volume of size
// bytes and reports whether each FAT has an entry for every cluster. Its
// closed-form sectors-per-FAT comes out one sector short at some sizes (64
// MiB among them), which mtools and fsck.fat then refuse.
func fatTableFits(size int64) bool {
	var clusterBytes int64
	switch {
	case size <= 260*mib:
		clusterBytes = 512
	case size <= 8<<30:
		clusterBytes = 4 << 10
	case size <= 16<<30:
		clusterBytes = 8 << 10
	case size <= 32<<30:
		clusterBytes = 16 << 10
	default:
		clusterBytes = 32 << 10
	}
	const reserved = 32
	spc := clusterBytes / sector
	total := size / sector
	denom := sector*spc + 8
	perFAT := (4*(total-reserved) + denom - 1) / denom
	clusters := (total - reserved - 2*perFAT) / spc
	return perFAT*(sector/4) >= clusters+2
}

// nameUUID derives a GUID from the tree's names and contents, so the same
// content gets the same partition table (go-diskfs would pick random ones).
func nameUUID(kind string, t Tree) string {
	h := sha256.New()
	fmt.Fprintf(h, "airadm media %s\n", kind)
	for _, f := range t {
		fmt.Fprintf(h, "%s %d %s %x\n", f.Path, f.Size, f.sum, sha256.Sum256(f.Data))
	}
	b := h.Sum(nil)[:16]
	b[6] = b[6]&0x0f | 0x80 // version 8: custom
	b[8] = b[8]&0x3f | 0x80 // RFC 9562 variant
	return strings.ToUpper(fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]))
}
