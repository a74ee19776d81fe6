package phases

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/opencontainers/go-digest"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

// hostHashes remembers, for one run, the sha256 of host files it has
// hashed, keyed by what stat says of them. A re-apply asks whether the
// same large file (kubelet, containerd) is in place up to three times:
// while verifying, in the cluster check and in the files phase. A file
// whose size, mtime, ctime and inode are unchanged is not read again, as
// git trusts its index; anything that rewrites a file changes its ctime.
//
// Between runs the memo is kept in hashesFile, so a re-apply on a node that
// holds its binaries does not hash them again either. Only hashes of files
// whose ctime was settled (a second older than the read) are kept: the
// kernel stamps times from a coarse clock, and a write within the same
// tick as the read could otherwise leave every field of the stat alike.
type hostHashes struct {
	mu   sync.Mutex
	seen map[string]statHash
}

// fileID is what stat says of a file that any write to it changes.
type fileID struct {
	Size    int64 `json:"size"`
	Ino     int64 `json:"ino"`
	Dev     int64 `json:"dev"`
	MtimeNs int64 `json:"mtimeNs"`
	CtimeNs int64 `json:"ctimeNs"`
}

type statHash struct {
	id     fileID
	sha256 string
	// settled: the ctime was older than the read by settleTime, so the
	// hash may outlive the run.
	settled bool
}

// hashesFile holds the settled hashes between runs (hostHashes).
const hashesFile = render.AiradmStateDir + "/file-hashes.json"

const settleTime = time.Second

func newHostHashes() *hostHashes { return &hostHashes{seen: map[string]statHash{}} }

// savedHash is one line of hashesFile.
type savedHash struct {
	Path string `json:"path"`
	fileID
	SHA256 string `json:"sha256"`
}

// loadHostHashes starts a run's memo from hashesFile under root. A file
// that is missing or unreadable only means hashing again.
func loadHostHashes(root string) *hostHashes {
	h := newHostHashes()
	b, err := os.ReadFile(hostfs.Path(root, hashesFile))
	if err != nil {
		return h
	}
	var saved []savedHash
	if json.Unmarshal(b, &saved) != nil {
		return h
	}
	for _, s := range saved {
		h.seen[hostfs.Path(root, s.Path)] = statHash{id: s.fileID, sha256: s.SHA256, settled: true}
	}
	return h
}

// save writes the settled hashes of host files under root to hashesFile.
func (h *hostHashes) save(root string) error {
	h.mu.Lock()
	saved := make([]savedHash, 0, len(h.seen))
	for target, sh := range h.seen {
		rel, err := filepath.Rel(hostfs.Path(root, "/"), target)
		if err != nil || strings.HasPrefix(rel, "..") || !sh.settled || sh.sha256 == "" {
			continue
		}
		saved = append(saved, savedHash{Path: "/" + filepath.ToSlash(rel), fileID: sh.id, SHA256: sh.sha256})
	}
	h.mu.Unlock()
	slices.SortFunc(saved, func(a, b savedHash) int { return strings.Compare(a.Path, b.Path) })
	b, err := json.MarshalIndent(saved, "", " ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	target := hostfs.Path(root, hashesFile)
	if old, err := os.ReadFile(target); err == nil && bytes.Equal(old, b) {
		return nil // a re-apply that learnt nothing rewrites nothing
	}
	if err := hostfs.MkdirAll(root, render.AiradmStateDir); err != nil {
		return err
	}
	return atomicfile.Write(target, b, 0o600)
}

func fingerprint(info fs.FileInfo) (fileID, bool) {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, false
	}
	return fileID{Size: info.Size(), Ino: int64(st.Ino), Dev: int64(st.Dev), MtimeNs: st.Mtim.Nano(), CtimeNs: st.Ctim.Nano()}, true
}

// unchanged reports whether target already holds exactly the entry, so a
// re-run touches nothing, mtimes included.
func (h *hostHashes) unchanged(target string, fe bundle.FileEntry, mode fs.FileMode) bool {
	info, err := os.Lstat(target)
	if err != nil || !info.Mode().IsRegular() || info.Mode().Perm() != mode || info.Size() != fe.Size {
		return false
	}
	fp, ok := fingerprint(info)
	if ok && h != nil {
		h.mu.Lock()
		prev, known := h.seen[target]
		h.mu.Unlock()
		if known && prev.sha256 != "" && prev.id == fp {
			return prev.sha256 == fe.SHA256
		}
	}
	readAt := time.Now()
	f, err := os.Open(target)
	if err != nil {
		return false
	}
	defer f.Close()
	sum := sha256.New()
	if _, err := io.Copy(sum, f); err != nil {
		return false
	}
	got := hex.EncodeToString(sum.Sum(nil))
	if ok && h != nil {
		// Stat again: a file written while it was read must not be
		// remembered with the hash of what was read.
		if after, err := f.Stat(); err == nil {
			if fp2, ok := fingerprint(after); ok && fp2 == fp {
				settled := time.Unix(0, fp.CtimeNs).Add(settleTime).Before(readAt)
				h.mu.Lock()
				h.seen[target] = statHash{id: fp, sha256: got, settled: settled}
				h.mu.Unlock()
			}
		}
	}
	return got == fe.SHA256
}

// heldBlobs answers, during the verifying pass, whether containerd already
// holds a blob: one it holds was checked against its digest when it was
// committed, so the bundle's copy is neither hashed nor read. It connects
// on the first blob (the kubelet config that names the socket is a file
// entry, and files come before blobs) and answers no for everything when
// containerd is not there to ask: a bare host verifies every byte.
type heldBlobs struct {
	socket func() string
	once   sync.Once
	client *containerd.Client
}

func (hb *heldBlobs) holds(ctx context.Context, b bundle.BlobEntry) bool {
	hb.once.Do(func() {
		sock := hb.socket()
		if sock == "" {
			return
		}
		if _, err := os.Stat(sock); err != nil {
			return
		}
		c, err := containerd.New(sock, containerd.WithDefaultNamespace(criNamespace), containerd.WithTimeout(2*time.Second))
		if err != nil {
			return
		}
		hb.client = c
	})
	if hb.client == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	info, err := hb.client.ContentStore().Info(ctx, digest.Digest(b.Digest))
	return err == nil && info.Size == b.Size
}

func (hb *heldBlobs) close() {
	if hb.client != nil {
		hb.client.Close()
	}
}

// socketFrom picks the runtime socket the way the images phase does (the
// flag, else the bundle's kubelet config), from the files read so far.
func socketFrom(flag string, files map[string][]byte) string {
	r := &Run{Options: Options{CRISocket: flag}}
	sock, err := r.criSocket(files)
	if err != nil {
		return ""
	}
	return sock
}
