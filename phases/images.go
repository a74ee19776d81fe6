package phases

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
)

// Where CRI keeps Kubernetes' images, and the label that keeps kubelet's
// image garbage collection away from them (as k0s and kind do).
const (
	criNamespace = "k8s.io"
	pinnedLabel  = "io.cri-containerd.pinned"
	snapshotter  = "overlayfs"
)

// criSocket is the runtime endpoint: the flag, or the bundle's kubelet config.
func (r *Run) criSocket(files map[string][]byte) (string, error) {
	endpoint := r.CRISocket
	if endpoint == "" {
		kc, err := kubeletConfig(files[render.KubeletConfigFile])
		if err != nil {
			return "", err
		}
		endpoint = kc.ContainerRuntimeEndpoint
	}
	path, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok {
		return "", fmt.Errorf("runtime endpoint %q is not a unix:// socket", endpoint)
	}
	return path, nil
}

func (r *Run) containerd(ctx context.Context, files map[string][]byte) (*containerd.Client, error) {
	sock, err := r.criSocket(files)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(sock); err != nil {
		return nil, fmt.Errorf("containerd is not running: %w", err)
	}
	c, err := containerd.New(sock, containerd.WithDefaultNamespace(criNamespace), containerd.WithTimeout(10*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connecting to containerd at %s: %w", sock, err)
	}
	if _, err := c.Version(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("asking containerd at %s for its version: %w", sock, err)
	}
	return c, nil
}

// PackPath is where a thin bundle's image pack is.
func (o Options) PackPath() string {
	if o.Images != "" {
		return o.Images
	}
	return filepath.Join(filepath.Dir(o.Bundle), bundle.PackFile)
}

// openPack opens the image pack and checks it is the one m names, reading
// its index only.
func (o Options) openPack(m *bundle.Manifest) (*bundle.Pack, func(), error) {
	path := o.PackPath()
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, &bundle.EntryError{Err: fmt.Errorf("opening the image pack: %w (the bundle is thin: put the build's %s beside it, or pass --images FILE)", err, bundle.PackFile)}
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("opening the image pack: %w", err)
	}
	var ra io.ReaderAt = f
	if o.WrapPack != nil {
		ra = o.WrapPack(f)
	}
	p, err := bundle.OpenPack(ra, fi.Size())
	if err == nil {
		err = p.Check(m)
	}
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("verifying image pack %s: %w", path, err)
	}
	return p, func() { f.Close() }, nil
}

// VerifyPack reads this node's blobs from the pack, and nothing else of
// it, hashing each.
func (o Options) VerifyPack(m *bundle.Manifest) error {
	p, done, err := o.openPack(m)
	if err != nil {
		return err
	}
	defer done()
	if err := p.ReadBlobs(m, bundle.Visitor{}); err != nil {
		return fmt.Errorf("verifying image pack %s: %w", o.PackPath(), err)
	}
	return nil
}

// runImages imports the bundle's images into containerd's k8s.io
// namespace: blobs stream from the bundle straight into the content store
// (those already there are skipped by digest), and only when the whole
// bundle has verified are the image names created, pinned and unpacked.
func runImages(ctx context.Context, r *Run) error {
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	if r.DryRun {
		var total int64
		for _, im := range r.Manifest.Images {
			total += im.TotalSize
		}
		r.logf("  would import %d images (%.1f MB) into containerd's %s namespace", len(r.Manifest.Images), float64(total)/1e6, criNamespace)
		return nil
	}
	c, err := r.containerd(ctx, files)
	if err != nil {
		return err
	}
	defer c.Close()
	// A lease keeps content from garbage collection until the images that
	// reference it exist.
	ctx, done, err := c.WithLease(ctx)
	if err != nil {
		return fmt.Errorf("taking a containerd lease: %w", err)
	}
	defer done(context.WithoutCancel(ctx))
	leaseID, _ := leases.FromContext(ctx)
	// keep adds a blob already in the store to this run's lease: unless an
	// image references it (an earlier run was stopped before naming), the
	// garbage collector may remove it before this run names the image.
	keep := func(d digest.Digest) error {
		err := c.LeasesService().AddResource(ctx, leases.Lease{ID: leaseID}, leases.Resource{ID: d.String(), Type: "content"})
		if err != nil {
			return hostError{fmt.Errorf("keeping %s in containerd's lease: %w", d, err)}
		}
		return nil
	}

	cs := c.ContentStore()
	buf := make([]byte, 1<<20)
	var imported, present int
	var bytes int64
	importBlob := func(b bundle.BlobEntry, rd io.Reader) error {
		// Between two blobs is a safe point to stop at: the lease keeps
		// what was committed until the re-run names it.
		if err := ctx.Err(); err != nil {
			return hostError{err}
		}
		d := digest.Digest(b.Digest)
		info, err := cs.Info(ctx, d)
		if err == nil && info.Size == b.Size {
			present++
			return keep(d)
		}
		if err != nil && !errdefs.IsNotFound(err) {
			return hostError{fmt.Errorf("asking containerd for %s: %w", d, err)}
		}
		w, err := openIngest(ctx, cs, d, b.Size)
		if errdefs.IsAlreadyExists(err) {
			present++
			return keep(d)
		}
		if err != nil {
			return hostError{fmt.Errorf("opening containerd ingest for %s: %w", d, err)}
		}
		defer w.Close()
		// Truncate resumes nothing: an ingest left by a killed run restarts.
		if err := w.Truncate(0); err != nil {
			return hostError{fmt.Errorf("restarting containerd ingest for %s: %w", d, err)}
		}
		// Large writes: each is one gRPC message to containerd. A failed
		// write is containerd's, a failed read the bundle's.
		if _, err := io.CopyBuffer(hostWriter{w, d}, rd, buf); err != nil {
			return err
		}
		// containerd checks size and digest again at commit.
		if err := w.Commit(ctx, b.Size, d); err != nil && !errdefs.IsAlreadyExists(err) {
			return hostError{fmt.Errorf("committing %s to containerd: %w", d, err)}
		}
		imported++
		bytes += b.Size
		if r.Progress != nil {
			r.Progress(fmt.Sprintf("importing images: %d blobs, %.1f MB", imported, float64(bytes)/1e6))
		}
		return nil
	}
	// The first pass hashed every blob; containerd hashes again at commit
	// and refuses a mismatch, so this pass need not.
	visitor := bundle.Visitor{Blob: importBlob, BlobDigestsCheckedByConsumer: true,
		// Files were verified and kept by the first pass, and blobs
		// containerd holds need no import: pass over both unread. (If
		// keeping one fails, the Blob callback meets and reports it.)
		Held: func(e bundle.HeldEntry) bool {
			if e.File != nil {
				return true
			}
			d := digest.Digest(e.Blob.Digest)
			if info, err := cs.Info(ctx, d); err != nil || info.Size != e.Blob.Size || keep(d) != nil {
				return false
			}
			present++
			return true
		},
	}
	source := r.Bundle
	if r.Manifest.Pack != "" {
		// Thin: the blobs come from the pack, which must still be the one
		// the authenticated manifest names.
		source = r.PackPath()
		p, done, err := r.openPack(r.Manifest)
		if err != nil {
			return err
		}
		defer done()
		err = p.ReadBlobs(r.Manifest, visitor)
		if err := r.importErr(files, source, err); err != nil {
			return err
		}
	} else {
		f, err := os.Open(r.Bundle)
		if err != nil {
			return fmt.Errorf("opening bundle: %w", err)
		}
		defer f.Close()
		_, digestNow, err := bundle.Read(f, visitor)
		if err := r.importErr(files, source, err); err != nil {
			return err
		}
		// The blobs were just verified against this manifest; it must be
		// the one the first pass authenticated.
		if digestNow != r.Digest {
			return fmt.Errorf("verifying %s: it changed since it was first verified (manifest %s, was %s)", r.Bundle, digestNow, r.Digest)
		}
	}
	if err := r.nameImages(ctx, c, files); err != nil {
		return err
	}
	r.logf("  imported %d blobs (%.1f MB), %d already present; %d images named, pinned and unpacked", imported, float64(bytes)/1e6, present, len(r.Manifest.Images))
	return nil
}

// importErr sorts an error of the import pass: containerd's (or a
// cancelled run's) is the host's, anything else the source's.
func (r *Run) importErr(files map[string][]byte, source string, err error) error {
	if he := (hostError{}); errors.As(err, &he) {
		// containerd failed (or the run was cancelled), not the bundle:
		// the reader's EntryError around it would blame the bundle and
		// exit 2. What was committed stays; a re-run skips it.
		sock, _ := r.criSocket(files)
		return fmt.Errorf("importing images into containerd at %s: %w", sock, he.err)
	}
	if err != nil {
		return fmt.Errorf("verifying %s: %w", source, err)
	}
	return nil
}

// nameImages creates, pins and unpacks the images once their blobs are in.
func (r *Run) nameImages(ctx context.Context, c *containerd.Client, files map[string][]byte) error {
	// Unpacking is gunzip-bound; one image per core.
	var g errgroup.Group
	g.SetLimit(runtime.GOMAXPROCS(0))
	for _, im := range r.Manifest.Images {
		g.Go(func() error { return r.createImage(ctx, c, im) })
	}
	if err := g.Wait(); err != nil {
		sock, _ := r.criSocket(files)
		return fmt.Errorf("naming and unpacking images in containerd at %s: %w", sock, err)
	}
	return nil
}

// createImage names one image (and its digest references), labels its
// manifest so containerd's garbage collector keeps config and layers, checks
// every blob is complete, and unpacks it for CRI.
func (r *Run) createImage(ctx context.Context, c *containerd.Client, im bundle.ImageEntry) error {
	cs := c.ContentStore()
	target := ocispec.Descriptor{MediaType: im.MediaType, Digest: digest.Digest(im.Digest), Size: im.Size}
	raw, err := content.ReadBlob(ctx, cs, target)
	if err != nil {
		return fmt.Errorf("image %s: reading its manifest from containerd: %w", im.Ref, err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("image %s: %w", im.Ref, err)
	}
	labels := map[string]string{"containerd.io/gc.ref.content.config": m.Config.Digest.String()}
	var fields []string
	for i, l := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		info, err := cs.Info(ctx, l.Digest)
		if err != nil || info.Size != l.Size {
			return fmt.Errorf("image %s: blob %s is incomplete in containerd (%v)", im.Ref, l.Digest, err)
		}
		if i > 0 {
			labels[fmt.Sprintf("containerd.io/gc.ref.content.l.%d", i-1)] = l.Digest.String()
		}
	}
	info := content.Info{Digest: target.Digest, Labels: labels}
	for k := range labels {
		fields = append(fields, "labels."+k)
	}
	if _, err := cs.Update(ctx, info, fields...); err != nil {
		return fmt.Errorf("image %s: labelling its manifest: %w", im.Ref, err)
	}

	names := []string{im.Ref, digestRef(im.Ref, im.Digest)}
	if im.IndexDigest != "" {
		names = append(names, digestRef(im.Ref, im.IndexDigest))
	}
	is := c.ImageService()
	for _, name := range names {
		img := images.Image{Name: name, Target: target, Labels: map[string]string{pinnedLabel: "pinned"}}
		if _, err := is.Create(ctx, img); err != nil {
			if !errdefs.IsAlreadyExists(err) {
				return fmt.Errorf("naming image %s: %w", name, err)
			}
			if _, err := is.Update(ctx, img, "target", "labels."+pinnedLabel); err != nil {
				return fmt.Errorf("naming image %s: %w", name, err)
			}
		}
	}
	if err := containerd.NewImage(c, images.Image{Name: im.Ref, Target: target}).Unpack(ctx, snapshotter); err != nil {
		return fmt.Errorf("unpacking %s: %w", im.Ref, err)
	}
	return nil
}

// openIngest opens containerd's writer for blob d. containerd answers
// Unavailable both while another writer holds the ref (a run just killed)
// and when it is gone; content.OpenWriter retries that until ctx ends,
// which would hang apply on a dead containerd, so retry for a while only.
func openIngest(ctx context.Context, cs content.Store, d digest.Digest, size int64) (content.Writer, error) {
	deadline := time.Now().Add(10 * time.Second)
	for wait := 10 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		w, err := cs.Writer(ctx, content.WithRef("airadm-"+d.Encoded()), content.WithDescriptor(ocispec.Descriptor{Digest: d, Size: size}))
		if err == nil || !errdefs.IsUnavailable(err) || time.Now().After(deadline) {
			return w, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
	}
}

// hostError marks an error of containerd or of the run, raised inside the
// bundle reader's callback, so that it is not reported as the bundle's.
type hostError struct{ err error }

func (e hostError) Error() string { return e.err.Error() }
func (e hostError) Unwrap() error { return e.err }

// hostWriter tags containerd's write errors as hostErrors.
type hostWriter struct {
	w io.Writer
	d digest.Digest
}

func (h hostWriter) Write(p []byte) (int, error) {
	n, err := h.w.Write(p)
	if err != nil {
		err = hostError{fmt.Errorf("writing %s to containerd: %w", h.d, err)}
	}
	return n, err
}

// digestRef is repo@digest for a tagged reference.
func digestRef(ref, d string) string {
	repo := ref
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		repo = ref[:i]
	}
	return repo + "@" + d
}
