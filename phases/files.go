package phases

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

// readFiles returns the host files verified by the first pass.
func (r *Run) readFiles() (map[string][]byte, error) {
	if r.files == nil {
		return nil, fmt.Errorf("the bundle's files were not read")
	}
	return r.files, nil
}

// sameCluster refuses a host whose files belong to another cluster: the
// journal names another cluster or node, its CA differs from the bundle's,
// or a file the bundle would write is already there, different, and not
// one the journal says apply wrote. The preflight check "cluster" reports
// it, and the files phase enforces it even when that check is ignored, so
// another cluster's files are never overwritten or claimed in the journal.
func (r *Run) sameCluster(files map[string][]byte) error {
	reset := resetHint(r.Root)
	if j := r.journal; j != nil && j.foreign(r.Manifest) {
		return fmt.Errorf("this host holds node %s of cluster %s (%s); run %s before applying node %s of cluster %s",
			j.Node, j.Cluster, journalFile, reset, r.Manifest.Node, r.Manifest.Cluster)
	}
	ca := render.PKIDir + "/ca.crt"
	have, err := os.ReadFile(r.path(ca))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("reading %s: %w", ca, err)
	}
	if want, ok := files[ca]; err == nil && ok && !bytes.Equal(have, want) {
		return fmt.Errorf("%s belongs to another cluster (its CA is not this bundle's); nothing was changed. Run %s to clear the host first", ca, reset)
	}
	var theirs []string
	for _, fe := range r.Manifest.Files {
		if r.journal != nil && slices.Contains(r.journal.Files, fe.Path) {
			continue // apply wrote it: a newer bundle may replace it
		}
		if _, err := os.Lstat(r.path(fe.Path)); err != nil {
			continue
		}
		if mode, err := fe.FileMode(); err == nil && r.staged.hashes.unchanged(r.path(fe.Path), fe, mode) {
			continue // exactly the bundle's: recording it as ours is true
		}
		theirs = append(theirs, fe.Path)
	}
	if len(theirs) > 0 {
		if len(theirs) > 5 {
			theirs = append(theirs[:5], fmt.Sprintf("and %d more", len(theirs)-5))
		}
		return fmt.Errorf("%s already exist, differ from the bundle's and were not written by airadm (%s does not list them); nothing was changed. Move them away, or run %s to clear the host first",
			strings.Join(theirs, ", "), journalFile, reset)
	}
	return nil
}

// resetHint is the reset command that clears this run's root.
func resetHint(root string) string {
	if root == "" || root == "/" {
		return "`airadm reset`"
	}
	return "`airadm reset --root " + root + "`"
}

func runFiles(ctx context.Context, r *Run) error {
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	if err := r.sameCluster(files); err != nil {
		return err
	}
	// A node an earlier apply wrote files on is being converged: each
	// change there is news, where a first apply's are not.
	converging := r.journal != nil && len(r.journal.Files) > 0
	if !r.DryRun {
		// Write-ahead: every file the bundle owns is in the durable journal
		// before the first one is written, including those already in place
		// (an earlier run, maybe killed, wrote them).
		paths := make([]string, 0, len(r.Manifest.Files))
		for _, fe := range r.Manifest.Files {
			paths = append(paths, fe.Path)
		}
		if err := r.journal.claim(r.Root, r.Manifest, paths); err != nil {
			return fmt.Errorf("recording the bundle's files in the journal before writing them: %w", err)
		}
	}
	r.staged.removeStale()
	keep := func(string) bool { return true }
	if r.upgrade != nil {
		// An upgrade swaps the static pods and the kubelet in later steps.
		keep = func(p string) bool { return !heldBack(p) }
	}
	wrote, same, err := r.writeEntries(ctx, keep, converging)
	if err != nil {
		return err
	}
	if r.DryRun {
		r.logf("  %d files would be written, %d are already in place", wrote, same)
	} else if wrote == 0 {
		r.logf("  nothing changed: all %d files already in place", same)
	} else {
		r.logf("  wrote %d files, %d already in place", wrote, same)
	}
	if r.upgrade != nil {
		r.logf("  the static pod manifests and the kubelet's files wait for their upgrade steps")
		return nil
	}
	r.reportRestarts()
	return nil
}

// writeEntries writes the bundle's files that keep selects and that
// differ from the host's, atomically, one at a time, recording each in
// r.changed; converging (a node apply set up before) prints each change.
func (r *Run) writeEntries(ctx context.Context, keep func(path string) bool, converging bool) (wrote, same int, err error) {
	files, err := r.readFiles()
	if err != nil {
		return 0, 0, err
	}
	for _, fe := range writeOrder(r.Manifest.Files) {
		if !keep(fe.Path) {
			continue
		}
		// Between two atomic writes is a safe point to stop at.
		if err := ctx.Err(); err != nil {
			return wrote, same, fmt.Errorf("writing files (%d written, %d already in place): %w", wrote, same, err)
		}
		mode, err := fe.FileMode()
		if err != nil {
			return wrote, same, err
		}
		target := r.path(fe.Path)
		removeStaleTemps(target)
		if r.staged.hashes.unchanged(target, fe, mode) {
			same++
			continue
		}
		if fe.Path == render.BootstrapKubeconfig && r.worker() && kubeconfigValid(r.Root, r.path(render.KubeletKubeconfig)) {
			// The kubelet holds its credential and rotates it itself
			// through the CSR API; the token would only lie about.
			r.logf("  kept %s out: %s holds a valid client certificate, which the kubelet renews itself", fe.Path, render.KubeletKubeconfig)
			same++
			continue
		}
		_, statErr := os.Lstat(target)
		existed := statErr == nil
		r.changed = append(r.changed, fe.Path)
		if r.DryRun {
			r.logf("  would write %s (%s, %d bytes)", fe.Path, fe.Mode, fe.Size)
			wrote++
			continue
		}
		if err := hostfs.MkdirAll(r.Root, parent(fe.Path)); err != nil {
			return wrote, same, err
		}
		if placed, err := r.staged.place(fe.Path, target, mode); err != nil {
			return wrote, same, err
		} else if !placed {
			data, ok := files[fe.Path]
			if !ok {
				// Staging dropped it as already in place, and it has
				// changed since: its bytes are not at hand.
				return wrote, same, fmt.Errorf("%s changed while apply ran; run apply again", fe.Path)
			}
			if err := atomicfile.Write(target, data, mode); err != nil {
				return wrote, same, err
			}
		}
		if converging && existed {
			r.logf("  replaced %s", fe.Path)
		} else if converging {
			r.logf("  created %s", fe.Path)
		}
		wrote++
	}
	return wrote, same, nil
}

// writeOrder puts the static pod manifests last. A manifest that changes
// makes kubelet restart its component, which must then find the
// certificates and kubeconfigs it reads already replaced.
func writeOrder(files []bundle.FileEntry) []bundle.FileEntry {
	out := slices.Clone(files)
	slices.SortStableFunc(out, func(a, b bundle.FileEntry) int {
		am, bm := strings.HasPrefix(a.Path, render.ManifestsDir+"/"), strings.HasPrefix(b.Path, render.ManifestsDir+"/")
		switch {
		case am == bm:
			return 0
		case bm:
			return -1
		}
		return 1
	})
	return out
}

// reportRestarts says which components this run's changes restart, and
// why: kubelet restarts a static pod whose manifest changed, and the
// kubelet phase restarts the kubelet if one of its files changed.
func (r *Run) reportRestarts() {
	would := ""
	if r.DryRun {
		would = "would "
	}
	files, _ := r.readFiles()
	for _, p := range r.changed {
		component, ok := strings.CutSuffix(strings.TrimPrefix(p, render.ManifestsDir+"/"), ".yaml")
		if !ok || !strings.HasPrefix(p, render.ManifestsDir+"/") {
			continue
		}
		var pod corev1.Pod
		if yaml.Unmarshal(files[p], &pod) != nil {
			continue
		}
		var why []string
		for _, in := range render.PodInputs(&pod) {
			if slices.Contains(r.changed, in) {
				why = append(why, in)
			}
		}
		reason := "its manifest changed"
		if len(why) > 0 {
			reason = "it reads " + strings.Join(why, ", ")
		}
		r.logf("  kubelet %srestart %s: %s", would, component, reason)
	}
	if changed := r.kubeletInputsChanged(); len(changed) > 0 && !r.planned("kubelet") {
		r.logf("  %s changed: restart the kubelet (the kubelet phase is not part of this run)", strings.Join(changed, ", "))
	}
}

// kubeletInputs are the files the kubelet reads when it starts.
func kubeletInputs() []string {
	return append(render.KubeletBinaries(),
		render.KubeletConfigFile, render.KubeletInstanceConfigFile, render.KubeletFlagsFile,
		render.KubeletUnitFile, render.KubeletDropInFile, render.KubeletKubeconfig, render.PKIDir+"/ca.crt")
}

// kubeletInputsChanged lists the kubelet's files this run wrote.
func (r *Run) kubeletInputsChanged() []string {
	var out []string
	for _, p := range r.changed {
		if slices.Contains(kubeletInputs(), p) {
			out = append(out, p)
		}
	}
	return out
}

// removeStaleTemps deletes temp files a crashed earlier write left beside
// target (atomicfile names them .<base>.tmp-*), so a re-run converges to
// exactly the tree a clean run makes.
func removeStaleTemps(target string) {
	stale, _ := filepath.Glob(filepath.Join(filepath.Dir(target), "."+filepath.Base(target)+".tmp-*"))
	for _, f := range stale {
		os.Remove(f)
	}
}

func parent(p string) string {
	for i := len(p) - 1; i > 0; i-- {
		if p[i] == '/' {
			return p[:i]
		}
	}
	return "/"
}
