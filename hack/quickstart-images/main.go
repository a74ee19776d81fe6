// Command quickstart-images writes testdata/quickstart/images: an OCI image
// layout holding tiny stand-ins for kubeadm's seven images, each a two-
// platform index (linux/amd64, linux/arm64), so that `airadm build` on the
// quickstart runs fully offline. The stand-ins hold a README and nothing
// runnable; real clusters pull the real images. Run from the repository root:
//
//	go run ./hack/quickstart-images
package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"airadm.dev/airadm/render"
)

func main() {
	if err := run("testdata/quickstart/images"); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart-images:", err)
		os.Exit(1)
	}
}

var created = v1.Time{Time: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}

func run(dir string) error {
	c, err := render.Load("testdata/quickstart/cluster.toml")
	if err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	for _, im := range c.CoreImages() {
		idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
		for _, arch := range []string{"amd64", "arm64"} {
			img, err := standIn(im.Ref, arch)
			if err != nil {
				return err
			}
			idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
				Add:        img,
				Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: arch}},
			})
		}
		if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": im.Ref})); err != nil {
			return err
		}
	}
	fmt.Println(filepath.Clean(dir))
	return nil
}

func standIn(ref, arch string) (v1.Image, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	body := fmt.Sprintf("airadm quickstart stand-in for %s (linux/%s).\nIt holds nothing runnable; real clusters pull the real image.\n", ref, arch)
	if err := tw.WriteHeader(&tar.Header{Name: "README", Mode: 0o644, Size: int64(len(body)), ModTime: created.Time, Format: tar.FormatUSTAR}); err != nil {
		return nil, err
	}
	tw.Write([]byte(body))
	tw.Close()
	raw := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil }, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: arch, Created: created, Config: v1.Config{Labels: map[string]string{"airadm.dev/stand-in": "true"}}})
	if err != nil {
		return nil, err
	}
	return mutate.Append(img, mutate.Addendum{Layer: layer, History: v1.History{Created: created, CreatedBy: "airadm quickstart-images"}})
}
