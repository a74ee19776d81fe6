package bundle_test

import (
	"bytes"
	"fmt"
	"strconv"
	"testing"
)

// Raw tar surgery for the vectors that archive/tar's writer refuses to
// produce (typeflag NUL, pax records that rename, hand-made GNU headers) or
// that live outside entries (headers, padding).

// headerAt finds the header block of the entry named name.
func headerAt(t testing.TB, b []byte, name string) int {
	t.Helper()
	for off := 0; off+512 <= len(b); {
		blk := b[off : off+512]
		if blk[0] == 0 {
			break
		}
		n := string(bytes.TrimRight(blk[:100], "\x00"))
		if p := bytes.TrimRight(blk[345:500], "\x00"); len(p) > 0 {
			n = string(p) + "/" + n
		}
		if n == name {
			return off
		}
		size, err := strconv.ParseInt(string(bytes.TrimRight(blk[124:135], "\x00")), 8, 64)
		if err != nil {
			t.Fatal(err)
		}
		off += 512 + int((size+511)/512*512)
	}
	t.Fatalf("no entry %s", name)
	return 0
}

// patchHeader edits the header of entry name in a copy of b and fixes its
// checksum, so that only the edited fields are wrong.
func patchHeader(t testing.TB, b []byte, name string, edit func(blk []byte)) []byte {
	t.Helper()
	b = bytes.Clone(b)
	off := headerAt(t, b, name)
	edit(b[off : off+512])
	fixChecksum(b[off : off+512])
	return b
}

// insertBefore puts raw blocks in front of entry name's header.
func insertBefore(t testing.TB, b []byte, name string, blocks []byte) []byte {
	t.Helper()
	off := headerAt(t, b, name)
	return append(append(bytes.Clone(b[:off]), blocks...), b[off:]...)
}

func fixChecksum(blk []byte) {
	copy(blk[148:156], "        ")
	var sum int64
	for _, c := range blk {
		sum += int64(c)
	}
	copy(blk[148:156], fmt.Sprintf("%06o\x00 ", sum))
}

// rawEntry builds a header of typeflag tf with magic and data, padded.
func rawEntry(name string, tf byte, magic string, data []byte) []byte {
	blk := make([]byte, 512)
	copy(blk, name)
	copy(blk[100:], "0000644\x00")
	copy(blk[108:], "0000000\x00")
	copy(blk[116:], "0000000\x00")
	copy(blk[124:], fmt.Sprintf("%011o\x00", len(data)))
	copy(blk[136:], "00000000000\x00")
	blk[156] = tf
	copy(blk[257:], magic)
	if magic == "ustar\x0000" {
		copy(blk[329:], "0000000\x00")
		copy(blk[337:], "0000000\x00")
	}
	fixChecksum(blk)
	pad := make([]byte, (512-len(data)%512)%512)
	return append(append(blk, data...), pad...)
}

// paxRecord is one "length key=value\n" record, its length counting itself.
func paxRecord(key, value string) string {
	rest := " " + key + "=" + value + "\n"
	n := len(rest) + 1
	for len(strconv.Itoa(n))+len(rest) != n {
		n++
	}
	return strconv.Itoa(n) + rest
}
