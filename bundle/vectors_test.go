package bundle_test

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

var update = flag.Bool("update", false, "rewrite testdata/bundles")

// memStore serves blobs from memory.
type memStore map[v1.Hash][]byte

func (m memStore) Open(h v1.Hash) (io.ReadCloser, error) {
	b, ok := m[h]
	if !ok {
		return nil, errors.New("no blob " + h.String())
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

// tinyBundle is a small valid bundle built from fixed inputs.
func tinyBundle(t testing.TB) []byte {
	t.Helper()
	c, store := tinyContents(t)
	return writeContents(t, c, store)
}

func writeContents(t testing.TB, c bundle.Contents, store bundle.BlobStore) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, _, err := bundle.Write(&buf, c, store); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// tinyContents is what tinyBundle holds: a worker with two files and one
// single-layer image.
func tinyContents(t testing.TB) (bundle.Contents, memStore) {
	t.Helper()
	layer := static.NewLayer([]byte("layer bytes"), types.OCILayer)
	img, err := mutate.AppendLayers(mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON), layer)
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: "amd64", RootFS: v1.RootFS{Type: "layers", DiffIDs: []v1.Hash{mustDigest(t, layer)}}})
	if err != nil {
		t.Fatal(err)
	}
	store := memStore{}
	raw, _ := img.RawManifest()
	digest, _ := img.Digest()
	store[digest] = raw
	m, _ := img.Manifest()
	cfg, _ := img.RawConfigFile()
	store[m.Config.Digest] = cfg
	store[mustDigest(t, layer)] = []byte("layer bytes")
	c := bundle.Contents{
		Cluster: "v", Node: "w1", Role: "worker", KubernetesVersion: render.KubernetesVersion,
		BuildTime: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
		Files: []render.File{
			{Path: "/etc/kubernetes/bootstrap-kubelet.conf", Mode: 0o600, Data: []byte("token: secret\n")},
			{Path: "/etc/kubernetes/pki/ca.crt", Mode: 0o644, Data: []byte("ca\n")},
		},
		Images: []bundle.Image{{
			Ref: "registry.example/pause:1", Platform: "linux/amd64",
			Manifest: v1.Descriptor{MediaType: types.OCIManifestSchema1, Digest: digest, Size: int64(len(raw))},
			Blobs:    []v1.Descriptor{m.Config, m.Layers[0]},
		}},
	}
	return c, store
}

func mustDigest(t testing.TB, l v1.Layer) v1.Hash {
	h, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

type tarEntry struct {
	hdr  tar.Header
	data []byte
}

func entries(t testing.TB, b []byte) []tarEntry {
	t.Helper()
	var out []tarEntry
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		d, _ := io.ReadAll(tr)
		out = append(out, tarEntry{*h, d})
	}
}

func retar(t testing.TB, es []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range es {
		h := e.hdr
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		tw.Write(e.data)
	}
	tw.Close()
	return buf.Bytes()
}

func find(es []tarEntry, prefix string) int {
	for i, e := range es {
		if strings.HasPrefix(e.hdr.Name, prefix) {
			return i
		}
	}
	panic("no entry " + prefix)
}

// vectors derives each malformed bundle from the valid one; each names the
// error it must produce.
func vectors(t testing.TB) map[string]struct {
	data []byte
	want string
} {
	valid := tinyBundle(t)
	es := func() []tarEntry { return entries(t, valid) }
	with := func(f func([]tarEntry) []tarEntry) []byte { return retar(t, f(es())) }
	boot := "files/etc/kubernetes/bootstrap-kubelet.conf"
	out := map[string]struct {
		data []byte
		want string
	}{}
	add := func(name string, data []byte, want string) {
		out[name] = struct {
			data []byte
			want string
		}{data, want}
	}
	add("valid", valid, "")
	tampered := bytes.Clone(valid)
	i := bytes.Index(tampered, []byte("token: secret"))
	tampered[i] ^= 0x20
	add("tampered", tampered, "entry "+boot+": sha256 mismatch")
	add("truncated", valid[:len(valid)/2], "bundle is truncated")
	add("truncated-at-entry-boundary", valid[:len(valid)-1024], "bundle is truncated")
	add("trailing-garbage", append(bytes.Clone(valid), []byte("more")...), "data after the end of the archive")
	add("path-dotdot", with(func(e []tarEntry) []tarEntry {
		e[find(e, boot)].hdr.Name = "files/../../etc/passwd"
		return e
	}), "entry files/../../etc/passwd: path escapes the bundle")
	add("path-absolute", with(func(e []tarEntry) []tarEntry {
		e[find(e, boot)].hdr.Name = "/etc/kubernetes/bootstrap-kubelet.conf"
		return e
	}), "entry /etc/kubernetes/bootstrap-kubelet.conf: path escapes the bundle")
	add("symlink", with(func(e []tarEntry) []tarEntry {
		j := find(e, boot)
		e[j].hdr.Typeflag, e[j].hdr.Linkname, e[j].hdr.Size, e[j].data = tar.TypeSymlink, "/etc/shadow", 0, nil
		return e
	}), "entry "+boot+": is a symbolic link; a bundle holds regular files only")
	add("hardlink", with(func(e []tarEntry) []tarEntry {
		j := find(e, boot)
		e[j].hdr.Typeflag, e[j].hdr.Linkname, e[j].hdr.Size, e[j].data = tar.TypeLink, "airadm.json", 0, nil
		return e
	}), "entry "+boot+": is a hard link")
	add("device", with(func(e []tarEntry) []tarEntry {
		j := find(e, boot)
		e[j].hdr.Typeflag, e[j].hdr.Devmajor, e[j].hdr.Size, e[j].data = tar.TypeChar, 1, 0, nil
		return e
	}), "entry "+boot+": is a character device")
	add("duplicate", with(func(e []tarEntry) []tarEntry {
		j := find(e, boot)
		return append(e[:j+1], e[j:]...)
	}), "entry "+boot+": duplicate entry")
	add("oversized", with(func(e []tarEntry) []tarEntry {
		j := find(e, boot)
		e[j].data = append(e[j].data, bytes.Repeat([]byte("x"), 1<<16)...)
		return e
	}), "entry "+boot+": size mismatch: got 65550, want 14")
	add("unknown-entry", with(func(e []tarEntry) []tarEntry {
		extra := e[find(e, boot)]
		extra.hdr.Name = "files/etc/cron.d/evil"
		return append(e, extra)
	}), "entry files/etc/cron.d/evil: unknown entry: not in the manifest")
	add("missing-entry", with(func(e []tarEntry) []tarEntry {
		j := find(e, boot)
		return append(e[:j], e[j+1:]...)
	}), "entry "+boot+": missing where files/etc/kubernetes/pki/ca.crt stands")
	add("manifest-not-first", with(func(e []tarEntry) []tarEntry {
		e[0], e[1] = e[1], e[0]
		return e
	}), "entry "+boot+": the first entry must be airadm.json")
	add("manifest-unknown-field", with(func(e []tarEntry) []tarEntry {
		e[0].data = bytes.Replace(e[0].data, []byte(`"formatVersion": 1,`), []byte(`"formatVersion": 1, "hooks": ["rm -rf /"],`), 1)
		return e
	}), `entry airadm.json: decoding airadm.json: member "hooks" is unknown`)
	add("manifest-escaping-path", with(func(e []tarEntry) []tarEntry {
		e[0].data = bytes.Replace(e[0].data, []byte(`"/etc/kubernetes/pki/ca.crt"`), []byte(`"/etc/kubernetes/../shadow"`), 1)
		return e
	}), `entry airadm.json: checking airadm.json: file path "/etc/kubernetes/../shadow" is not a clean absolute path`)
	add("dangling-image-blob", with(func(e []tarEntry) []tarEntry {
		// Drop the layer from both the manifest's blob list and the tar.
		var layer string
		for _, x := range e {
			if x.hdr.Name == "images/blobs/sha256/"+strings.TrimPrefix(string(mustLayer(t)), "sha256:") {
				layer = x.hdr.Name
			}
		}
		var out []tarEntry
		for _, x := range e {
			if x.hdr.Name != layer {
				out = append(out, x)
			}
		}
		var m map[string]any
		json.Unmarshal(out[0].data, &m)
		var keep []any
		for _, b := range m["blobs"].([]any) {
			if b.(map[string]any)["digest"] != string(mustLayer(t)) {
				keep = append(keep, b)
			}
		}
		m["blobs"] = keep
		out[0].data, _ = json.Marshal(m)
		return out
	}), "references "+string(mustLayer(t))+", which the bundle lacks")

	// Headers: only the ustar header Write produces is a bundle's.
	ustar, gnu := "ustar\x0000", "ustar  \x00"
	add("pax-header", with(func(e []tarEntry) []tarEntry {
		j := find(e, boot)
		e[j].hdr.Format, e[j].hdr.PAXRecords = tar.FormatPAX, map[string]string{"comment": "hi"}
		return e
	}), "entry files/etc/kubernetes/PaxHeaders.0/bootstrap-kubelet.conf: is a pax extended header; a bundle holds ustar headers only")
	// The ustar name says one thing, the pax record another: archive/tar
	// would take the pax path, a ustar-only reader the ustar name.
	renamed := patchHeader(t, valid, boot, func(blk []byte) {
		copy(blk[:100], make([]byte, 100))
		copy(blk, "files/etc/cron.d/evil")
	})
	add("pax-rename", insertBefore(t, renamed, "files/etc/cron.d/evil",
		rawEntry("files/etc/cron.d/PaxHeaders.0/evil", 'x', ustar, []byte(paxRecord("path", boot)))),
		"entry files/etc/cron.d/PaxHeaders.0/evil: is a pax extended header")
	add("gnu-long-name", insertBefore(t, renamed, "files/etc/cron.d/evil",
		rawEntry("././@LongLink", 'L', gnu, append([]byte(boot), 0))),
		"entry ././@LongLink: is a GNU tar header; a bundle holds ustar headers only")
	add("gnu-header", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[257:265], gnu) }),
		"entry "+boot+": is a GNU tar header")
	add("v7-header", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[257:265], make([]byte, 8)) }),
		"entry "+boot+": is not a ustar header")
	add("typeflag-nul", patchHeader(t, valid, boot, func(blk []byte) { blk[156] = 0 }),
		"entry "+boot+": has typeflag NUL; a regular file's typeflag must be '0'")
	add("header-mtime", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[136:148], fmt.Sprintf("%011o\x00", 1767225600)) }),
		"entry "+boot+": header mtime is 1767225600 (2026-01-01T00:00:00Z); writers write 0")
	add("header-uid", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[108:116], "0001750\x00") }),
		"entry "+boot+": header uid is 1000; writers write 0")
	add("header-gid", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[116:124], "0001750\x00") }),
		"entry "+boot+": header gid is 1000; writers write 0")
	add("header-uname", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[265:297], "root") }),
		"entry "+boot+`: header user name is "root"; writers leave it empty`)
	add("header-gname", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[297:329], "root") }),
		"entry "+boot+`: header group name is "root"; writers leave it empty`)
	add("header-linkname", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[157:257], "/etc/shadow") }),
		"entry "+boot+`: header linkname is "/etc/shadow"; writers leave it empty`)
	add("header-mode", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[100:108], "0000644\x00") }),
		"entry "+boot+": header mode is 0644; writers write 0600")
	add("header-manifest-mode", patchHeader(t, valid, bundle.ManifestName, func(blk []byte) { copy(blk[100:108], "0000600\x00") }),
		"entry airadm.json: header mode is 0600; writers write 0644")
	add("header-name-hidden-bytes", patchHeader(t, valid, boot, func(blk []byte) { copy(blk[len(boot)+1:], "x") }),
		"entry "+boot+": header name has bytes after its terminating NUL")
	add("header-name-split", patchHeader(t, valid, boot, func(blk []byte) {
		copy(blk[:100], make([]byte, 100))
		copy(blk, "bootstrap-kubelet.conf")
		copy(blk[345:], "files/etc/kubernetes")
	}), "entry "+boot+`: header splits the name as prefix "files/etc/kubernetes" and name "bootstrap-kubelet.conf"; writers write "" and "`+boot+`"`)
	add("header-size-base256", patchHeader(t, valid, boot, func(blk []byte) {
		copy(blk[124:136], []byte{0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 14})
	}), "entry "+boot+`: header size "\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x0e" is not 11 octal digits and a NUL`)

	// Bytes outside entries: padding, the end marker and what follows.
	padded := bytes.Clone(valid)
	padded[headerAt(t, valid, boot)+512+len("token: secret\n")+3] = 'x'
	add("padding-not-zero", padded, "entry "+boot+": the padding after the entry is not zero")
	add("trailing-zeros", append(bytes.Clone(valid), make([]byte, 512)...), "data after the end of the archive")

	// The manifest's JSON: exact member names, once each, all present, no
	// nulls, strict sorts, whole UTC seconds, no characters to escape.
	manifest := func(old, new string) []byte {
		return with(func(e []tarEntry) []tarEntry {
			if !bytes.Contains(e[0].data, []byte(old)) {
				t.Fatalf("manifest has no %s", old)
			}
			e[0].data = bytes.Replace(e[0].data, []byte(old), []byte(new), 1)
			return e
		})
	}
	add("manifest-member-case", manifest(`"cluster":`, `"Cluster":`),
		`entry airadm.json: decoding airadm.json: member "Cluster" is unknown (member names are case-sensitive: "cluster")`)
	add("manifest-member-twice", manifest(`"node": "w1",`, `"node": "cp1", "node": "w1",`),
		`entry airadm.json: decoding airadm.json: member "node" appears twice`)
	add("manifest-member-missing", manifest(`"kubernetesVersion": "`+render.KubernetesVersion+`",`, ``),
		`entry airadm.json: decoding airadm.json: member "kubernetesVersion" is missing`)
	add("manifest-member-null", manifest(`"kubernetesVersion": "`+render.KubernetesVersion+`"`, `"kubernetesVersion": null`),
		`entry airadm.json: decoding airadm.json: kubernetesVersion is null, want a string`)
	add("manifest-buildtime-offset", manifest(`"2026-01-01T00:00:00Z"`, `"2026-01-01T01:00:00.5+01:00"`),
		`entry airadm.json: decoding airadm.json: buildTime "2026-01-01T01:00:00.5+01:00" is not a UTC time in whole seconds (YYYY-MM-DDTHH:MM:SSZ)`)
	add("manifest-files-unsorted", with(func(e []tarEntry) []tarEntry {
		var m map[string]any
		json.Unmarshal(e[0].data, &m)
		fs := m["files"].([]any)
		fs[0], fs[1] = fs[1], fs[0]
		e[0].data, _ = json.Marshal(m)
		return e
	}), `entry airadm.json: checking airadm.json: file /etc/kubernetes/bootstrap-kubelet.conf is listed after /etc/kubernetes/pki/ca.crt: the list must be sorted strictly ascending by bytes`)
	add("manifest-ref-needs-escaping", with(func(e []tarEntry) []tarEntry {
		ref := "registry.example/pause:1"
		e[0].data = bytes.ReplaceAll(e[0].data, []byte(`"`+ref+`"`), []byte(`"`+ref+`<x>"`))
		j := find(e, bundle.IndexName)
		e[j].data = bytes.ReplaceAll(e[j].data, []byte(`"`+ref+`"`), []byte(`"`+ref+`\u003cx\u003e"`))
		return e
	}), `entry airadm.json: checking airadm.json: image reference "registry.example/pause:1<x>" has characters outside [A-Za-z0-9._:/@+-]`)

	// A worker's bundle carries no private key, by path or by content.
	asWorker := func(extra render.File) []byte {
		c, store := tinyContents(t)
		c.Role = "control-plane"
		c.Files = append(c.Files, extra)
		b := writeContents(t, c, store)
		es := entries(t, b)
		es[0].data = bytes.Replace(es[0].data, []byte(`"role": "control-plane"`), []byte(`"role": "worker"`), 1)
		return retar(t, es)
	}
	add("worker-ca-key", asWorker(render.File{Path: "/etc/kubernetes/pki/ca.key", Mode: 0o600, Data: []byte("-----BEGIN EC PRIVATE KEY-----\n")}),
		"entry airadm.json: checking airadm.json: file /etc/kubernetes/pki/ca.key: a worker's bundle must not carry a private key")
	add("worker-admin-conf", asWorker(render.File{Path: "/etc/kubernetes/admin.conf", Mode: 0o600, Data: []byte("users: []\n")}),
		"entry airadm.json: checking airadm.json: file /etc/kubernetes/admin.conf: a worker's bundle must not carry a kubeconfig with a client key")
	add("worker-embedded-key", asWorker(render.File{Path: "/etc/kubernetes/kubelet.conf", Mode: 0o600, Data: []byte("users:\n- user:\n    client-key-data: c2VjcmV0\n")}),
		`entry files/etc/kubernetes/kubelet.conf: holds "client-key-data": a worker's bundle must not carry a private key`)
	return out
}

func mustLayer(t testing.TB) string {
	h, err := static.NewLayer([]byte("layer bytes"), types.OCILayer).Digest()
	if err != nil {
		t.Fatal(err)
	}
	return h.String()
}

// TestVectors reads each committed vector and expects exactly its declared
// outcome; -update regenerates them from the valid bundle.
func TestVectors(t *testing.T) {
	vs := vectors(t)
	dir := "testdata/bundles"
	if *update {
		os.MkdirAll(dir, 0o755)
		expect := map[string]string{}
		for name, v := range vs {
			if err := os.WriteFile(filepath.Join(dir, name+".bundle"), v.data, 0o644); err != nil {
				t.Fatal(err)
			}
			expect[name] = v.want
		}
		b, _ := json.MarshalIndent(expect, "", "  ")
		os.WriteFile(filepath.Join(dir, "vectors.json"), append(b, '\n'), 0o644)
	}
	b, err := os.ReadFile(filepath.Join(dir, "vectors.json"))
	if err != nil {
		t.Fatalf("%v (go test ./bundle -update writes the vectors)", err)
	}
	var expect map[string]string
	if err := json.Unmarshal(b, &expect); err != nil {
		t.Fatal(err)
	}
	if len(expect) != len(vs) {
		t.Errorf("vectors.json has %d vectors, the generator %d: run -update", len(expect), len(vs))
	}
	for name, want := range expect {
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join(dir, name+".bundle"))
			if err != nil {
				t.Fatal(err)
			}
			var files []string
			_, _, err = bundle.Read(bytes.NewReader(data), bundle.Visitor{File: func(f bundle.FileEntry, r io.Reader) error {
				files = append(files, f.Path)
				_, err := io.Copy(io.Discard, r)
				return err
			}})
			if want == "" {
				if err != nil {
					t.Fatalf("valid bundle refused: %v", err)
				}
				return
			}
			var ee *bundle.EntryError
			if !errors.As(err, &ee) {
				t.Fatalf("err = %v (%T), want an *EntryError containing %q", err, err, want)
			}
			if !strings.Contains(err.Error(), want) {
				t.Errorf("err = %q, want it to contain %q", err, want)
			}
		})
	}
}

// FuzzRead feeds arbitrary bytes to the reader: it must never panic, and
// whatever it accepts must be a bundle whose every entry it verified.
func FuzzRead(f *testing.F) {
	files, _ := filepath.Glob("testdata/bundles/*.bundle")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, digest, err := bundle.Read(bytes.NewReader(data), bundle.Visitor{})
		if err != nil {
			var ee *bundle.EntryError
			if !errors.As(err, &ee) {
				t.Fatalf("error of type %T: %v", err, err)
			}
			return
		}
		if m == nil || !strings.HasPrefix(digest, "sha256:") {
			t.Fatal("accepted without a manifest")
		}
	})
}

// untar extracts a bundle the way any tar tool would, to check that
// standard readers can use its images/ layout.
func untar(b []byte, dir string) error {
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, h.Name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			return err
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			return err
		}
	}
}
