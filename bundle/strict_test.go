package bundle_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

// TestDecodeManifestStrict covers the manifest rules that are not worth a
// whole vector each; each case edits the valid manifest once.
func TestDecodeManifestStrict(t *testing.T) {
	valid := entries(t, tinyBundle(t))[0].data
	if _, err := bundle.DecodeManifest(valid); err != nil {
		t.Fatalf("valid manifest refused: %v", err)
	}
	for _, tc := range []struct {
		name, old, new, want string
	}{
		{"nested unknown member", `"sha256": "`, `"owner": "root", "sha256": "`, `files[0]: member "owner" is unknown`},
		{"nested member case", `"ref": "`, `"Ref": "`, `images[0]: member "Ref" is unknown (member names are case-sensitive: "ref")`},
		{"nested member twice", `"size": 14,`, `"size": 14, "size": 14,`, `files[0]: member "size" appears twice`},
		{"nested member missing", `"mediaType": "application/vnd.oci.image.manifest.v1+json",`, ``, `images[0]: member "mediaType" is missing`},
		{"bad index digest", `"platform": "linux/amd64"`, `"platform": "linux/amd64", "indexDigest": "sha256:AB"`, `index digest "sha256:AB" is not sha256:<64 lowercase hex>`},
		{"array null", `"blobs": [`, `"blobs": null, "b": [`, `blobs is null, want an array`},
		{"integer as string", `"formatVersion": 1`, `"formatVersion": "1"`, `formatVersion is a string, want an integer`},
		{"integer with fraction", `"formatVersion": 1`, `"formatVersion": 1.0`, `formatVersion 1.0 is not a non-negative integer in plain decimal`},
		{"integer with exponent", `"size": 14`, `"size": 1.4e1`, `files[0].size 1.4e1 is not a non-negative integer`},
		{"negative integer", `"size": 14`, `"size": -14`, `files[0].size -14 is not a non-negative integer`},
		{"fractional seconds", `00:00:00Z"`, `00:00:00.000Z"`, `buildTime "2026-01-01T00:00:00.000Z" is not a UTC time in whole seconds`},
		{"lowercase z", `00:00:00Z"`, `00:00:00z"`, `is not a UTC time in whole seconds`},
		{"impossible date", `2026-01-01T`, `2026-02-30T`, `buildTime "2026-02-30T00:00:00Z" is not a UTC time`},
		{"two objects", "\n}\n", "\n}\n{}", `data after the manifest's object`},
		{"not an object", `{`, `[{`, `the manifest is an array, want an object`},
		{"empty index digest", `"platform": "linux/amd64"`, `"platform": "linux/amd64", "indexDigest": ""`, `images[0].indexDigest is present but empty; writers omit it`},
		{"platform with os version", `"linux/amd64"`, `"linux/amd64:10.0"`, `platform "linux/amd64:10.0" is not os/arch or os/arch/variant`},
		{"empty kubernetes version", `"kubernetesVersion": "` + render.KubernetesVersion + `"`, `"kubernetesVersion": ""`, `kubernetesVersion is empty`},
		{"blob listed twice", `"blobs": [`, `"blobs": [{"digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "size": 1}, {"digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "size": 1},`, `blob sha256:0000000000000000000000000000000000000000000000000000000000000000 is listed twice`},
		{"invalid UTF-8", `"cluster": "v"`, "\"cluster\": \"v\xff\"", `not valid UTF-8`},
		// Version 2 (docs/bundle-format.md, "Encrypted files"): its members
		// only in version 2, and version 2 only with them.
		{"encryption in version 1", `"sha256": "`, `"encryption": "age", "sha256": "`, `format version is 1, but member "files[].encryption" is version 2's`},
		{"version 2 without its members", `"formatVersion": 1`, `"formatVersion": 2`, `format version is 2, but the manifest uses nothing newer than version 1`},
		{"version 3", `"formatVersion": 1`, `"formatVersion": 3`, `format version 3 is not supported (this airadm reads versions 1 to 2)`},
		{"recipient without encrypted files", `"formatVersion": 1`, `"formatVersion": 2, "recipient": "age1at8r2t4p34c0nyeu0va2zd7e9sq36zs83hu953gelrlxvrcd0p5qvs6prr"`, `a manifest names a recipient exactly when some file is encrypted`},
		{"empty encryption", `"sha256": "`, `"encryption": "", "sha256": "`, `files[0].encryption is present but empty; writers omit it`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !bytes.Contains(valid, []byte(tc.old)) {
				t.Fatalf("manifest has no %q", tc.old)
			}
			_, err := bundle.DecodeManifest(bytes.Replace(valid, []byte(tc.old), []byte(tc.new), 1))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
	big := append(bytes.Repeat([]byte(" "), 64<<20), valid...)
	if _, err := bundle.DecodeManifest(big); err == nil || !strings.Contains(err.Error(), "larger than the 67108864 a manifest may have") {
		t.Errorf("oversized manifest: %v", err)
	}
}

// TestDecodeManifestVersion2 checks the version-2 members together: a
// recipient and encrypted files go together, with one encryption and one
// spelling of the recipient.
func TestDecodeManifestVersion2(t *testing.T) {
	valid := entries(t, tinyBundle(t))[0].data
	const rcpt = `"age1at8r2t4p34c0nyeu0va2zd7e9sq36zs83hu953gelrlxvrcd0p5qvs6prr"`
	for _, tc := range []struct {
		name, encryption, recipient, want string
	}{
		{"age file to a recipient", `"age"`, rcpt, ""},
		{"ssh recipient", `"age"`, `"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0VmXz4J1mYcR9rY0ZCmPm8Wc1l2RL2z0b3q4Qd0mnm"`, ""},
		{"no recipient", `"age"`, ``, `a manifest names a recipient exactly when some file is encrypted`},
		{"another encryption", `"gpg"`, rcpt, `encryption "gpg" is not "age"`},
		{"recipient with a comment", `"age"`, `"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0VmXz4J1mYcR9rY0ZCmPm8Wc1l2RL2z0b3q4Qd0mnm root@w1"`, `is neither age1... nor ssh-ed25519 <base64>`},
		{"upper-case age recipient", `"age"`, strings.ToUpper(rcpt), `is neither age1...`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := bytes.Replace(valid, []byte(`"formatVersion": 1`), []byte(`"formatVersion": 2`), 1)
			m = bytes.Replace(m, []byte(`"sha256": "`), []byte(`"encryption": `+tc.encryption+`, "sha256": "`), 1)
			if tc.recipient != "" {
				m = bytes.Replace(m, []byte(`"blobs": [`), []byte(`"recipient": `+tc.recipient+`, "blobs": [`), 1)
			}
			_, err := bundle.DecodeManifest(m)
			if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

// TestIndexJSONEncoding pins images/index.json to the bytes
// docs/bundle-format.md spells out, so that a change in the JSON library
// cannot silently change what a second reader must derive.
func TestIndexJSONEncoding(t *testing.T) {
	d1 := "sha256:" + strings.Repeat("a", 64)
	d2 := "sha256:" + strings.Repeat("b", 64)
	for _, tc := range []struct {
		name   string
		images []bundle.ImageEntry
		want   string
	}{
		{"no images", nil, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`},
		{"sorted by ref, variant last", []bundle.ImageEntry{
			{Ref: "r.example/b:1", Digest: d2, MediaType: "application/vnd.docker.distribution.manifest.v2+json", Size: 7, Platform: "linux/arm64/v8", IndexDigest: d1},
			{Ref: "r.example/a@" + d1, Digest: d1, MediaType: "application/vnd.oci.image.manifest.v1+json", Size: 5, Platform: "linux/amd64"},
		}, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[` +
			`{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":5,"digest":"` + d1 + `","annotations":{"io.containerd.image.name":"r.example/a@` + d1 + `","org.opencontainers.image.ref.name":"r.example/a@` + d1 + `"},"platform":{"architecture":"amd64","os":"linux"}},` +
			`{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","size":7,"digest":"` + d2 + `","annotations":{"io.containerd.image.name":"r.example/b:1","org.opencontainers.image.ref.name":"r.example/b:1"},"platform":{"architecture":"arm64","os":"linux","variant":"v8"}}]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := (&bundle.Manifest{Images: tc.images}).IndexJSON()
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("index.json\n got %s\nwant %s", got, tc.want)
			}
		})
	}
}

// eofReader records whether Read consumed its input through io.EOF.
type eofReader struct {
	r      io.Reader
	n      int
	sawEOF bool
}

func (e *eofReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	e.n += n
	if err == io.EOF {
		e.sawEOF = true
	}
	return n, err
}

// TestReadConsumesToEOF: callers hash the whole file through a TeeReader in
// the same pass, so Read must read every byte and see the end.
func TestReadConsumesToEOF(t *testing.T) {
	b := tinyBundle(t)
	r := &eofReader{r: bytes.NewReader(b)}
	if _, _, err := bundle.Read(r, bundle.Visitor{}); err != nil {
		t.Fatal(err)
	}
	if r.n != len(b) || !r.sawEOF {
		t.Errorf("read %d of %d bytes, EOF seen: %v", r.n, len(b), r.sawEOF)
	}
}

// TestLongNamesUseThePrefixField: names over 100 bytes go in ustar's
// prefix field, which the reader joins back.
func TestLongNamesUseThePrefixField(t *testing.T) {
	c, store := tinyContents(t)
	long := "/etc/" + strings.Repeat("d", 60) + "/" + strings.Repeat("f", 60) + ".conf"
	deep := "/opt/" + strings.Repeat("abcdefghi/", 20) + "f.conf" // '/'s past the prefix's reach
	c.Files = append(c.Files, render.File{Path: long, Mode: 0o644, Data: []byte("x")}, render.File{Path: deep, Mode: 0o644, Data: []byte("y")})
	b := writeContents(t, c, store)
	var got []string
	_, _, err := bundle.Read(bytes.NewReader(b), bundle.Visitor{File: func(f bundle.FileEntry, r io.Reader) error {
		got = append(got, f.Path)
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	if all := strings.Join(got, " "); !strings.Contains(all, long) || !strings.Contains(all, deep) {
		t.Errorf("files read %v, want %s and %s among them", got, long, deep)
	}
}

// oneByteReader hands out one byte per Read, to split every marker.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) { return o.r.Read(p[:min(1, len(p))]) }

// TestWorkerKeyFoundAcrossReads: the scan for key markers in a worker's
// files must not depend on how reads split the content.
func TestWorkerKeyFoundAcrossReads(t *testing.T) {
	data, err := readVector("worker-embedded-key")
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = bundle.Read(oneByteReader{bytes.NewReader(data)}, bundle.Visitor{File: func(f bundle.FileEntry, r io.Reader) error {
		buf := make([]byte, 3)
		for {
			if _, err := r.Read(buf); err != nil {
				if err == io.EOF {
					return nil
				}
				return err
			}
		}
	}})
	var ee *bundle.EntryError
	if !errors.As(err, &ee) || !strings.Contains(err.Error(), `holds "client-key-data"`) || strings.Contains(err.Error(), "c2VjcmV0") {
		t.Errorf("err = %v, want the marker named and the key not shown", err)
	}
}

func readVector(name string) ([]byte, error) {
	return os.ReadFile(filepath.Join("testdata", "bundles", name+".bundle"))
}
