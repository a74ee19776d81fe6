package media

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

// medium is one kind of image the tests write from the quickstart.
type medium struct {
	name  string
	write func(t *testing.T, src *Source, out string, epoch time.Time) error
	// extract reads the image back with an independent tool into dir.
	extract func(t *testing.T, img, dir string)
	// modes says whether the medium keeps file modes.
	modes bool
	seed  bool
}

func media(t *testing.T) []medium {
	xorriso := func(t *testing.T, img, dir string) {
		run(t, "", need(t, "xorriso", "xorriso"), "-osirrox", "on", "-indev", img, "-extract", "/", dir)
	}
	mcopy := func(offset string) func(t *testing.T, img, dir string) {
		return func(t *testing.T, img, dir string) {
			os.MkdirAll(dir, 0o755)
			run(t, "", need(t, "mcopy", "mtools"), "-s", "-n", "-i", img+offset, "::/", dir)
		}
	}
	return []medium{
		{name: "iso", modes: true, extract: xorriso, write: func(t *testing.T, src *Source, out string, epoch time.Time) error {
			tr, err := ClusterTree(src, runner(t), Mount{Label: "AIRADM"})
			if err != nil {
				return err
			}
			return WriteISO(out, tr, ISOOptions{Label: "AIRADM", Epoch: epoch})
		}},
		{name: "usb", extract: mcopy("@@1M"), write: func(t *testing.T, src *Source, out string, epoch time.Time) error {
			tr, err := ClusterTree(src, runner(t), Mount{Label: "AIRADM_USB", FAT: true})
			if err != nil {
				return err
			}
			return WriteFAT(out, tr, FATOptions{Label: "AIRADM_USB", Epoch: epoch, Partitioned: true})
		}},
		{name: "cidata-iso", modes: true, seed: true, extract: xorriso, write: func(t *testing.T, src *Source, out string, epoch time.Time) error {
			return WriteSeed(out, src, runner(t), "w1", "iso", epoch)
		}},
		{name: "cidata-fat", seed: true, extract: mcopy(""), write: func(t *testing.T, src *Source, out string, epoch time.Time) error {
			return WriteSeed(out, src, runner(t), "w1", "fat", epoch)
		}},
	}
}

// TestReadBack writes each medium and reads it back with xorriso or mtools:
// the layout, sha256sum -c on the tree as read back, and the runner's
// execute bit where the filesystem keeps modes. (airadm verify from the
// read-back tree runs in testdata/script/media.txtar, with a real runner.)
func TestReadBack(t *testing.T) {
	c, out := quickstart(t)
	src, err := Open(out, c, nil, FAT32())
	if err != nil {
		t.Fatal(err)
	}
	sha256sum := need(t, "sha256sum", "coreutils")
	for _, m := range media(t) {
		t.Run(m.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img")
			if err := m.write(t, src, img, src.Epoch()); err != nil {
				t.Fatal(err)
			}
			// The image carries bundles, a control plane's with its keys.
			if fi, err := os.Stat(img); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("image mode %v, %v; want 0600", fi.Mode(), err)
			}
			x := filepath.Join(dir, "x")
			m.extract(t, img, x)
			want := []string{"airadm", "INSTALL.txt", "bundles/SHA256SUMS", "bundles/w1.bundle"}
			if m.seed {
				want = append(want, "meta-data", "user-data", "network-config")
			} else {
				want = append(want, "bundles/cp1.bundle", "bundles/w2.bundle")
			}
			for _, p := range want {
				if _, err := os.Stat(filepath.Join(x, p)); err != nil {
					t.Errorf("read back: %v", err)
				}
			}
			got := run(t, filepath.Join(x, "bundles"), sha256sum, "-c", "SHA256SUMS")
			if !strings.Contains(got, "../airadm: OK") || !strings.Contains(got, "w1.bundle: OK") {
				t.Errorf("sha256sum -c:\n%s", got)
			}
			if m.modes {
				fi, err := os.Stat(filepath.Join(x, "airadm"))
				if err != nil || fi.Mode().Perm() != 0o755 {
					t.Errorf("runner read back as %v, %v; want mode 0755", fi.Mode(), err)
				}
				fi, err = os.Stat(filepath.Join(x, "bundles", "w1.bundle"))
				if err != nil || fi.Mode().Perm() != 0o600 {
					t.Errorf("bundle read back as %v, %v; want mode 0600 (it may hold keys)", fi.Mode(), err)
				}
			}
		})
	}
}

// TestISORecords reads the ISO's descriptors with xorriso and isoinfo: the
// label, Rock Ridge and Joliet, the normalised dates, and long names
// through the Joliet tree alone.
func TestISORecords(t *testing.T) {
	xorriso := need(t, "xorriso", "xorriso")
	c, out := quickstart(t)
	src, err := Open(out, c, []string{"w1"}, SizeLimit{})
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "c.iso")
	tr, err := ClusterTree(src, runner(t), Mount{Label: "DC1_MEDIA"})
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteISO(img, tr, ISOOptions{Label: "DC1_MEDIA", Epoch: src.Epoch()}); err != nil {
		t.Fatal(err)
	}
	toc := run(t, "", xorriso, "-indev", img, "-toc", "-pvd_info")
	for _, w := range []string{
		"ISO offers   : Rock_Ridge Joliet",
		"Volume Id    : DC1_MEDIA",
		"Creation Time: 2026010100000000",
		"Modif. Time  : 2026010100000000",
		"Expir. Time  : 0000000000000000",
	} {
		if !strings.Contains(toc, w+"\n") {
			t.Errorf("xorriso -toc -pvd_info lacks %q:\n%s", w, toc)
		}
	}
	joliet := run(t, "", xorriso, "-rockridge", "off", "-joliet", "on", "-indev", img, "-find", "/", "-type", "f")
	for _, w := range []string{"'/INSTALL.txt'", "'/airadm'", "'/bundles/SHA256SUMS'", "'/bundles/w1.bundle'"} {
		if !strings.Contains(joliet, w+"\n") {
			t.Errorf("Joliet tree lacks %s:\n%s", w, joliet)
		}
	}
	// isoinfo (genisoimage) follows the Joliet directory records, which
	// go-diskfs v1.9.4 alone gets wrong for subdirectories.
	isoinfo := need(t, "isoinfo", "genisoimage")
	d := run(t, "", isoinfo, "-d", "-i", img)
	for _, w := range []string{"Volume id: DC1_MEDIA", "Joliet with UCS level 3 found", "Rock Ridge signatures version 1 found"} {
		if !strings.Contains(d, w+"\n") {
			t.Errorf("isoinfo -d lacks %q:\n%s", w, d)
		}
	}
	if got, want := run(t, "", isoinfo, "-J", "-f", "-i", img), "/INSTALL.txt\n/airadm\n/bundles\n/bundles/SHA256SUMS\n/bundles/w1.bundle\n"; got != want {
		t.Errorf("isoinfo -J -f (the Joliet tree):\n%s\nwant:\n%s", got, want)
	}
	rr := run(t, "", xorriso, "-rockridge", "on", "-indev", img, "-lsdl", "/airadm", "/bundles/w1.bundle")
	for _, w := range []string{"-rwxr-xr-x    1 0        0", "-rw-------    1 0        0"} {
		if !strings.Contains(rr, w) {
			t.Errorf("Rock Ridge records lack %q:\n%s", w, rr)
		}
	}
}

// TestDeterministic writes every medium twice from the same input, with
// the source files' times and the environment's SOURCE_DATE_EPOCH (which
// go-diskfs reads for FAT) changed in between: the bytes must be the same.
// A different epoch must change them.
func TestDeterministic(t *testing.T) {
	c, out := quickstart(t)
	for _, m := range media(t) {
		t.Run(m.name, func(t *testing.T) {
			dir := t.TempDir()
			sums := map[string]string{}
			for i, env := range []string{"1", "1000000000", ""} {
				t.Setenv("SOURCE_DATE_EPOCH", env)
				for _, b := range []string{"cp1", "w1", "w2"} {
					at := time.Unix(int64(1e9+i*3600), 0)
					os.Chtimes(filepath.Join(out, b+".bundle"), at, at)
				}
				src, err := Open(out, c, nil, SizeLimit{})
				if err != nil {
					t.Fatal(err)
				}
				epoch := src.Epoch()
				if env == "" {
					epoch = epoch.Add(time.Hour)
				}
				img := filepath.Join(dir, "img"+env)
				if err := m.write(t, src, img, epoch); err != nil {
					t.Fatal(err)
				}
				sums[env] = fileSHA256(t, img)
			}
			if sums["1"] != sums["1000000000"] {
				t.Errorf("two writes of the same input differ: %s, %s", sums["1"], sums["1000000000"])
			}
			if sums["1"] == sums[""] {
				t.Errorf("another epoch gave the same bytes %s", sums[""])
			}
		})
	}
}

// TestWriteLeavesNothingOnFailure: a refused write leaves no image and no
// temporary file beside it.
func TestWriteLeavesNothingOnFailure(t *testing.T) {
	c, out := quickstart(t)
	src, err := Open(out, c, []string{"w1"}, SizeLimit{})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := ClusterTree(src, runner(t), Mount{Label: "AIRADM"})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		write func(p string) error
		want  string
	}{
		{"ISO label", func(p string) error { return WriteISO(p, tr, ISOOptions{Label: "lower"}) }, `label "lower": want 1 to 32 of A-Z`},
		{"FAT label too long", func(p string) error { return WriteFAT(p, tr, FATOptions{Label: "TWELVE_CHARS"}) }, "want 1 to 11"},
		{"FAT label names a root file", func(p string) error { return WriteFAT(p, tr, FATOptions{Label: "AIRADM"}) }, "has a file or directory of that name at its root"},
		// The copy hashes what it copies: a byte changed in place, with the
		// size and times kept, is caught as surely as a grown file.
		{"ISO, bundle changed after verification", func(p string) error {
			return withBundleChanged(t, filepath.Join(out, "w1.bundle"), func() error { return WriteISO(p, tr, ISOOptions{Label: "AIRADM"}) })
		}, "changed after it was verified"},
		{"FAT, bundle changed after verification", func(p string) error {
			return withBundleChanged(t, filepath.Join(out, "w1.bundle"), func() error {
				return WriteFAT(p, tr, FATOptions{Label: "AIRADM_USB", Partitioned: true})
			})
		}, "changed after it was verified"},
		{"ISO, bundle grown after verification", func(p string) error {
			b := filepath.Join(out, "w1.bundle")
			orig, _ := os.ReadFile(b)
			defer os.WriteFile(b, orig, 0o600)
			os.WriteFile(b, append(append([]byte{}, orig...), 0), 0o600)
			return WriteISO(p, tr, ISOOptions{Label: "AIRADM"})
		}, "changed after it was verified"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			err := tt.write(filepath.Join(dir, "img"))
			if err == nil || !strings.Contains(err.Error(), tt.want) || !isInput(err) {
				t.Fatalf("write = %v, want an InputError containing %q", err, tt.want)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Errorf("a refused write left %v", entries)
			}
		})
	}
}

// withBundleChanged runs write with one byte of the bundle at p flipped,
// its size and times kept, and then puts the bundle back.
func withBundleChanged(t *testing.T, p string, write func() error) error {
	t.Helper()
	orig, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(p)
	changed := append([]byte{}, orig...)
	changed[len(changed)/2] ^= 1
	os.WriteFile(p, changed, 0o600)
	os.Chtimes(p, fi.ModTime(), fi.ModTime())
	defer func() {
		os.WriteFile(p, orig, 0o600)
		os.Chtimes(p, fi.ModTime(), fi.ModTime())
	}()
	return write()
}

// TestWriteISOVerifiesWhileLayingOut: airadm media iso scans the bundles
// and verifies them while go-diskfs lays the image out, whether the copy
// into the image runs meanwhile or after Finalize (a file whose stand-in
// carried no marker). The image is the one Open and WriteISO give; a
// bundle damaged after Scan (its manifest intact) is refused as Open
// refuses it, with nothing written; and a Tree of a Source nothing
// verified is never copied.
func TestWriteISOVerifiesWhileLayingOut(t *testing.T) {
	c, out := quickstart(t)
	scan := func(t *testing.T, damage ...func(dir string)) (string, *Source, Tree) {
		return scanCopy(t, c, out, damage...)
	}
	t.Run("same image as Open", func(t *testing.T) {
		d, src, tr := scan(t)
		dir := t.TempDir()
		if err := WriteISO(filepath.Join(dir, "scanned"), tr, ISOOptions{Label: "AIRADM", Epoch: src.Epoch(), Verify: src.VerifyEntries}); err != nil {
			t.Fatal(err)
		}
		opened, err := Open(d, c, nil, SizeLimit{})
		if err != nil {
			t.Fatal(err)
		}
		otr, err := ClusterTree(opened, runner(t), Mount{Label: "AIRADM"})
		if err != nil {
			t.Fatal(err)
		}
		if err := WriteISO(filepath.Join(dir, "opened"), otr, ISOOptions{Label: "AIRADM", Epoch: opened.Epoch()}); err != nil {
			t.Fatal(err)
		}
		if a, b := fileSHA256(t, filepath.Join(dir, "scanned")), fileSHA256(t, filepath.Join(dir, "opened")); a != b {
			t.Errorf("scanned and opened images differ: %s, %s", a, b)
		}
		_, src, tr = scan(t)
		if err := writeISO(filepath.Join(dir, "after"), tr, ISOOptions{Label: "AIRADM", Epoch: src.Epoch(), Verify: src.VerifyEntries}, false); err != nil {
			t.Fatal(err)
		}
		if a, b := fileSHA256(t, filepath.Join(dir, "after")), fileSHA256(t, filepath.Join(dir, "opened")); a != b {
			t.Errorf("the image copied after Finalize differs from the opened one: %s, %s", a, b)
		}
	})
	for _, standIns := range []bool{true, false} {
		t.Run(fmt.Sprintf("damaged after Scan, stand-ins %v", standIns), func(t *testing.T) {
			d, src, tr := scan(t)
			p := filepath.Join(d, "w1.bundle")
			b, _ := os.ReadFile(p)
			b[strings.Index(string(b), "tls-bootstrap-token-user")] ^= 1
			os.WriteFile(p, b, 0o600)
			dir := t.TempDir()
			err := writeISO(filepath.Join(dir, "img"), tr, ISOOptions{Label: "AIRADM", Verify: src.VerifyEntries}, standIns)
			want := "verifying " + p + ": entry files/etc/kubernetes/bootstrap-kubelet.conf: sha256 mismatch"
			if err == nil || !strings.HasPrefix(err.Error(), want) || !isInput(err) {
				t.Fatalf("WriteISO = %v, want an InputError beginning %q", err, want)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Errorf("a refused write left %v", entries)
			}
		})
	}
	t.Run("SHA256SUMS vouches for other bytes", func(t *testing.T) {
		d, src, tr := scan(t, func(d string) {
			s, _ := trust.ReadSums(filepath.Join(d, "SHA256SUMS"))
			s["w1.bundle"] = trust.Sum{File: strings.Repeat("ab", 32), Manifest: s["w1.bundle"].Manifest}
			s.Write(filepath.Join(d, "SHA256SUMS"))
		})
		dir := t.TempDir()
		err := WriteISO(filepath.Join(dir, "img"), tr, ISOOptions{Label: "AIRADM", Verify: src.VerifyEntries})
		want := "verifying " + filepath.Join(d, "w1.bundle") + ": file sha256 "
		if err == nil || !strings.HasPrefix(err.Error(), want) || !isInput(err) || !errors.Is(err, trust.ErrUntrusted) {
			t.Fatalf("WriteISO = %v, want an untrusted InputError beginning %q", err, want)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("a refused write left %v", entries)
		}
	})
	t.Run("never verified", func(t *testing.T) {
		_, _, tr := scan(t)
		dir := t.TempDir()
		err := WriteISO(filepath.Join(dir, "img"), tr, ISOOptions{Label: "AIRADM"})
		if err == nil || !strings.Contains(err.Error(), "has not been verified") {
			t.Fatalf("WriteISO = %v, want a refusal to copy unverified bytes", err)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("a refused write left %v", entries)
		}
	})
}

// scanCopy scans a copy of the build output out, after damage has been
// done to the copy, and makes its cluster tree; it returns the copy's
// directory too.
func scanCopy(t *testing.T, c *render.Cluster, out string, damage ...func(dir string)) (string, *Source, Tree) {
	t.Helper()
	d := t.TempDir()
	copyDir(t, out, d)
	for _, f := range damage {
		f(d)
	}
	src, err := Scan(d, c, nil, SizeLimit{})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := ClusterTree(src, runner(t), Mount{Label: "AIRADM"})
	if err != nil {
		t.Fatal(err)
	}
	return d, src, tr
}

// TestMeter: a Source's Meter ends at every byte verification read and
// every byte each medium copied, which is what the progress line shows.
func TestMeter(t *testing.T) {
	c, out := quickstart(t)
	for _, m := range media(t) {
		t.Run(m.name, func(t *testing.T) {
			src, err := Scan(out, c, nil, FAT32())
			if err != nil {
				t.Fatal(err)
			}
			meter := &Meter{}
			src.Meter = meter
			if err := src.Verify(); err != nil {
				t.Fatal(err)
			}
			read := int64(0)
			for _, b := range src.Bundles {
				read += b.Size
			}
			if got, total := meter.Verified(); got != read || total != read || read == 0 {
				t.Errorf("verified %d bytes of %d, want %d of %d", got, total, read, read)
			}
			if err := m.write(t, src, filepath.Join(t.TempDir(), "img"), src.Epoch()); err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(runner(t))
			if err != nil {
				t.Fatal(err)
			}
			want := fi.Size()
			for _, b := range src.Bundles {
				if !m.seed || b.Node.Name == "w1" {
					want += b.Size
				}
			}
			if got, total := meter.Copied(); got != want || total != want {
				t.Errorf("copied %d bytes of %d, want %d of %d (the runner and the bundles)", got, total, want, want)
			}
			if got, total := meter.Verified(); got != read || total != read {
				t.Errorf("verified %d bytes of %d after the write, want %d of %d: nothing is read twice for it", got, total, read, read)
			}
		})
	}
}
