package phases_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/platforms"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/internal/containerdtest"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
)

// quickstartWorkerBundle builds w1's bundle with the quickstart's stand-in
// images (real layers, unpackable), taken from the committed OCI layout.
func quickstartWorkerBundle(t *testing.T) (string, string, *render.Cluster) {
	t.Helper()
	cfg, err := os.ReadFile("../testdata/quickstart/cluster.toml")
	if err != nil {
		t.Fatal(err)
	}
	c := clustertest.New(t, strings.Replace(string(cfg), `layout = "images"`, `layout = "`+mustAbs(t, "../testdata/quickstart/images")+`"`, 1))
	cache, err := bundle.OpenCache(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	n, _ := c.Node("w1")
	p := &bundle.Puller{Source: bundle.Layout{Path: c.ImageLayout}, Cache: cache, Platform: v1.Platform{OS: "linux", Architecture: "amd64"}}
	images, err := p.Pull(context.Background(), c.NodeImages(n))
	if err != nil {
		t.Fatal(err)
	}
	path, d := c.Bundle(t, "w1", images, cache)
	return path, d, c.Cluster
}

func mustAbs(t *testing.T, p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestImagesIntoRealContainerd imports a bundle's images into a real
// containerd and checks they land complete, named (tag and digest refs),
// pinned and unpacked; a re-run imports nothing, and a damaged store
// converges.
func TestImagesIntoRealContainerd(t *testing.T) {
	ctd := containerdtest.Start(t)
	path, digestOK, c := quickstartWorkerBundle(t)
	var out bytes.Buffer
	o := phases.Options{Bundle: path, ManifestDigest: digestOK, Root: t.TempDir(), Node: "w1", Only: "images", CRISocket: ctd.Endpoint(), Out: &out}
	ctx := context.Background()
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "3 images named, pinned and unpacked") {
		t.Errorf("output:\n%s", out.String())
	}

	client, err := containerd.New(ctd.Socket, containerd.WithDefaultNamespace("k8s.io"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	check := func() {
		t.Helper()
		n, _ := c.Node("w1")
		for _, ref := range c.NodeImages(n) {
			img, err := client.GetImage(ctx, ref)
			if err != nil {
				t.Errorf("%s not in containerd: %v", ref, err)
				continue
			}
			if img.Labels()["io.cri-containerd.pinned"] != "pinned" {
				t.Errorf("%s not pinned: %v", ref, img.Labels())
			}
			ok, err := img.IsUnpacked(ctx, "overlayfs")
			if err != nil || !ok {
				t.Errorf("%s not unpacked: %v", ref, err)
			}
			repo := ref[:strings.LastIndex(ref, ":")]
			if _, err := client.GetImage(ctx, repo+"@"+img.Target().Digest.String()); err != nil {
				t.Errorf("%s: no digest reference: %v", ref, err)
			}
			layers, err := img.RootFS(ctx)
			if err != nil || len(layers) != 1 {
				t.Errorf("%s: rootfs %v %v", ref, layers, err)
			}
		}
	}
	check()

	out.Reset()
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "imported 0 blobs (0.0 MB), 9 already present") {
		t.Errorf("re-run output:\n%s", out.String())
	}

	// Damage: an image name and a layer gone, as if a run died half way.
	n, _ := c.Node("w1")
	ref := c.NodeImages(n)[0]
	img, _ := client.GetImage(ctx, ref)
	manifest, err := images.Manifest(ctx, client.ContentStore(), img.Target(), platforms.Default())
	if err != nil {
		t.Fatal(err)
	}
	if err := client.ImageService().Delete(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if err := client.ContentStore().Delete(ctx, manifest.Layers[0].Digest); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := phases.Apply(ctx, o); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "imported 1 blobs") {
		t.Errorf("repair output:\n%s", out.String())
	}
	check()
}

// TestKilledImportConverges kills `airadm apply phase images` with SIGKILL
// part way through a 100 MB import, then runs it again: the images must
// end up complete, named, pinned and unpacked, as after a clean run.
func TestKilledImportConverges(t *testing.T) {
	ctd := containerdtest.Start(t)
	path, digest, _ := benchBundle(t)
	airadm := filepath.Join(t.TempDir(), "airadm")
	if out, err := exec.Command("go", "build", "-o", airadm, "..").CombinedOutput(); err != nil {
		t.Fatalf("building airadm: %v\n%s", err, out)
	}
	root := t.TempDir()
	args := []string{"apply", "phase", "images", "--root", root, "--node", "w1", "--cri-socket", ctd.Endpoint(), "--manifest-digest", digest, path}
	cmd := exec.Command(airadm, args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(700 * time.Millisecond) // past verification, into the import
	cmd.Process.Kill()
	state, _ := cmd.Process.Wait()
	if state.Success() {
		t.Log("the import finished before the kill; the re-run still has to converge")
	}
	if out, err := exec.Command(airadm, args...).CombinedOutput(); err != nil {
		t.Fatalf("re-run after kill -9: %v\n%s", err, out)
	}
	client, err := containerd.New(ctd.Socket, containerd.WithDefaultNamespace("k8s.io"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()
	list, err := client.ListImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tagged := 0
	for _, img := range list {
		// Skip digest references, ours and the sha256:<id> ones CRI adds.
		if strings.Contains(img.Name(), "sha256:") {
			continue
		}
		tagged++
		if ok, err := img.IsUnpacked(ctx, "overlayfs"); err != nil || !ok {
			t.Errorf("%s not unpacked after the re-run: %v", img.Name(), err)
		}
		if img.Labels()["io.cri-containerd.pinned"] != "pinned" {
			t.Errorf("%s not pinned", img.Name())
		}
		if _, err := img.Size(ctx); err != nil {
			t.Errorf("%s incomplete: %v", img.Name(), err)
		}
	}
	if tagged != 3 {
		t.Errorf("%d images after the re-run, want 3", tagged)
	}
}

// TestSandboxImageCheck: preflight compares containerd's configured pause
// image with the bundle's.
func TestSandboxImageCheck(t *testing.T) {
	path, digest, _ := quickstartWorkerBundle(t)
	root := t.TempDir()
	cfg := filepath.Join(root, "config.toml")
	run := func(cfg string) error {
		var out bytes.Buffer
		return phases.Apply(context.Background(), phases.Options{Bundle: path, ManifestDigest: digest, Root: root, Node: "w1",
			Only: "preflight", ContainerdConfig: cfg, IgnorePreflight: []string{"ports"}, Out: &out})
	}
	// No config file at the default path: containerd's default,
	// registry.k8s.io/pause:3.10.2, which the bundle has.
	if err := run(""); err != nil {
		t.Fatalf("default sandbox: %v", err)
	}
	// A config file named but missing is a mistake, not the default.
	if err := run(cfg); err == nil || !strings.Contains(err.Error(), "sandbox-image: reading containerd's config: open "+cfg) {
		t.Fatalf("missing --containerd-config: %v", err)
	}
	os.WriteFile(cfg, []byte("version = 4\n[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = 'mirror.example/pause:3.10.2'\n"), 0o644)
	err := run(cfg)
	if err == nil || !strings.Contains(err.Error(), "sandbox-image: containerd will use mirror.example/pause:3.10.2 ("+cfg+") for pod sandboxes but the bundle carries registry.k8s.io/pause:3.10.2") {
		t.Fatalf("err = %v", err)
	}
	os.WriteFile(cfg, []byte("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.10.2\"\n"), 0o644)
	if err := run(cfg); err != nil {
		t.Fatalf("containerd 1.x config naming the bundle's pause: %v", err)
	}
}

// TestContainerdDyingMidImportIsNotTheBundles kills the real containerd
// after the first blob is imported: the error names containerd and is not
// a bundle error (main exits 2 for those), and once containerd is back a
// re-run converges.
func TestContainerdDyingMidImportIsNotTheBundles(t *testing.T) {
	ctd := containerdtest.Start(t)
	path, digest, _ := quickstartWorkerBundle(t)
	var out bytes.Buffer
	killed := false
	o := phases.Options{Bundle: path, ManifestDigest: digest, Root: t.TempDir(), Node: "w1", Only: "images", CRISocket: ctd.Endpoint(), Out: &out,
		Progress: func(string) {
			if !killed {
				killed = true
				ctd.Kill()
			}
		}}
	err := phases.Apply(context.Background(), o)
	if err == nil {
		t.Fatal("the import succeeded although containerd was killed")
	}
	var be *bundle.EntryError
	if errors.As(err, &be) || strings.Contains(err.Error(), "verifying") || !strings.Contains(err.Error(), "importing images into containerd at "+ctd.Socket) {
		t.Errorf("err = %v\nwant it to name containerd, not blame the bundle", err)
	}
	t.Logf("with containerd killed: %v", err)
	ctd.Restart(t)
	o.Progress = nil
	out.Reset()
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatalf("re-run with containerd back: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "3 images named, pinned and unpacked") {
		t.Errorf("re-run output:\n%s", out.String())
	}
}

// TestCancelDuringImportStopsSafely cancels the context (SIGINT or SIGTERM
// in main) after the first blob: the phase stops with the cancellation,
// not a bundle error, is not recorded as finished, and a re-run converges.
func TestCancelDuringImportStopsSafely(t *testing.T) {
	ctd := containerdtest.Start(t)
	path, digest, _ := quickstartWorkerBundle(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	root := t.TempDir()
	var out bytes.Buffer
	o := phases.Options{Bundle: path, ManifestDigest: digest, Root: root, Node: "w1", Only: "images", CRISocket: ctd.Endpoint(), Out: &out,
		Progress: func(string) { cancel() }}
	err := phases.Apply(ctx, o)
	var be *bundle.EntryError
	if !errors.Is(err, context.Canceled) || errors.As(err, &be) {
		t.Fatalf("err = %v, want the cancellation and no bundle error", err)
	}
	if j, err := phases.LoadJournal(root); err != nil || slices.Contains(j.Phases, "images") {
		t.Errorf("journal = %+v, %v; the interrupted phase is recorded", j, err)
	}
	o.Progress = nil
	out.Reset()
	if err := phases.Apply(context.Background(), o); err != nil {
		t.Fatalf("re-run: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "3 images named, pinned and unpacked") || !strings.Contains(out.String(), "already present") {
		t.Errorf("re-run output:\n%s", out.String())
	}
}

// TestResetUnderRootLeavesTheRuntimeAlone: reset --root DIR without
// --cri-socket keeps the runtime's containers (that runtime is the host's);
// with the socket given it removes them.
func TestResetUnderRootLeavesTheRuntimeAlone(t *testing.T) {
	ctd := containerdtest.Start(t)
	path, digest, _ := quickstartWorkerBundle(t)
	ctx := context.Background()
	if err := phases.Apply(ctx, phases.Options{Bundle: path, ManifestDigest: digest, Root: t.TempDir(), Node: "w1", Only: "images", CRISocket: ctd.Endpoint()}); err != nil {
		t.Fatal(err)
	}
	client, err := containerd.New(ctd.Socket, containerd.WithDefaultNamespace("k8s.io"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	img, err := client.GetImage(ctx, "registry.k8s.io/pause:"+render.PauseVersion)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.NewContainer(ctx, "left-alone", containerd.WithImage(img), containerd.WithNewSnapshot("left-alone", img)); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		t.Helper()
		cs, err := client.Containers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return len(cs)
	}
	if err := phases.Reset(ctx, phases.ResetOptions{Root: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 1 {
		t.Errorf("reset --root without --cri-socket left %d containers, want 1", n)
	}
	if err := phases.Reset(ctx, phases.ResetOptions{Root: t.TempDir(), CRISocket: ctd.Endpoint()}); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 0 {
		t.Errorf("reset --root --cri-socket left %d containers, want 0", n)
	}
}
