package bundle

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
)

// ReadManifest reads only the first entry, the manifest, and decodes it.
// Nothing else is verified, so the result says what a bundle claims to be,
// not that it is intact: it serves decisions such as whether to rebuild a
// bundle, never trust (Read serves that).
func ReadManifest(r io.Reader) (*Manifest, error) {
	m, _, err := PeekManifest(r)
	return m, err
}

// PeekManifest is ReadManifest that also returns the manifest's digest, as
// Read computes it, so that a caller can plan with what a bundle claims and
// later check that Read, reading every byte, found the same manifest.
func PeekManifest(r io.Reader) (*Manifest, string, error) {
	tr := tar.NewReader(r)
	hdr, err := tr.Next()
	if err != nil {
		return nil, "", fmt.Errorf("reading %s: %w", ManifestName, truncated(err))
	}
	if hdr.Name != ManifestName || hdr.Size > maxManifestLen {
		return nil, "", fmt.Errorf("reading %s: the first entry is %s (%d bytes)", ManifestName, hdr.Name, hdr.Size)
	}
	b, err := io.ReadAll(tr)
	if err != nil {
		return nil, "", fmt.Errorf("reading %s: %w", ManifestName, truncated(err))
	}
	m, err := DecodeManifest(b)
	if err != nil {
		return nil, "", err
	}
	sum := sha256.Sum256(b)
	return m, "sha256:" + hex.EncodeToString(sum[:]), nil
}
