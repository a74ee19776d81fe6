package phases

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

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

// sameCluster refuses a host whose /etc/kubernetes belongs to another
// cluster: its CA differs from the bundle's, or the journal names another
// cluster or node.
func (r *Run) sameCluster(files map[string][]byte) error {
	if j := r.journal; j != nil && j.Cluster != "" && (j.Cluster != r.Manifest.Cluster || j.Node != r.Manifest.Node) {
		return fmt.Errorf("this host holds node %s of cluster %s (%s); run `airadm reset` before applying node %s of cluster %s",
			j.Node, j.Cluster, journalFile, r.Manifest.Node, r.Manifest.Cluster)
	}
	ca := render.PKIDir + "/ca.crt"
	have, err := os.ReadFile(r.path(ca))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", ca, err)
	}
	if want, ok := files[ca]; ok && !bytes.Equal(have, want) {
		return fmt.Errorf("%s belongs to another cluster (its CA is not this bundle's); nothing was changed. Run `airadm reset` to clear the host first", ca)
	}
	return nil
}

func runFiles(_ context.Context, r *Run) error {
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	if err := r.sameCluster(files); err != nil {
		return err
	}
	var wrote, same int
	for _, fe := range r.Manifest.Files {
		mode, err := fe.FileMode()
		if err != nil {
			return err
		}
		target := r.path(fe.Path)
		removeStaleTemps(target)
		if unchanged(target, fe, mode) {
			same++
			continue
		}
		if r.DryRun {
			r.logf("  would write %s (%s, %d bytes)", fe.Path, fe.Mode, fe.Size)
			wrote++
			continue
		}
		if err := hostfs.MkdirAll(r.Root, parent(fe.Path)); err != nil {
			return err
		}
		if err := atomicfile.Write(target, files[fe.Path], mode); err != nil {
			return err
		}
		if !slices.Contains(r.journal.Files, fe.Path) {
			r.journal.Files = append(r.journal.Files, fe.Path)
		}
		wrote++
	}
	if r.DryRun {
		r.logf("  %d files would be written, %d are already in place", wrote, same)
		return nil
	}
	r.logf("  wrote %d files, %d already in place", wrote, same)
	return r.journal.save(r.Root)
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

// unchanged reports whether target already holds exactly the entry, so a
// re-run touches nothing, mtimes included.
func unchanged(target string, fe bundle.FileEntry, mode fs.FileMode) bool {
	info, err := os.Lstat(target)
	if err != nil || !info.Mode().IsRegular() || info.Mode().Perm() != mode || info.Size() != fe.Size {
		return false
	}
	f, err := os.Open(target)
	if err != nil {
		return false
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false
	}
	return hex.EncodeToString(h.Sum(nil)) == fe.SHA256
}
