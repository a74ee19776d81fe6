package media

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"airadm.dev/airadm/build"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

var update = flag.Bool("update", false, "rewrite testdata/golden")

// buildTime is the quickstart bundles' build time, and so the media's epoch.
var buildTime = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// quickstart builds the quickstart's bundles (config and image layout
// copied, secrets created fresh) and returns the cluster and the out dir.
func quickstart(t testing.TB) (*render.Cluster, string) {
	t.Helper()
	return quickstartBuild(t, false)
}

// quickstartBuild is quickstart, with --pack when pack is set.
func quickstartBuild(t testing.TB, pack bool) (*render.Cluster, string) {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join("..", "testdata", "quickstart")
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if rel == "secrets" {
			return filepath.SkipDir
		}
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dir, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "cluster.toml")
	c, err := render.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	_, err = build.Run(context.Background(), build.Options{
		ConfigPath: cfg, Cluster: c, Out: out, CacheDir: filepath.Join(dir, ".cache"), Jobs: 2,
		BuildTime: buildTime, Now: time.Now, Rand: rand.Reader, Pack: pack,
	})
	if err != nil {
		t.Fatal(err)
	}
	return c, out
}

// runner is a stand-in runner: this test binary, an ELF for this machine.
func runner(t testing.TB) string {
	t.Helper()
	p, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// need fails the test, with how to get it, when a tool is missing.
func need(t testing.TB, tool, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Fatalf("%s is missing: install it with apt-get install %s (./hack/test installs it)", tool, pkg)
	}
	return p
}

func run(t testing.TB, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func fileSHA256(t testing.TB, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func TestOpenRefuses(t *testing.T) {
	c, out := quickstart(t)
	tests := []struct {
		name    string
		nodes   []string
		maxSize int64
		damage  func(dir string)
		want    string
		// is says which error main maps to exit 2.
		is func(error) bool
	}{
		{name: "unknown node", nodes: []string{"w9"}, want: `choosing nodes: no node "w9" in the config (nodes: cp1, w1, w2)`, is: isInput},
		{name: "no SHA256SUMS", damage: func(d string) { os.Remove(filepath.Join(d, "SHA256SUMS")) }, want: "no such file: build the bundles first", is: isInput},
		{name: "missing bundle", nodes: []string{"w1"}, damage: func(d string) { os.Remove(filepath.Join(d, "w1.bundle")) }, want: "reading bundle of w1:", is: isInput},
		{name: "no line for the bundle", nodes: []string{"w1"}, damage: func(d string) {
			s, _ := trust.ReadSums(filepath.Join(d, "SHA256SUMS"))
			delete(s, "w1.bundle")
			s.Write(filepath.Join(d, "SHA256SUMS"))
		}, want: "has no sha256 line for w1.bundle", is: isInput},
		{name: "another node's bundle", nodes: []string{"w1"}, damage: func(d string) {
			b, _ := os.ReadFile(filepath.Join(d, "w2.bundle"))
			os.WriteFile(filepath.Join(d, "w1.bundle"), b, 0o600)
			s, _ := trust.ReadSums(filepath.Join(d, "SHA256SUMS"))
			s["w1.bundle"] = s["w2.bundle"]
			s.Write(filepath.Join(d, "SHA256SUMS"))
		}, want: "it is node w2 of cluster quickstart, not node w1", is: isInput},
		{name: "SHA256SUMS vouches for other bytes", nodes: []string{"w1"}, damage: func(d string) {
			s, _ := trust.ReadSums(filepath.Join(d, "SHA256SUMS"))
			s["w1.bundle"] = trust.Sum{File: strings.Repeat("ab", 32), Manifest: s["w1.bundle"].Manifest}
			s.Write(filepath.Join(d, "SHA256SUMS"))
		}, want: "is not " + strings.Repeat("ab", 32), is: func(err error) bool { return isInput(err) && errors.Is(err, trust.ErrUntrusted) }},
		{name: "padding changed", nodes: []string{"w1"}, damage: func(d string) {
			p := filepath.Join(d, "w1.bundle")
			b, _ := os.ReadFile(p)
			size, _ := strconv.ParseInt(strings.Trim(string(b[124:136]), " \x00"), 8, 64)
			b[512+size] ^= 1
			os.WriteFile(p, b, 0o600)
		}, want: "the padding after the entry is not zero", is: isInput},
		{name: "truncated", nodes: []string{"w1"}, damage: func(d string) {
			p := filepath.Join(d, "w1.bundle")
			b, _ := os.ReadFile(p)
			os.WriteFile(p, b[:len(b)-1024], 0o600)
		}, want: "verifying", is: isInput},
		{name: "an entry damaged", nodes: []string{"cp1"}, damage: func(d string) {
			p := filepath.Join(d, "cp1.bundle")
			b, _ := os.ReadFile(p)
			i := strings.Index(string(b), "BEGIN CERTIFICATE")
			b[i] ^= 0xff
			os.WriteFile(p, b, 0o600)
		}, want: "verifying", is: func(err error) bool { var e *bundle.EntryError; return isInput(err) && errors.As(err, &e) }},
		{name: "too large for FAT32", nodes: []string{"cp1"}, maxSize: 1000, want: "larger than FAT32 allows (1000 B): write an ISO instead (airadm media iso)", is: isInput},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			copyDir(t, out, dir)
			if tt.damage != nil {
				tt.damage(dir)
			}
			_, err := Open(dir, c, tt.nodes, SizeLimit{tt.maxSize, "FAT32"})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Open = %v, want an error containing %q", err, tt.want)
			}
			if !tt.is(err) {
				t.Errorf("Open = %T %v: not the error type that exits 2", err, err)
			}
		})
	}
}

func isInput(err error) bool { var e *InputError; return errors.As(err, &e) }

func copyDir(t testing.TB, from, to string) {
	t.Helper()
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRunner(t *testing.T) {
	self := runner(t)
	notELF := filepath.Join(t.TempDir(), "airadm.sh")
	os.WriteFile(notELF, []byte("#!/bin/sh\n"), 0o755)
	other := map[string]string{"amd64": "arm64"}[runtime.GOARCH]
	if other == "" {
		other = "amd64"
	}
	tests := []struct {
		name, platform, flag string
		want, err            string
	}{
		{name: "same platform", platform: "linux/" + runtime.GOARCH, want: "self"},
		{name: "other platform needs --runner", platform: "linux/" + other, err: "pass --runner with an airadm built for them (GOOS=linux GOARCH=" + other + " go build)"},
		{name: "--runner for the nodes", platform: "linux/" + runtime.GOARCH, flag: self, want: self},
		{name: "--runner for another machine", platform: "linux/" + other, flag: self, err: "it is an ELF for"},
		{name: "--runner not an ELF", platform: "linux/" + runtime.GOARCH, flag: notELF, err: "want an airadm built for linux/" + runtime.GOARCH},
		{name: "not linux", platform: "windows/amd64", err: `the nodes' platform "windows/amd64" is not linux/<arch>`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Runner(tt.platform, tt.flag, "self", "linux", runtime.GOARCH)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) || !isInput(err) {
					t.Fatalf("Runner = %q, %v; want an InputError containing %q", got, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Runner = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}
