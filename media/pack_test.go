package media

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/trust"
)

// TestMediaCarryThePackOnce: from a --pack build, every medium carries
// images.pack once, beside the thin bundles and listed in their SHA256SUMS;
// a damaged pack is refused before any medium is written.
func TestMediaCarryThePackOnce(t *testing.T) {
	c, out := quickstartBuild(t, true)
	src, err := Open(out, c, nil, FAT32())
	if err != nil {
		t.Fatal(err)
	}
	if src.Pack == nil {
		t.Fatal("no pack opened for thin bundles")
	}
	sha256sum := need(t, "sha256sum", "coreutils")
	for _, m := range media(t) {
		t.Run(m.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img")
			if err := m.write(t, src, img, src.Epoch()); err != nil {
				t.Fatal(err)
			}
			x := filepath.Join(dir, "x")
			m.extract(t, img, x)
			var packs []string
			filepath.Walk(x, func(p string, fi os.FileInfo, err error) error {
				if err == nil && fi.Name() == bundle.PackFile {
					packs = append(packs, p)
				}
				return nil
			})
			if len(packs) != 1 || packs[0] != filepath.Join(x, "bundles", bundle.PackFile) {
				t.Errorf("packs on the medium: %v, want bundles/%s once", packs, bundle.PackFile)
			}
			got := run(t, filepath.Join(x, "bundles"), sha256sum, "-c", "SHA256SUMS")
			if !strings.Contains(got, bundle.PackFile+": OK") || !strings.Contains(got, "w1.bundle: OK") {
				t.Errorf("sha256sum -c:\n%s", got)
			}
		})
	}

	// media iso verifies the pack by its pack digest and leaves its line in
	// SHA256SUMS to the copy (VerifyEntries): a line for other bytes is
	// refused there, with nothing written.
	t.Run("iso, SHA256SUMS vouches for another pack", func(t *testing.T) {
		d, src, tr := scanCopy(t, c, out, func(d string) {
			sums, _ := trust.ReadSums(filepath.Join(d, trust.SumsFile))
			sums[bundle.PackFile] = trust.Sum{File: strings.Repeat("ab", 32)}
			sums.Write(filepath.Join(d, trust.SumsFile))
		})
		dir := t.TempDir()
		err := WriteISO(filepath.Join(dir, "img"), tr, ISOOptions{Label: "AIRADM", Verify: src.VerifyEntries})
		want := "verifying " + filepath.Join(d, bundle.PackFile) + ": file sha256 "
		if err == nil || !strings.HasPrefix(err.Error(), want) || !isInput(err) || !errors.Is(err, trust.ErrUntrusted) {
			t.Fatalf("WriteISO = %v, want an untrusted InputError beginning %q", err, want)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("a refused write left %v", entries)
		}
	})

	b, err := os.ReadFile(filepath.Join(out, bundle.PackFile))
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 1
	os.WriteFile(filepath.Join(out, bundle.PackFile), b, 0o644)
	if _, err := Open(out, c, nil, FAT32()); err == nil || !isInput(err) || !strings.Contains(err.Error(), bundle.PackFile) {
		t.Errorf("damaged pack: %v, want an input error naming it", err)
	}
}
