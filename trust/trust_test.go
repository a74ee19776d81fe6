package trust

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

func TestSumsRoundTrip(t *testing.T) {
	in := "" +
		strings.Repeat("a", 64) + "  cp1.bundle\n" +
		strings.Repeat("B", 64) + " *w1.bundle\n" +
		"# a comment sha256sum skips\n" +
		"# airadm manifest cp1.bundle sha256:" + strings.Repeat("c", 64) + "\n" +
		"not a line\n"
	s := ParseSums(in)
	want := Sums{
		"cp1.bundle": {File: strings.Repeat("a", 64), Manifest: "sha256:" + strings.Repeat("c", 64)},
		"w1.bundle":  {File: strings.Repeat("b", 64)},
	}
	if len(s) != len(want) || s["cp1.bundle"] != want["cp1.bundle"] || s["w1.bundle"] != want["w1.bundle"] {
		t.Fatalf("ParseSums = %+v, want %+v", s, want)
	}
	out := string(s.Encode())
	wantOut := strings.Repeat("a", 64) + "  cp1.bundle\n" + strings.Repeat("b", 64) + "  w1.bundle\n" +
		"# airadm manifest cp1.bundle sha256:" + strings.Repeat("c", 64) + "\n"
	if out != wantOut {
		t.Errorf("Encode =\n%s\nwant\n%s", out, wantOut)
	}
}

func TestParseDigest(t *testing.T) {
	h := strings.Repeat("ab", 32)
	for _, c := range []struct{ in, want, err string }{
		{"sha256:" + h, "sha256:" + h, ""},
		{h, "sha256:" + h, ""},
		{strings.ToUpper(h), "sha256:" + h, ""},
		{"sha256:" + h[:10], "", "want sha256:<64 hex digits>"},
		{strings.Repeat("zz", 32), "", "want sha256:<64 hex digits>"},
		{"sha512:" + h, "", "want sha256:<64 hex digits>"},
	} {
		got, err := ParseDigest(c.in)
		if got != c.want || (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("ParseDigest(%q) = %q, %v; want %q, %q", c.in, got, err, c.want, c.err)
		}
	}
}

// testBundle writes a small bundle (files only) and returns its bytes and
// manifest digest.
func testBundle(t *testing.T) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	_, d, err := bundle.Write(&buf, bundle.Contents{
		Cluster: "c", Node: "cp1", Role: "control-plane", KubernetesVersion: render.KubernetesVersion,
		BuildTime: time.Unix(1767225600, 0),
		Files:     []render.File{{Path: "/etc/kubernetes/pki/ca.crt", Mode: 0o644, Data: []byte("not really a cert\n")}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), d
}

func TestFind(t *testing.T) {
	b, d := testBundle(t)
	sum := sha256.Sum256(b)
	fileHex := hex.EncodeToString(sum[:])
	dir := t.TempDir()
	path := filepath.Join(dir, "cp1.bundle")
	os.WriteFile(path, b, 0o600)

	v, err := Find(path, "", nil)
	if err != nil || v.Authenticated() || !strings.Contains(v.Why, "no SHA256SUMS beside the bundle") {
		t.Errorf("no SHA256SUMS: %+v, %v", v, err)
	}
	Sums{"w1.bundle": {File: fileHex}}.Write(filepath.Join(dir, SumsFile))
	v, _ = Find(path, "", nil)
	if v.Authenticated() || !strings.Contains(v.Why, "has no line for cp1.bundle (it lists w1.bundle)") {
		t.Errorf("no line: %+v", v)
	}
	Sums{"cp1.bundle": {File: fileHex, Manifest: d}}.Write(filepath.Join(dir, SumsFile))
	v, _ = Find(path, "", nil)
	if v.FileSHA256 != fileHex || v.ManifestDigest != d || v.From != filepath.Join(dir, SumsFile) {
		t.Errorf("line: %+v", v)
	}
	v, _ = Find(path, strings.TrimPrefix(d, "sha256:"), nil)
	if v.ManifestDigest != d || v.FileSHA256 != "" || v.From != "--manifest-digest" {
		t.Errorf("flag wins over SHA256SUMS: %+v", v)
	}
	if _, err := Find(path, "sha256:nope", nil); err == nil {
		t.Error("a malformed digest was accepted")
	}
}

func TestVerify(t *testing.T) {
	b, d := testBundle(t)
	sum := sha256.Sum256(b)
	fileHex := hex.EncodeToString(sum[:])
	other := strings.Repeat("0", 64)
	for _, c := range []struct {
		name string
		v    Vouch
		err  error
	}{
		{"integrity only", Vouch{}, nil},
		{"both match", Vouch{ManifestDigest: d, FileSHA256: fileHex, From: "SUMS"}, nil},
		{"file only", Vouch{FileSHA256: fileHex, From: "SUMS"}, nil},
		{"another manifest", Vouch{ManifestDigest: "sha256:" + other, From: "SUMS"}, ErrUntrusted},
		// The entries are intact, so only the whole file's digest can
		// tell: this is how a byte changed outside every entry is caught.
		{"another file", Vouch{ManifestDigest: d, FileSHA256: other, From: "SUMS"}, ErrUntrusted},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, got, err := Verify(bytes.NewReader(b), c.v, bundle.Visitor{})
			if !errors.Is(err, c.err) || (err == nil && (m == nil || got != d)) {
				t.Fatalf("Verify = %v, %q, %v; want error %v", m, got, err, c.err)
			}
		})
	}
}

// TestVerifyRefusesAnotherManifestFirst: a bundle that is not the one
// vouched for is refused once its manifest is read, before its entries
// reach the visitor (apply acts on entries as they verify).
func TestVerifyRefusesAnotherManifestFirst(t *testing.T) {
	b, _ := testBundle(t)
	visited := 0
	_, _, err := Verify(bytes.NewReader(b), Vouch{ManifestDigest: "sha256:" + strings.Repeat("0", 64), From: "SUMS"}, bundle.Visitor{
		File: func(bundle.FileEntry, io.Reader) error { visited++; return nil },
	})
	if !errors.Is(err, ErrUntrusted) || visited != 0 {
		t.Fatalf("err %v after %d entries visited; want ErrUntrusted before any", err, visited)
	}
}
