package phases

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

// stagingDir holds, per run, the bundle's large files (host binaries:
// containerd, kubelet, ~250 MB together) between the verifying pass and the
// files phase, so apply does not keep them in memory. They are written
// there as they are verified and renamed into place by the files phase:
// nothing is read from the bundle again after verification, and the
// directory is root's alone (0700), like the rest of airadm's state.
const stagingDir = render.AiradmStateDir + "/staging"

// staging is one run's staging area. One that discards verifies the large
// files and keeps nothing: a dry run, or a run without the files phase,
// does not need them.
type staging struct {
	root    string
	discard bool
	dir     string            // created on the first staged file
	made    []string          // directories created for it, deepest last
	path    map[string]string // host path -> staged file
	// hashes remembers the host files this run has hashed.
	hashes *hostHashes
}

func newStaging(root string, discard bool) *staging {
	return &staging{root: root, discard: discard, path: map[string]string{}, hashes: loadHostHashes(root)}
}

// keptInMemory are the trees whose files phases read (keys, kubeconfigs,
// manifests, the kubelet's and airadm's configs); they are small.
var keptInMemory = []string{render.KubernetesDir, render.KubeletDir, render.AiradmStateDir}

// takes says whether fe is staged rather than kept in memory.
func (s *staging) takes(fe bundle.FileEntry) bool {
	for _, d := range keptInMemory {
		if strings.HasPrefix(fe.Path, d+"/") {
			return false
		}
	}
	return true
}

// stage streams fe's verified bytes to the staging area. The reader fails
// at EOF on a digest mismatch, and the partial file is then removed.
func (s *staging) stage(fe bundle.FileEntry, rd io.Reader) error {
	mode, err := fe.FileMode()
	if err != nil {
		return err
	}
	if s.discard || s.hashes.unchanged(hostfs.Path(s.root, fe.Path), fe, mode) {
		// Verified and dropped: the files phase leaves a file already in
		// place alone (and refuses one that changed since).
		_, err := io.Copy(io.Discard, rd)
		return err
	}
	if s.dir == "" {
		if err := s.create(); err != nil {
			return err
		}
	}
	p := filepath.Join(s.dir, strconv.Itoa(len(s.path)))
	if err := atomicfile.WriteFrom(p, mode, func(w io.Writer) error {
		_, err := io.Copy(w, rd)
		return err
	}); err != nil {
		return fmt.Errorf("staging %s: %w", fe.Path, err)
	}
	s.path[fe.Path] = p
	return nil
}

// create makes this run's directory, named after the process so that a
// later run can tell a crashed run's leftovers from a live one's.
func (s *staging) create() error {
	for d := stagingDir; d != "/"; d = path.Dir(d) {
		if _, err := os.Stat(hostfs.Path(s.root, d)); err == nil {
			break
		}
		s.made = append([]string{hostfs.Path(s.root, d)}, s.made...)
	}
	if err := hostfs.MkdirAll(s.root, stagingDir); err != nil {
		return err
	}
	var rnd [6]byte
	rand.Read(rnd[:])
	dir := hostfs.Path(s.root, stagingDir) + "/" + strconv.Itoa(os.Getpid()) + "-" + hex.EncodeToString(rnd[:])
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("creating the staging area: %w", err)
	}
	s.dir = dir
	return nil
}

// abandon removes what a failed verification staged, and the directories
// made for it, so a bad bundle leaves nothing on the host.
func (s *staging) abandon() {
	if s.dir == "" {
		return
	}
	os.RemoveAll(s.dir)
	for i := len(s.made) - 1; i >= 0; i-- {
		os.Remove(s.made[i])
	}
	s.dir = ""
}

// cleanup removes this run's staged files that the files phase did not
// take (a skipped phase, an unchanged file, a failure).
func (s *staging) cleanup() {
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}

// removeStale removes staging directories of runs that are no longer
// alive (killed before their cleanup). Called under the host lock.
func (s *staging) removeStale() {
	if s.discard {
		return
	}
	entries, _ := os.ReadDir(hostfs.Path(s.root, stagingDir))
	for _, e := range entries {
		dir := filepath.Join(hostfs.Path(s.root, stagingDir), e.Name())
		if dir == s.dir {
			continue
		}
		pid, _, _ := strings.Cut(e.Name(), "-")
		if n, err := strconv.Atoi(pid); err == nil && syscall.Kill(n, 0) == nil {
			continue // a run still verifying its bundle
		}
		os.RemoveAll(dir)
	}
}

// place moves the staged file for hostPath to target, or says it has none.
// A rename is atomic; across file systems the staged file is copied
// atomically instead (it is root's, and verified: still no TOCTOU).
func (s *staging) place(hostPath, target string, mode os.FileMode) (bool, error) {
	p, ok := s.path[hostPath]
	if !ok {
		return false, nil
	}
	err := os.Rename(p, target)
	if errors.Is(err, syscall.EXDEV) {
		err = atomicfile.WriteFrom(target, mode, func(w io.Writer) error {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = io.Copy(w, f)
			return err
		})
	} else if err == nil {
		err = atomicfile.SyncDir(filepath.Dir(target))
	}
	if err != nil {
		return true, fmt.Errorf("writing %s: %w", hostPath, err)
	}
	delete(s.path, hostPath)
	return true, nil
}
