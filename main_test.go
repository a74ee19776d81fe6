package main

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"airadm": func() {
			os.Exit(run(os.Args[1:], &Env{Stdout: os.Stdout, Stderr: os.Stderr, Now: time.Now, Rand: rand.Reader, Getenv: os.Getenv}))
		},
	})
}

// TestScript runs the CLI scenarios in testdata/script, each a txtar file
// of commands with their expected output and exit status.
func TestScript(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir: "testdata/script",
		Setup: func(e *testscript.Env) error {
			// The quickstart (config and image layout, not its secrets) is
			// every script's to use; images are cached per script.
			e.Setenv("AIRADM_CACHE", filepath.Join(e.WorkDir, ".cache"))
			return copyTree("testdata/quickstart", filepath.Join(e.WorkDir, "quickstart"), "secrets")
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			// flipbyte SRC TEXT DST: DST is SRC with the first byte of the
			// first TEXT in it inverted.
			"flipbyte": func(ts *testscript.TestScript, neg bool, args []string) {
				if len(args) != 3 {
					ts.Fatalf("usage: flipbyte SRC TEXT DST")
				}
				b, err := os.ReadFile(ts.MkAbs(args[0]))
				ts.Check(err)
				i := bytes.Index(b, []byte(args[1]))
				if i < 0 {
					ts.Fatalf("%s does not contain %q", args[0], args[1])
				}
				b[i] ^= 0xff
				ts.Check(os.WriteFile(ts.MkAbs(args[2]), b, 0o644))
			},
			// padflip SRC DST: DST is SRC with one byte of tar padding
			// after the manifest entry (or, with none, of the
			// end-of-archive blocks) set, outside every entry's data.
			"padflip": func(ts *testscript.TestScript, neg bool, args []string) {
				if len(args) != 2 {
					ts.Fatalf("usage: padflip SRC DST")
				}
				b, err := os.ReadFile(ts.MkAbs(args[0]))
				ts.Check(err)
				size, err := strconv.ParseInt(strings.Trim(string(b[124:136]), " \x00"), 8, 64)
				ts.Check(err)
				i := len(b) - 1
				if size%512 != 0 {
					i = 512 + int(size)
				}
				b[i] ^= 0x01
				ts.Check(os.WriteFile(ts.MkAbs(args[1]), b, 0o644))
			},
			// exit2 PROG ARGS...: PROG exits with status 2, bad input;
			// stdout and stderr are kept for the next commands.
			"exit2": func(ts *testscript.TestScript, neg bool, args []string) {
				if neg || len(args) == 0 {
					ts.Fatalf("usage: exit2 PROG ARGS...")
				}
				err := ts.Exec(args[0], args[1:]...)
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() != 2 {
					ts.Fatalf("%s: want exit status 2, got %v", args[0], err)
				}
			},
			// reencrypt [-truncate] SRC IDENTITY RECIPIENTFILE DST: DST is
			// bundle SRC with every encrypted file decrypted with IDENTITY
			// and encrypted again by the real age CLI to the recipient in
			// RECIPIENTFILE, the manifest updated to match; with -truncate,
			// each such entry is cut inside its age header instead.
			"reencrypt": func(ts *testscript.TestScript, neg bool, args []string) {
				truncate := len(args) > 0 && args[0] == "-truncate"
				if truncate {
					args = args[1:]
				}
				if neg || len(args) != 4 {
					ts.Fatalf("usage: reencrypt [-truncate] SRC IDENTITY RECIPIENTFILE DST")
				}
				rcpt, err := os.ReadFile(ts.MkAbs(args[2]))
				ts.Check(err)
				ts.Check(reencrypt(ts.MkAbs(args[0]), ts.MkAbs(args[1]), strings.TrimSpace(string(rcpt)), ts.MkAbs(args[3]), truncate))
			},
			// truncate SRC LEN DST: DST is the first LEN bytes of SRC.
			"truncate": func(ts *testscript.TestScript, neg bool, args []string) {
				b, n := readArgs(ts, args)
				ts.Check(os.WriteFile(ts.MkAbs(args[2]), b[:n], 0o644))
			},
		},
	})
}

func readArgs(ts *testscript.TestScript, args []string) ([]byte, int) {
	if len(args) != 3 {
		ts.Fatalf("usage: SRC N DST")
	}
	b, err := os.ReadFile(ts.MkAbs(args[0]))
	ts.Check(err)
	n, err := strconv.Atoi(args[1])
	ts.Check(err)
	if n >= len(b) {
		ts.Fatalf("%s has only %d bytes", args[0], len(b))
	}
	return b, n
}

func copyTree(src, dst, skip string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if rel == skip {
			return filepath.SkipDir
		}
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o644)
	})
}

// TestExitCodes: 2 for bad usage and bad input (a config error, a damaged
// bundle), 0 for success.
func TestExitCodes(t *testing.T) {
	dir := t.TempDir()
	if err := copyTree("testdata/quickstart", filepath.Join(dir, "qs"), "secrets"); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	env := &Env{Stdout: &out, Stderr: &out, Now: time.Now, Rand: rand.Reader, Getenv: func(string) string { return "" }}
	cfg := filepath.Join(dir, "qs", "cluster.toml")
	outDir := filepath.Join(dir, "out")
	if code := run([]string{"build", "-c", cfg, "-o", outDir, "w1"}, env); code != 0 {
		t.Fatalf("build exited %d:\n%s", code, out.String())
	}
	b, _ := os.ReadFile(filepath.Join(outDir, "w1.bundle"))
	i := bytes.Index(b, []byte("tls-bootstrap-token-user"))
	b[i] ^= 0xff
	bad := filepath.Join(dir, "bad.bundle")
	os.WriteFile(bad, b, 0o600)
	for _, c := range []struct {
		args []string
		want int
	}{
		{[]string{"verify", filepath.Join(outDir, "w1.bundle")}, 0},
		{[]string{"verify", "--allow-unauthenticated", bad}, 2},
		{[]string{"apply", "--allow-unauthenticated", "--root", filepath.Join(dir, "host"), "--node", "w1", bad}, 2},
		{[]string{"apply", "--skip-phases", "nope", bad}, 2},
		{[]string{"render", "-c", filepath.Join(dir, "missing.toml"), "-o", filepath.Join(dir, "r"), "cp1"}, 2},
		{[]string{"no-such-command"}, 2},
	} {
		out.Reset()
		if code := run(c.args, env); code != c.want {
			t.Errorf("airadm %v exited %d, want %d:\n%s", c.args, code, c.want, out.String())
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "host")); !os.IsNotExist(err) {
		t.Error("apply of a damaged bundle created the host root")
	}
}

// reencrypt rewrites a bundle as the reencrypt script command says, with
// the header conventions bundle.Write uses.
func reencrypt(src, identity, recipient, dst string, truncate bool) error {
	id, err := trust.LoadIdentity(identity)
	if err != nil {
		return err
	}
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	type entry struct {
		hdr  *tar.Header
		data []byte
	}
	var entries []entry
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			return err
		}
		entries = append(entries, entry{h, b})
	}
	m, err := bundle.DecodeManifest(entries[0].data)
	if err != nil {
		return err
	}
	for i, fe := range m.Files {
		if !fe.Encrypted() {
			continue
		}
		for j := range entries {
			if entries[j].hdr.Name != "files"+fe.Path {
				continue
			}
			r, err := id.Decrypt(bytes.NewReader(entries[j].data))
			if err != nil {
				return err
			}
			plain, err := io.ReadAll(r)
			if err != nil {
				return err
			}
			cmd := exec.Command("age", "-e", "-r", recipient)
			cmd.Stdin = bytes.NewReader(plain)
			var out, errOut bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errOut
			if err := cmd.Run(); err != nil {
				return fmt.Errorf("age -e (Debian package age): %v: %s", err, errOut.String())
			}
			data := out.Bytes()
			if truncate {
				data = data[:30] // inside "age-encryption.org/v1\n-> X25519 ..."
			}
			sum := sha256.Sum256(data)
			m.Files[i].Size, m.Files[i].SHA256 = int64(len(data)), hex.EncodeToString(sum[:])
			entries[j].data = data
		}
	}
	if _, m.Recipient, err = render.ParseRecipient(recipient); err != nil {
		return err
	}
	if entries[0].data, err = m.Encode(); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	tw := tar.NewWriter(out)
	for _, e := range entries {
		h := &tar.Header{Typeflag: tar.TypeReg, Name: e.hdr.Name, Mode: e.hdr.Mode, Size: int64(len(e.data)), ModTime: time.Unix(0, 0).UTC(), Format: tar.FormatUSTAR}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(e.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

// TestMediaProgress: on a terminal the media commands draw how much has
// been verified and written, ending at the totals; otherwise stderr stays
// empty, and --json's stdout is the object alone.
func TestMediaProgress(t *testing.T) {
	dir := t.TempDir()
	if err := copyTree("testdata/quickstart", filepath.Join(dir, "qs"), "secrets"); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "qs", "cluster.toml")
	outDir := filepath.Join(dir, "out")
	var stdout, stderr bytes.Buffer
	env := &Env{Stdout: &stdout, Stderr: &stderr, Now: time.Now, Rand: rand.Reader, Getenv: func(string) string { return "" }}
	if code := run([]string{"build", "-c", cfg, "-o", outDir}, env); code != 0 {
		t.Fatalf("build exited %d:\n%s", code, stderr.String())
	}
	size := `([0-9.]+ (?:B|KiB|MiB|GiB))`
	line := regexp.MustCompile(`\rverified ` + size + ` of ` + size + `, written ` + size + ` of ` + size + ` \n$`)
	for _, args := range [][]string{
		{"media", "iso", "-o", filepath.Join(dir, "c.iso")},
		{"media", "usb", "-o", filepath.Join(dir, "c.img")},
		{"media", "cidata", "-o", filepath.Join(dir, "s.iso"), "w1"},
		{"media", "cidata", "--format", "fat", "-o", filepath.Join(dir, "s.img"), "w1"},
	} {
		args = append(args, "-c", cfg, "--from", outDir)
		for _, tty := range []bool{true, false} {
			stdout.Reset()
			stderr.Reset()
			env.IsTerminal = tty
			if code := run(append(args, "--json"), env); code != 0 {
				t.Fatalf("airadm %v exited %d:\n%s", args, code, stderr.String())
			}
			if !json.Valid(stdout.Bytes()) {
				t.Errorf("airadm %v --json: stdout is not JSON:\n%s", args, stdout.String())
			}
			if !tty {
				if stderr.Len() != 0 {
					t.Errorf("airadm %v, not on a terminal, wrote to stderr:\n%q", args, stderr.String())
				}
				continue
			}
			m := line.FindStringSubmatch(stderr.String())
			if m == nil || m[1] != m[2] || m[3] != m[4] || m[4] == "0 B" {
				t.Errorf("airadm %v on a terminal: the progress line does not end at its totals:\n%q", args, stderr.String())
			}
		}
	}
}
