package bundle

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"
)

// Source resolves image references to a platform's image.
type Source interface {
	// Image returns the platform's image for ref and, when ref names a
	// multi-platform index, that index's digest.
	Image(ctx context.Context, ref string, platform v1.Platform) (v1.Image, string, error)
}

// Registry pulls from registries, authenticating with the Docker config
// keychain. Loopback registries are spoken to over plain HTTP.
type Registry struct {
	Transport http.RoundTripper // nil: the default
}

func (r Registry) Image(ctx context.Context, ref string, platform v1.Platform) (v1.Image, string, error) {
	n, err := name.ParseReference(ref, name.StrictValidation)
	if err != nil {
		return nil, "", fmt.Errorf("parsing %s: %w", ref, err)
	}
	opts := []remote.Option{remote.WithContext(ctx), remote.WithPlatform(platform), remote.WithAuthFromKeychain(authn.DefaultKeychain)}
	if r.Transport != nil {
		opts = append(opts, remote.WithTransport(r.Transport))
	}
	desc, err := remote.Get(n, opts...)
	if err != nil {
		return nil, "", fmt.Errorf("resolving %s: %w", ref, err)
	}
	var index string
	if desc.MediaType.IsIndex() {
		index = desc.Digest.String()
	}
	img, err := desc.Image()
	if err != nil {
		return nil, "", fmt.Errorf("resolving %s for %s: %w", ref, platform, err)
	}
	return img, index, nil
}

// Layout reads images from an OCI image layout directory, found by their
// fully qualified org.opencontainers.image.ref.name annotation: a build
// machine that is itself offline.
type Layout struct {
	Path string
}

func (l Layout) Image(_ context.Context, ref string, platform v1.Platform) (v1.Image, string, error) {
	p, err := layout.FromPath(l.Path)
	if err != nil {
		return nil, "", fmt.Errorf("opening image layout %s: %w", l.Path, err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		return nil, "", fmt.Errorf("reading image layout %s: %w", l.Path, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, "", fmt.Errorf("reading image layout %s: %w", l.Path, err)
	}
	for _, d := range im.Manifests {
		if d.Annotations["org.opencontainers.image.ref.name"] != ref {
			continue
		}
		if !d.MediaType.IsIndex() {
			img, err := idx.Image(d.Digest)
			return img, "", err
		}
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, "", err
		}
		cm, err := child.IndexManifest()
		if err != nil {
			return nil, "", err
		}
		for _, c := range cm.Manifests {
			if c.Platform != nil && c.Platform.Satisfies(platform) && c.MediaType.IsImage() {
				img, err := child.Image(c.Digest)
				return img, d.Digest.String(), err
			}
		}
		return nil, "", fmt.Errorf("image %s in %s has no %s manifest", ref, l.Path, platform)
	}
	return nil, "", fmt.Errorf("image %s is not in the layout %s (no matching org.opencontainers.image.ref.name)", ref, l.Path)
}

// Puller fetches images into a Cache, each blob once however many images
// or nodes share it, with at most Jobs transfers at a time.
type Puller struct {
	Source   Source
	Cache    *Cache
	Platform v1.Platform
	Jobs     int
	// Progress, if set, is called after each blob with the running totals.
	Progress func(p Progress)
}

// Progress is a snapshot of a pull.
type Progress struct {
	Blobs, TotalBlobs int
	Bytes, TotalBytes int64
}

// Pull resolves every ref and makes sure all its blobs are cached. The
// result is in the order of refs.
func (p *Puller) Pull(ctx context.Context, refs []string) ([]Image, error) {
	jobs := p.Jobs
	if jobs < 1 {
		jobs = 4
	}
	images := make([]Image, len(refs))
	var mu sync.Mutex
	fetches := map[v1.Hash]blobFetch{}
	// The images keep the context for their later blob reads, so resolve
	// with the caller's, not a group context that ends with this phase.
	var g errgroup.Group
	g.SetLimit(jobs)
	for i, ref := range refs {
		g.Go(func() error {
			img, index, err := p.Source.Image(ctx, ref, p.Platform)
			if err != nil {
				return err
			}
			out, blobs, err := describe(ref, p.Platform, img, index)
			if err != nil {
				return err
			}
			images[i] = out
			mu.Lock()
			defer mu.Unlock()
			for _, b := range blobs {
				if _, ok := fetches[b.desc.Digest]; !ok {
					fetches[b.desc.Digest] = b
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}

	var total Progress
	var todo []blobFetch
	for _, f := range fetches {
		if p.Cache.Has(f.desc.Digest, f.desc.Size) {
			continue
		}
		todo = append(todo, f)
		total.TotalBlobs++
		total.TotalBytes += f.desc.Size
	}
	// Largest first keeps every worker busy until the end.
	sort.Slice(todo, func(i, j int) bool { return todo[i].desc.Size > todo[j].desc.Size })
	var done atomic.Int64
	var doneBytes atomic.Int64
	var flight singleflight.Group
	fg, gctx := errgroup.WithContext(ctx)
	fg.SetLimit(jobs)
	for _, f := range todo {
		fg.Go(func() error {
			if gctx.Err() != nil {
				return gctx.Err()
			}
			_, err, _ := flight.Do(f.desc.Digest.String(), func() (any, error) {
				rc, err := f.open()
				if err != nil {
					return nil, fmt.Errorf("fetching %s: %w", f.desc.Digest, err)
				}
				defer rc.Close()
				return nil, p.Cache.Put(f.desc.Digest, f.desc.Size, rc)
			})
			if err != nil {
				return err
			}
			if p.Progress != nil {
				p.Progress(Progress{Blobs: int(done.Add(1)), TotalBlobs: total.TotalBlobs, Bytes: doneBytes.Add(f.desc.Size), TotalBytes: total.TotalBytes})
			}
			return nil
		})
	}
	if err := fg.Wait(); err != nil {
		return nil, err
	}
	return images, nil
}

type blobFetch struct {
	desc v1.Descriptor
	open func() (io.ReadCloser, error)
}

// describe lists the image's manifest, config and layers, each with a way to
// read its stored bytes: layers are copied compressed, exactly as stored.
func describe(ref string, platform v1.Platform, img v1.Image, index string) (Image, []blobFetch, error) {
	wrap := func(err error) error { return fmt.Errorf("reading %s: %w", ref, err) }
	raw, err := img.RawManifest()
	if err != nil {
		return Image{}, nil, wrap(err)
	}
	digest, err := img.Digest()
	if err != nil {
		return Image{}, nil, wrap(err)
	}
	mt, err := img.MediaType()
	if err != nil {
		return Image{}, nil, wrap(err)
	}
	m, err := img.Manifest()
	if err != nil {
		return Image{}, nil, wrap(err)
	}
	manifest := v1.Descriptor{MediaType: mt, Digest: digest, Size: int64(len(raw))}
	out := Image{Ref: ref, Platform: platform.String(), Manifest: manifest, IndexDigest: index}
	blobs := []blobFetch{{manifest, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil }}}
	config := m.Config
	blobs = append(blobs, blobFetch{config, func() (io.ReadCloser, error) {
		b, err := img.RawConfigFile()
		if err != nil {
			return nil, err
		}
		return io.NopCloser(bytes.NewReader(b)), nil
	}})
	out.Blobs = append(out.Blobs, config)
	for _, l := range m.Layers {
		out.Blobs = append(out.Blobs, l)
		blobs = append(blobs, blobFetch{l, func() (io.ReadCloser, error) {
			layer, err := img.LayerByDigest(l.Digest)
			if err != nil {
				return nil, err
			}
			return layer.Compressed()
		}})
	}
	return out, blobs, nil
}
