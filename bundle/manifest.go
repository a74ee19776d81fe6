// Package bundle is airadm's single-file node bundle: an uncompressed tar
// holding a manifest, the node's files and an OCI image layout. It writes
// bundles deterministically, pulls images into a shared content-addressed
// cache, and reads bundles verifying every byte against the manifest before
// anything reaches the host. docs/bundle-format.md is the specification.
package bundle

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"path"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// FormatVersion is the newest version of the format this package writes
// and reads. Writers write the lowest version that describes a bundle:
// version 1 unless it uses a member version 2 added (recipient,
// files[].encryption), so bundles without encrypted files stay readable by
// version-1 readers and keep their bytes.
const FormatVersion = 2

// Encryption is the one value of files[].encryption: the entry's data is an
// age file (age-encryption.org/v1) whose plaintext is the host file.
const Encryption = "age"

// Entry names inside the tar.
const (
	ManifestName   = "airadm.json"
	filesPrefix    = "files/"
	blobsPrefix    = "images/blobs/sha256/"
	IndexName      = "images/index.json"
	OCILayoutName  = "images/oci-layout"
	maxManifestLen = 64 << 20
)

// Manifest is airadm.json, the bundle's table of contents.
type Manifest struct {
	FormatVersion     int          `json:"formatVersion"`
	Cluster           string       `json:"cluster"`
	Node              string       `json:"node"`
	Role              string       `json:"role"`
	KubernetesVersion string       `json:"kubernetesVersion"`
	BuildTime         time.Time    `json:"buildTime"`
	Files             []FileEntry  `json:"files"`
	Images            []ImageEntry `json:"images"`
	Blobs             []BlobEntry  `json:"blobs"`
	// Pack, when set, makes this a thin bundle: its images and blobs are
	// not entries of the bundle but of the image pack whose digest (the
	// sha256 of the pack's index) this is (docs/bundle-format.md).
	Pack string `json:"pack,omitempty"`
	// Recipient is the node's recipient from cluster.toml (an age X25519
	// recipient or an SSH ed25519 public key without comment), to which
	// every encrypted file is encrypted; set only if some file is.
	Recipient string `json:"recipient,omitempty"`
}

// FileEntry is one host file, stored at files/<path without leading slash>.
type FileEntry struct {
	Path   string `json:"path"`
	Mode   string `json:"mode"` // octal, such as "0600"
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"` // lowercase hex
	// Encryption is "age" when the entry's data (which Size and SHA256
	// describe) is an age file encrypted to the manifest's Recipient.
	Encryption string `json:"encryption,omitempty"`
}

// Encrypted reports whether the entry holds ciphertext.
func (f FileEntry) Encrypted() bool { return f.Encryption != "" }

// ImageEntry is one image of the OCI layout: the platform-specific manifest
// that its reference resolves to on the build machine.
type ImageEntry struct {
	Ref       string `json:"ref"`
	Digest    string `json:"digest"`
	MediaType string `json:"mediaType"`
	Size      int64  `json:"size"`
	// TotalSize adds up the manifest, config and layers.
	TotalSize int64  `json:"totalSize"`
	Platform  string `json:"platform"`
	// IndexDigest is the digest the reference named at build time when it
	// was a multi-platform index; only the chosen platform travels.
	IndexDigest string `json:"indexDigest,omitempty"`
}

// BlobEntry is one blob of the layout, stored at images/blobs/sha256/<hex>.
type BlobEntry struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// FileMode parses the entry's octal mode.
func (f FileEntry) FileMode() (fs.FileMode, error) {
	m, err := strconv.ParseUint(f.Mode, 8, 32)
	if err != nil || m > 0o777 || len(f.Mode) != 4 || f.Mode[0] != '0' {
		return 0, fmt.Errorf("mode %q is not four octal digits without special bits", f.Mode)
	}
	return fs.FileMode(m), nil
}

// entryName is where a host file lives in the tar.
func entryName(hostPath string) string { return filesPrefix + strings.TrimPrefix(hostPath, "/") }

func blobName(digest string) string { return blobsPrefix + strings.TrimPrefix(digest, "sha256:") }

var (
	hexRE    = regexp.MustCompile(`^[0-9a-f]{64}$`)
	digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	// refRE keeps references to characters that need no JSON escaping, so
	// that images/index.json has one spelling (docs/bundle-format.md).
	refRE      = regexp.MustCompile(`^[A-Za-z0-9._:/@+-]+$`)
	platformRE = regexp.MustCompile(`^[a-z0-9._-]+/[a-z0-9._-]+(/[a-z0-9._-]+)?$`)
	// recipientRE is the manifest's spelling of a recipient: canonical, with
	// no comment, so that one key has one spelling.
	recipientRE = regexp.MustCompile(`^(age1[02-9ac-hj-np-z]{58}|ssh-ed25519 [A-Za-z0-9+/]+={0,2})$`)
)

// validate checks what a reader must not trust: paths that could escape,
// duplicates and order, malformed digests, references and platforms,
// images without their blobs, and private keys in a worker's bundle.
func (m *Manifest) validate() error {
	if m.FormatVersion < 1 || m.FormatVersion > FormatVersion {
		return fmt.Errorf("format version %d is not supported (this airadm reads versions 1 to %d)", m.FormatVersion, FormatVersion)
	}
	switch want := m.lowestVersion(); {
	case m.FormatVersion < want:
		return fmt.Errorf("format version is %d, but member %q is version %d's", m.FormatVersion, m.v2Member(), want)
	case m.FormatVersion > want:
		return fmt.Errorf("format version is %d, but the manifest uses nothing newer than version %d: writers write the lowest version that describes the bundle", m.FormatVersion, want)
	}
	encrypted := false
	for _, f := range m.Files {
		if f.Encryption != "" && f.Encryption != Encryption {
			return fmt.Errorf("file %s: encryption %q is not %q", f.Path, f.Encryption, Encryption)
		}
		encrypted = encrypted || f.Encrypted()
	}
	if encrypted != (m.Recipient != "") {
		return fmt.Errorf("recipient and encrypted files go together: a manifest names a recipient exactly when some file is encrypted")
	}
	if m.Recipient != "" && !recipientRE.MatchString(m.Recipient) {
		return fmt.Errorf("recipient %q is neither age1... nor ssh-ed25519 <base64>", m.Recipient)
	}
	if m.Node == "" || m.Cluster == "" || (m.Role != "control-plane" && m.Role != "worker") {
		return fmt.Errorf("cluster, node and role (control-plane or worker) are required")
	}
	if m.KubernetesVersion == "" {
		return fmt.Errorf("kubernetesVersion is empty")
	}
	for i, f := range m.Files {
		if !strings.HasPrefix(f.Path, "/") || path.Clean(f.Path) != f.Path || f.Path == "/" || strings.Contains(f.Path, "\\") {
			return fmt.Errorf("file path %q is not a clean absolute path", f.Path)
		}
		if !isASCII(f.Path) {
			// ustar names are ASCII; pax, which could carry more, is refused.
			return fmt.Errorf("file path %q is not ASCII", f.Path)
		}
		if i > 0 {
			if err := ascending("file", m.Files[i-1].Path, f.Path); err != nil {
				return err
			}
		}
		if _, err := f.FileMode(); err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
		if f.Size < 0 || !hexRE.MatchString(f.SHA256) {
			return fmt.Errorf("file %s: bad size or sha256", f.Path)
		}
		if m.Role == "worker" {
			if why := workerForbidden(f.Path); why != "" {
				return fmt.Errorf("file %s: a worker's bundle must not carry %s", f.Path, why)
			}
		}
	}
	if err := validateImages(m.Images, m.Blobs); err != nil {
		return err
	}
	if m.Pack != "" && !digestRE.MatchString(m.Pack) {
		return fmt.Errorf("pack %q is not sha256:<64 lowercase hex>", m.Pack)
	}
	return nil
}

// validateImages checks an image list and its blob list, as a manifest and
// a pack index hold them: sorted, well-formed, each image's manifest blob
// listed.
func validateImages(images []ImageEntry, blobList []BlobEntry) error {
	blobs := map[string]int64{}
	for i, b := range blobList {
		if !digestRE.MatchString(b.Digest) || b.Size < 0 {
			return fmt.Errorf("blob %q: bad digest or size", b.Digest)
		}
		if i > 0 {
			if err := ascending("blob", blobList[i-1].Digest, b.Digest); err != nil {
				return err
			}
		}
		blobs[b.Digest] = b.Size
	}
	for i, im := range images {
		if !refRE.MatchString(im.Ref) {
			return fmt.Errorf("image reference %q has characters outside [A-Za-z0-9._:/@+-]", im.Ref)
		}
		if i > 0 {
			if err := ascending("image", images[i-1].Ref, im.Ref); err != nil {
				return err
			}
		}
		size, ok := blobs[im.Digest]
		if !ok || size != im.Size {
			return fmt.Errorf("image %s: manifest blob %s is not in the bundle", im.Ref, im.Digest)
		}
		if im.MediaType != string(types.OCIManifestSchema1) && im.MediaType != string(types.DockerManifestSchema2) {
			return fmt.Errorf("image %s: media type %q is not a single-platform image manifest", im.Ref, im.MediaType)
		}
		if !platformRE.MatchString(im.Platform) {
			return fmt.Errorf("image %s: platform %q is not os/arch or os/arch/variant", im.Ref, im.Platform)
		}
		if im.IndexDigest != "" && !digestRE.MatchString(im.IndexDigest) {
			return fmt.Errorf("image %s: index digest %q is not sha256:<64 lowercase hex>", im.Ref, im.IndexDigest)
		}
		if im.TotalSize < im.Size {
			return fmt.Errorf("image %s: total size %d is less than its manifest's %d", im.Ref, im.TotalSize, im.Size)
		}
	}
	return nil
}

// lowestVersion is the version a manifest's members call for.
func (m *Manifest) lowestVersion() int {
	if m.v2Member() != "" {
		return 2
	}
	return 1
}

// v2Member names a member in use that version 2 added, or "".
func (m *Manifest) v2Member() string {
	if m.Recipient != "" {
		return "recipient"
	}
	for _, f := range m.Files {
		if f.Encrypted() {
			return "files[].encryption"
		}
	}
	return ""
}

// ascending enforces the manifest's strict sorts, which make the entry
// order, and so the bundle's bytes, a function of the manifest alone.
func ascending(what, prev, cur string) error {
	switch {
	case cur == prev:
		return fmt.Errorf("%s %s is listed twice", what, cur)
	case cur < prev:
		return fmt.Errorf("%s %s is listed after %s: the list must be sorted strictly ascending by bytes", what, cur, prev)
	}
	return nil
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 || s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// workerForbidden says which credential a host path is, if a worker's bundle
// must not carry it: the CA and service-account keys (every *.key kubeadm
// keeps under the PKI directory) and the kubeconfigs that embed a client
// key. A worker gets its own client certificate through TLS bootstrap, so
// any of these on a worker would hand a node more than it needs.
func workerForbidden(p string) string {
	switch {
	case strings.HasPrefix(p, "/etc/kubernetes/pki/") && strings.HasSuffix(p, ".key"):
		return "a private key"
	case workerForbiddenKubeconfigs[p]:
		return "a kubeconfig with a client key"
	}
	return ""
}

var workerForbiddenKubeconfigs = map[string]bool{
	"/etc/kubernetes/admin.conf": true, "/etc/kubernetes/super-admin.conf": true,
	"/etc/kubernetes/controller-manager.conf": true, "/etc/kubernetes/scheduler.conf": true,
}

// contentScanned says whether a worker's file at p is scanned for
// secretMarkers: every file but those in the directories programs live in.
// Host binaries go there, and real ones hold the markers as plain strings
// (kubelet and kubectl carry client-go's client-key-data struct tag), while
// keys and kubeconfigs never belong there.
func contentScanned(p string) bool {
	for _, dir := range []string{"/usr/", "/opt/", "/bin/", "/sbin/", "/lib/", "/lib64/"} {
		if strings.HasPrefix(p, dir) {
			return false
		}
	}
	return true
}

// secretMarkers are the bytes no scanned file of a worker's bundle may contain: the
// end of a PEM private key's BEGIN line (PKCS#1, SEC 1, PKCS#8, encrypted
// or OpenSSH) and a kubeconfig's embedded client key.
var secretMarkers = [][]byte{[]byte("PRIVATE KEY-----"), []byte("client-key-data")}

// entries lists every tar entry after the manifest with its expected size,
// in the order a bundle holds them.
func (m *Manifest) entries(index []byte) []expected {
	var out []expected
	for _, f := range m.Files {
		mode, _ := f.FileMode() // validate checked it
		out = append(out, expected{name: entryName(f.Path), size: f.Size, mode: int64(mode), sha256: f.SHA256, file: f.Path})
	}
	if m.Pack == "" {
		// A thin bundle's images travel in the pack.
		for _, b := range m.Blobs {
			out = append(out, expected{name: blobName(b.Digest), size: b.Size, mode: 0o644, sha256: strings.TrimPrefix(b.Digest, "sha256:")})
		}
		out = append(out,
			expected{name: IndexName, size: int64(len(index)), mode: 0o644, content: index},
			expected{name: OCILayoutName, size: int64(len(ociLayout)), mode: 0o644, content: []byte(ociLayout)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

type expected struct {
	name    string
	size    int64
	mode    int64  // the tar header's mode
	sha256  string // hex, for files and blobs
	content []byte // exact bytes, for the derived layout files
	file    string // host path, for files
}

const ociLayout = `{"imageLayoutVersion":"1.0.0"}`

// IndexJSON derives images/index.json from the image list: one descriptor
// per image with its fully qualified name, so that containerd, skopeo and
// go-containerregistry all find images by the names kubelet asks for.
func (m *Manifest) IndexJSON() ([]byte, error) {
	idx := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex, Manifests: []v1.Descriptor{}}
	imgs := append([]ImageEntry(nil), m.Images...)
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].Ref < imgs[j].Ref })
	for _, im := range imgs {
		h, err := v1.NewHash(im.Digest)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", im.Ref, err)
		}
		p, err := v1.ParsePlatform(im.Platform)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", im.Ref, err)
		}
		idx.Manifests = append(idx.Manifests, v1.Descriptor{
			MediaType: types.MediaType(im.MediaType),
			Size:      im.Size,
			Digest:    h,
			Platform:  p,
			Annotations: map[string]string{
				"org.opencontainers.image.ref.name": im.Ref,
				"io.containerd.image.name":          im.Ref,
			},
		})
	}
	return json.Marshal(idx)
}

// Encode is the manifest's canonical bytes.
func (m *Manifest) Encode() ([]byte, error) {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encoding manifest: %w", err)
	}
	return append(b, '\n'), nil
}

// DecodeManifest parses airadm.json strictly, as docs/bundle-format.md
// requires: UTF-8, every member present exactly once and spelled exactly
// (encoding/json alone would match "Cluster" to cluster and let a second
// "node" win), no unknown members at any depth, integers as plain decimal,
// buildTime in whole UTC seconds. Unknown members are errors so that a
// newer format cannot be half-understood.
func DecodeManifest(b []byte) (*Manifest, error) {
	if len(b) > maxManifestLen {
		return nil, fmt.Errorf("decoding %s: %d bytes is larger than the %d a manifest may have", ManifestName, len(b), maxManifestLen)
	}
	if !utf8.Valid(b) {
		return nil, fmt.Errorf("decoding %s: not valid UTF-8", ManifestName)
	}
	if err := checkSchema(b, "the manifest", manifestSchema); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", ManifestName, err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", ManifestName, err)
	}
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("checking %s: %w", ManifestName, err)
	}
	return &m, nil
}

// kind is what a manifest member's JSON value must be.
type kind int

const (
	kString  kind = iota
	kInteger      // non-negative, in plain decimal without sign, fraction or exponent
	kTime         // YYYY-MM-DDTHH:MM:SSZ
	kArray        // of objects with the member's fields
)

type member struct {
	name     string
	kind     kind
	optional bool
	fields   []member // for kArray
}

// manifestSchema is airadm.json member by member; every member is required
// unless marked optional (docs/bundle-format.md, "The manifest").
var manifestSchema = []member{
	{name: "formatVersion", kind: kInteger},
	{name: "cluster", kind: kString},
	{name: "node", kind: kString},
	{name: "role", kind: kString},
	{name: "kubernetesVersion", kind: kString},
	{name: "buildTime", kind: kTime},
	{name: "files", kind: kArray, fields: []member{
		{name: "path", kind: kString}, {name: "mode", kind: kString}, {name: "size", kind: kInteger}, {name: "sha256", kind: kString},
		{name: "encryption", kind: kString, optional: true},
	}},
	{name: "images", kind: kArray, fields: []member{
		{name: "ref", kind: kString}, {name: "digest", kind: kString}, {name: "mediaType", kind: kString},
		{name: "size", kind: kInteger}, {name: "totalSize", kind: kInteger}, {name: "platform", kind: kString},
		{name: "indexDigest", kind: kString, optional: true},
	}},
	{name: "blobs", kind: kArray, fields: []member{
		{name: "digest", kind: kString}, {name: "size", kind: kInteger},
	}},
	{name: "pack", kind: kString, optional: true},
	{name: "recipient", kind: kString, optional: true},
}

var (
	integerRE   = regexp.MustCompile(`^(0|[1-9][0-9]{0,17})$`) // fits an int64
	buildTimeRE = regexp.MustCompile(`^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$`)
)

// checkSchema walks a document's tokens against its schema (manifestSchema
// or packIndexSchema).
func checkSchema(b []byte, what string, schema []member) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := expectDelim(dec, '{', what); err != nil {
		return err
	}
	if err := checkObject(dec, "", schema); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("data after %s's object", what)
	}
	return nil
}

func expectDelim(dec *json.Decoder, d json.Delim, what string) error {
	t, err := dec.Token()
	if err != nil {
		return err
	}
	if t != d {
		return fmt.Errorf("%s is %s, want %s", what, jsonKind(t), map[json.Delim]string{'{': "an object", '[': "an array"}[d])
	}
	return nil
}

// checkObject checks the members of an object whose '{' was read; at names
// it for errors ("" for the manifest itself, "files[2]" and so on).
func checkObject(dec *json.Decoder, at string, schema []member) error {
	where := func(name string) string {
		if at == "" {
			return fmt.Sprintf("member %q", name)
		}
		return fmt.Sprintf("%s: member %q", at, name)
	}
	seen := map[string]bool{}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		name := t.(string) // an object's tokens alternate name, value
		var m *member
		for i := range schema {
			if schema[i].name == name {
				m = &schema[i]
			}
		}
		if m == nil {
			for _, s := range schema {
				if strings.EqualFold(s.name, name) {
					return fmt.Errorf("%s is unknown (member names are case-sensitive: %q)", where(name), s.name)
				}
			}
			return fmt.Errorf("%s is unknown", where(name))
		}
		if seen[name] {
			return fmt.Errorf("%s appears twice", where(name))
		}
		seen[name] = true
		if err := checkValue(dec, at, *m); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil { // '}'
		return err
	}
	for _, s := range schema {
		if !seen[s.name] && !s.optional {
			return fmt.Errorf("%s is missing", where(s.name))
		}
	}
	return nil
}

func checkValue(dec *json.Decoder, at string, m member) error {
	path := m.name
	if at != "" {
		path = at + "." + m.name
	}
	if m.kind == kArray {
		if err := expectDelim(dec, '[', path); err != nil {
			return err
		}
		for i := 0; dec.More(); i++ {
			elem := fmt.Sprintf("%s[%d]", path, i)
			if err := expectDelim(dec, '{', elem); err != nil {
				return err
			}
			if err := checkObject(dec, elem, m.fields); err != nil {
				return err
			}
		}
		_, err := dec.Token() // ']'
		return err
	}
	t, err := dec.Token()
	if err != nil {
		return err
	}
	switch v := t.(type) {
	case string:
		if m.kind == kTime {
			if _, err := time.Parse(time.RFC3339, v); err != nil || !buildTimeRE.MatchString(v) {
				return fmt.Errorf("%s %q is not a UTC time in whole seconds (YYYY-MM-DDTHH:MM:SSZ)", path, v)
			}
			return nil
		}
		if m.kind == kString {
			if m.optional && v == "" {
				// Writers omit an optional member rather than leave it
				// empty, so there is one spelling of "absent".
				return fmt.Errorf("%s is present but empty; writers omit it", path)
			}
			return nil
		}
	case json.Number:
		if m.kind == kInteger {
			if !integerRE.MatchString(v.String()) {
				return fmt.Errorf("%s %s is not a non-negative integer in plain decimal", path, v)
			}
			return nil
		}
	}
	want := map[kind]string{kString: "a string", kInteger: "an integer", kTime: "a string"}[m.kind]
	return fmt.Errorf("%s is %s, want %s", path, jsonKind(t), want)
}

func jsonKind(t json.Token) string {
	switch v := t.(type) {
	case nil:
		return "null"
	case json.Delim:
		return map[json.Delim]string{'{': "an object", '[': "an array"}[v]
	case string:
		return "a string"
	case json.Number:
		return "a number"
	case bool:
		return "a boolean"
	}
	return fmt.Sprintf("%v", t)
}
