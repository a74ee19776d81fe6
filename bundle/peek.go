package bundle

import (
	"archive/tar"
	"fmt"
	"io"
)

// ReadManifest reads only the first entry, the manifest, and decodes it.
// Nothing else is verified, so the result says what a bundle claims to be,
// not that it is intact: it serves decisions such as whether to rebuild a
// bundle, never trust (Read serves that).
func ReadManifest(r io.Reader) (*Manifest, error) {
	tr := tar.NewReader(r)
	hdr, err := tr.Next()
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", ManifestName, truncated(err))
	}
	if hdr.Name != ManifestName || hdr.Size > maxManifestLen {
		return nil, fmt.Errorf("reading %s: the first entry is %s (%d bytes)", ManifestName, hdr.Name, hdr.Size)
	}
	b, err := io.ReadAll(tr)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", ManifestName, truncated(err))
	}
	return DecodeManifest(b)
}
