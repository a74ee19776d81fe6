package main

import (
	"bytes"
	"os"
	"os/exec"
	"runtime/debug"
	"strings"
	"testing"
)

// TestNoBuildOutputsCommitted fails on a committed test binary, bin/
// output or any executable object file: build outputs never belong in git.
func TestNoBuildOutputsCommitted(t *testing.T) {
	out, err := exec.Command("git", "ls-files", "-z").Output()
	if err != nil {
		t.Fatalf("listing tracked files (this test needs git and a checkout): %v", err)
	}
	for _, f := range strings.Split(strings.TrimRight(string(out), "\x00"), "\x00") {
		if f == "" {
			continue
		}
		if strings.HasSuffix(f, ".test") || strings.HasPrefix(f, "bin/") || strings.Contains(f, "/bin/") {
			t.Errorf("%s is a build output; remove it from git", f)
			continue
		}
		h, err := os.Open(f)
		if err != nil {
			continue // deleted in the work tree
		}
		magic := make([]byte, 4)
		n, _ := h.Read(magic)
		h.Close()
		if n == 4 && bytes.Equal(magic, []byte("\x7fELF")) {
			t.Errorf("%s is an ELF binary; build outputs do not belong in git", f)
		}
	}
}

func TestVersion(t *testing.T) {
	info := func(v string, settings ...debug.BuildSetting) func() (*debug.BuildInfo, bool) {
		return func() (*debug.BuildInfo, bool) {
			return &debug.BuildInfo{Main: debug.Module{Version: v}, Settings: settings}, true
		}
	}
	rev := debug.BuildSetting{Key: "vcs.revision", Value: "0123456789abcdef0123"}
	when := debug.BuildSetting{Key: "vcs.time", Value: "2026-12-02T07:00:00Z"}
	dirty := debug.BuildSetting{Key: "vcs.modified", Value: "true"}
	for _, c := range []struct {
		name, stamped string
		info          func() (*debug.BuildInfo, bool)
		want          string
	}{
		{"stamped", "v1.2.3", info("(devel)"), "v1.2.3"},
		{"module version", "", info("v0.4.0"), "v0.4.0"},
		{"vcs", "", info("(devel)", rev, when), "git-0123456789ab (2026-12-02T07:00:00Z)"},
		{"vcs dirty", "", info("(devel)", rev, dirty), "git-0123456789ab-dirty"},
		{"nothing", "", info("(devel)"), "(devel)"},
		{"no build info", "", func() (*debug.BuildInfo, bool) { return nil, false }, "(devel)"},
	} {
		if got := airadmVersion(c.stamped, c.info); got != c.want {
			t.Errorf("%s: airadmVersion = %q, want %q", c.name, got, c.want)
		}
	}
}
