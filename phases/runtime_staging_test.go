package phases

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

const stagingCluster = `
name = "st"
[pki]
algorithm = "ECDSA-P256"
[[nodes]]
name = "cp1"
role = "control-plane"
address = "127.0.1.11"
`

// hostBinaryBundle writes cp1's bundle with a 4 MB host binary and
// returns it with the binary's bytes.
func hostBinaryBundle(t *testing.T) (path string, bin []byte) {
	t.Helper()
	c := clustertest.New(t, stagingCluster)
	files, err := render.NodeFiles(c.Cluster, c.Secrets, "cp1")
	if err != nil {
		t.Fatal(err)
	}
	bin = make([]byte, 4<<20)
	rnd := rand.NewChaCha8([32]byte{7})
	rnd.Read(bin)
	files = append(files, render.File{Path: "/usr/local/bin/tool", Mode: 0o755, Data: bin})
	path = filepath.Join(t.TempDir(), "cp1.bundle")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, _, err := bundle.Write(f, bundle.Contents{Cluster: c.Name, Node: "cp1", Role: "control-plane",
		KubernetesVersion: c.KubernetesVersion, BuildTime: clustertest.Now, Files: files}, nil); err != nil {
		t.Fatal(err)
	}
	return path, bin
}

// TestHostBinariesAreStagedNotKept: the verifying pass keeps the small
// files in memory and streams host binaries to the staging area; the files
// phase renames them into place, and nothing staged is left after apply.
func TestHostBinariesAreStagedNotKept(t *testing.T) {
	path, bin := hostBinaryBundle(t)
	root := t.TempDir()
	st := newStaging(root, false)
	_, _, files, err := verifyBundle(context.Background(), path, trust.Vouch{}, st, "", "", verifyHooks{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := files["/usr/local/bin/tool"]; ok {
		t.Error("the host binary was kept in memory")
	}
	if _, ok := files[render.KubeletConfigFile]; !ok {
		t.Error("the kubelet config was not kept in memory")
	}
	staged, err := os.ReadFile(st.path["/usr/local/bin/tool"])
	if err != nil || !bytes.Equal(staged, bin) {
		t.Fatalf("staged binary: %v (equal: %v)", err, bytes.Equal(staged, bin))
	}
	st.cleanup()

	if err := Apply(context.Background(), Options{Bundle: path, Root: root, Node: "cp1", Only: "files"}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(hostfs.Path(root, "/usr/local/bin/tool"))
	if info, _ := os.Stat(hostfs.Path(root, "/usr/local/bin/tool")); err != nil || !bytes.Equal(got, bin) || info.Mode().Perm() != 0o755 {
		t.Errorf("placed binary: %v, equal %v, mode %v", err, bytes.Equal(got, bin), info.Mode())
	}
	if entries, _ := os.ReadDir(hostfs.Path(root, stagingDir)); len(entries) != 0 {
		t.Errorf("apply left %d staging directories", len(entries))
	}
}

// TestTamperedHostBinaryLeavesNothing: a host binary whose bytes do not
// match the manifest fails verification after part of it was staged; the
// staged part and the directories made for it are removed.
func TestTamperedHostBinaryLeavesNothing(t *testing.T) {
	path, bin := hostBinaryBundle(t)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b, bin[:64])
	if i < 0 {
		t.Fatal("the binary is not in the bundle")
	}
	b[i+len(bin)/2] ^= 1
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	err = Apply(context.Background(), Options{Bundle: path, Root: root, Node: "cp1", Only: "files"})
	if err == nil {
		t.Fatal("a tampered host binary was accepted")
	}
	if entries, _ := os.ReadDir(root); len(entries) != 0 {
		t.Errorf("a tampered bundle left %d entries under the root: %v", len(entries), err)
	}
}

// TestStaleStagingRemoved: a run killed before its cleanup leaves its
// staging directory; the next apply's files phase removes it.
func TestStaleStagingRemoved(t *testing.T) {
	path, _ := hostBinaryBundle(t)
	root := t.TempDir()
	stale := hostfs.Path(root, stagingDir) + "/999999999-dead"
	if err := os.MkdirAll(stale, 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(stale+"/0", []byte("half"), 0o600)
	if err := Apply(context.Background(), Options{Bundle: path, Root: root, Node: "cp1", Only: "files"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); err == nil {
		t.Error("a dead run's staging directory was left")
	}
}

// TestInPlaceHostBinaryIsNotStaged: a re-run stages nothing for a binary
// already in place (it is verified and dropped), and if that file changes
// before the files phase, the phase refuses rather than write what it no
// longer holds.
func TestInPlaceHostBinaryIsNotStaged(t *testing.T) {
	path, _ := hostBinaryBundle(t)
	root := t.TempDir()
	o := Options{Bundle: path, Root: root, Node: "cp1", Only: "files"}
	if err := Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	st := newStaging(root, false)
	m, digest, files, err := verifyBundle(context.Background(), path, trust.Vouch{}, st, "", "", verifyHooks{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.cleanup()
	if len(st.path) != 0 || st.dir != "" {
		t.Errorf("a binary already in place was staged: %v", st.path)
	}
	os.WriteFile(hostfs.Path(root, "/usr/local/bin/tool"), []byte("changed"), 0o755)
	j, err := LoadJournal(root)
	if err != nil {
		t.Fatal(err)
	}
	plan, _ := Plan(render.ControlPlane, nil, "files")
	r := &Run{Options: o, Manifest: m, Digest: digest, plan: plan, files: files, staged: st, journal: j}
	if err := runFiles(context.Background(), r); err == nil || !strings.Contains(err.Error(), "/usr/local/bin/tool changed while apply ran") {
		t.Errorf("files phase = %v, want a refusal", err)
	}
}

// TestHostHashesOutliveTheRun: a run keeps the hashes of the host files it
// found in place, once their ctime has settled, and the next run trusts
// them instead of reading the files; any write since changes the ctime and
// the file is hashed again.
func TestHostHashesOutliveTheRun(t *testing.T) {
	path, _ := hostBinaryBundle(t)
	root := t.TempDir()
	o := Options{Bundle: path, Root: root, Node: "cp1", Only: "files"}
	if err := Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	tool := hostfs.Path(root, "/usr/local/bin/tool")
	// Just written: its ctime is not settled, so this run's hash of it is
	// not kept.
	if err := Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if saved := readSavedHashes(t, root); saved["/usr/local/bin/tool"] != "" {
		t.Fatalf("the hash of a file written %v ago was kept", settleTime)
	}
	time.Sleep(settleTime + 100*time.Millisecond) // let its ctime settle
	if err := Apply(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	saved := readSavedHashes(t, root)
	if saved["/usr/local/bin/tool"] == "" {
		t.Fatalf("the settled hash of /usr/local/bin/tool was not kept: %v", saved)
	}
	m, _, _, err := verifyBundle(context.Background(), path, trust.Vouch{}, newStaging(root, true), "", "", verifyHooks{})
	if err != nil {
		t.Fatal(err)
	}
	var entry bundle.FileEntry
	for _, fe := range m.Files {
		if fe.Path == "/usr/local/bin/tool" {
			entry = fe
		}
	}
	if !loadHostHashes(root).unchanged(tool, entry, 0o755) {
		t.Error("the kept hash does not match the file in place")
	}
	// The next run believes the kept hash without reading the file: one
	// falsified in hashesFile is what it answers with.
	b, _ := os.ReadFile(hostfs.Path(root, hashesFile))
	os.WriteFile(hostfs.Path(root, hashesFile), bytes.ReplaceAll(b, []byte(entry.SHA256), []byte(strings.Repeat("0", 64))), 0o600)
	if loadHostHashes(root).unchanged(tool, entry, 0o755) {
		t.Error("the kept hash was not used: the file was read again")
	}
	// A write since changes the ctime, whatever it does to the mtime: the
	// kept hash no longer applies and the file is read.
	fi, _ := os.Stat(tool)
	changed, _ := os.ReadFile(tool)
	changed[0] ^= 1
	os.WriteFile(tool, changed, 0o755)
	os.Chtimes(tool, fi.ModTime(), fi.ModTime())
	os.WriteFile(hostfs.Path(root, hashesFile), b, 0o600)
	if loadHostHashes(root).unchanged(tool, entry, 0o755) {
		t.Error("a file changed with its mtime kept was taken as unchanged")
	}
}

func readSavedHashes(t *testing.T, root string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(hostfs.Path(root, hashesFile))
	if err != nil {
		t.Fatal(err)
	}
	var saved []savedHash
	if err := json.Unmarshal(b, &saved); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, s := range saved {
		out[s.Path] = s.SHA256
	}
	return out
}
