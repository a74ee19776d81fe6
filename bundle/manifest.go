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
	"io/fs"
	"path"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// FormatVersion is the version of the format this package writes and reads.
const FormatVersion = 1

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
}

// FileEntry is one host file, stored at files/<path without leading slash>.
type FileEntry struct {
	Path   string `json:"path"`
	Mode   string `json:"mode"` // octal, such as "0600"
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"` // lowercase hex
}

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
)

// validate checks what a reader must not trust: paths that could escape,
// duplicates, malformed digests, images without their blobs.
func (m *Manifest) validate() error {
	if m.FormatVersion != FormatVersion {
		return fmt.Errorf("format version %d is not supported (this airadm reads version %d)", m.FormatVersion, FormatVersion)
	}
	if m.Node == "" || m.Cluster == "" || (m.Role != "control-plane" && m.Role != "worker") {
		return fmt.Errorf("cluster, node and role (control-plane or worker) are required")
	}
	seen := map[string]bool{}
	for _, f := range m.Files {
		if !strings.HasPrefix(f.Path, "/") || path.Clean(f.Path) != f.Path || f.Path == "/" || strings.Contains(f.Path, "\\") {
			return fmt.Errorf("file path %q is not a clean absolute path", f.Path)
		}
		if seen[f.Path] {
			return fmt.Errorf("file %s is listed twice", f.Path)
		}
		seen[f.Path] = true
		if _, err := f.FileMode(); err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
		if f.Size < 0 || !hexRE.MatchString(f.SHA256) {
			return fmt.Errorf("file %s: bad size or sha256", f.Path)
		}
	}
	blobs := map[string]int64{}
	for _, b := range m.Blobs {
		if !digestRE.MatchString(b.Digest) || b.Size < 0 {
			return fmt.Errorf("blob %q: bad digest or size", b.Digest)
		}
		if _, dup := blobs[b.Digest]; dup {
			return fmt.Errorf("blob %s is listed twice", b.Digest)
		}
		blobs[b.Digest] = b.Size
	}
	refs := map[string]bool{}
	for _, im := range m.Images {
		if refs[im.Ref] {
			return fmt.Errorf("image %s is listed twice", im.Ref)
		}
		refs[im.Ref] = true
		size, ok := blobs[im.Digest]
		if !ok || size != im.Size {
			return fmt.Errorf("image %s: manifest blob %s is not in the bundle", im.Ref, im.Digest)
		}
		if im.MediaType != string(types.OCIManifestSchema1) && im.MediaType != string(types.DockerManifestSchema2) {
			return fmt.Errorf("image %s: media type %q is not a single-platform image manifest", im.Ref, im.MediaType)
		}
	}
	return nil
}

// entries lists every tar entry after the manifest with its expected size,
// in the order a bundle holds them.
func (m *Manifest) entries(index []byte) []expected {
	var out []expected
	for _, f := range m.Files {
		out = append(out, expected{name: entryName(f.Path), size: f.Size, sha256: f.SHA256, file: f.Path})
	}
	for _, b := range m.Blobs {
		out = append(out, expected{name: blobName(b.Digest), size: b.Size, sha256: strings.TrimPrefix(b.Digest, "sha256:")})
	}
	out = append(out,
		expected{name: IndexName, size: int64(len(index)), content: index},
		expected{name: OCILayoutName, size: int64(len(ociLayout)), content: []byte(ociLayout)})
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

type expected struct {
	name    string
	size    int64
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

// DecodeManifest parses airadm.json strictly: unknown fields are errors, so
// a newer format cannot be half-understood.
func DecodeManifest(b []byte) (*Manifest, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", ManifestName, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("decoding %s: trailing data", ManifestName)
	}
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("checking %s: %w", ManifestName, err)
	}
	return &m, nil
}
