package build

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

// TestMain lets a test run a build in a child process of its own binary, so
// that the child can be killed for real.
func TestMain(m *testing.M) {
	if cfg := os.Getenv("AIRADM_TEST_BUILD_CHILD"); cfg != "" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		// A parent that signals this process waits for this line: a SIGTERM
		// before the handler is in place kills as SIGKILL does, which is
		// not the case a graceful stop is tested for.
		fmt.Println(childStarted)
		secs, _ := strconv.ParseInt(os.Getenv("AIRADM_TEST_BUILD_TIME"), 10, 64)
		var err error
		if os.Getenv("AIRADM_TEST_BUILD_PACK") != "" {
			_, err = packRun(ctx, cfg, os.Getenv("AIRADM_TEST_BUILD_OUT"), time.Unix(secs, 0))
			// The parent reads this process's peak RSS from here.
			fmt.Printf("peak-rss-mib %.1f\n", peakRSSMiB())
		} else {
			_, err = quickBuild(ctx, cfg, os.Getenv("AIRADM_TEST_BUILD_OUT"), time.Unix(secs, 0))
		}
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const childStarted = "build-child-started"

func quickBuild(ctx context.Context, cfg, out string, at time.Time) (*Result, error) {
	c, err := render.Load(cfg)
	if err != nil {
		return nil, err
	}
	return Run(ctx, Options{
		ConfigPath: cfg, Cluster: c, Out: out, CacheDir: filepath.Join(filepath.Dir(cfg), ".cache"), Jobs: 4,
		BuildTime: at, Now: time.Now, Rand: rand.Reader,
	})
}

// quickstart copies the quickstart's config and image layout (not its
// secrets) into a temporary directory and returns the config's path.
func quickstart(t testing.TB) string {
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
	return filepath.Join(dir, "cluster.toml")
}

// checkSums asserts what SHA256SUMS promises: every file it names exists
// and has the sha256 of its line.
func checkSums(t *testing.T, out, when string) {
	t.Helper()
	sums, err := trust.ReadSums(filepath.Join(out, trust.SumsFile))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err != nil {
		t.Fatalf("%s: %v", when, err)
	}
	for _, name := range sums.Names() {
		f, err := os.Open(filepath.Join(out, name))
		if err != nil {
			t.Fatalf("%s: SHA256SUMS names %s: %v", when, name, err)
		}
		h := sha256.New()
		io.Copy(h, f)
		f.Close()
		if got := hex.EncodeToString(h.Sum(nil)); got != sums[name].File {
			t.Fatalf("%s: %s has sha256 %s, SHA256SUMS says %s", when, name, got, sums[name].File)
		}
	}
}

func leftovers(out string) []string {
	var found []string
	entries, _ := os.ReadDir(out)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), stagingPrefix) || strings.Contains(e.Name(), ".tmp-") {
			found = append(found, e.Name())
		}
	}
	return found
}

// TestInterruptedBuild kills rebuilds at moments spread over a build, with
// SIGTERM (handled: stop, clean up) and SIGKILL (nothing handled). After
// each, every bundle SHA256SUMS names matches its line; the next build
// removes what a killed one left.
func TestInterruptedBuild(t *testing.T) {
	cfg := quickstart(t)
	out := filepath.Join(t.TempDir(), "out")
	start := time.Now()
	if _, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225600, 0)); err != nil {
		t.Fatal(err)
	}
	// A rebuild with warm secrets and cache, measured to spread the kills.
	start = time.Now()
	if _, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225601, 0)); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	const rounds = 12
	for i := 0; i < rounds; i++ {
		sig := syscall.SIGKILL
		if i%2 == 1 {
			sig = syscall.SIGTERM
		}
		delay := took * time.Duration(i+1) / rounds
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), "AIRADM_TEST_BUILD_CHILD="+cfg, "AIRADM_TEST_BUILD_OUT="+out,
			fmt.Sprintf("AIRADM_TEST_BUILD_TIME=%d", 1767225700+i))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// The delay counts from the build's start, not the process's: on a
		// loaded machine the runtime's own start can take longer than a
		// warm build.
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil || strings.TrimSpace(line) != childStarted {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("round %d: the child did not start: %q, %v", i, line, err)
		}
		time.Sleep(delay)
		cmd.Process.Signal(sig)
		err = cmd.Wait()
		when := fmt.Sprintf("round %d (%v after %v, exit %v)", i, sig, delay, err)
		checkSums(t, out, when)
		if sig == syscall.SIGTERM {
			if l := leftovers(out); len(l) > 0 {
				t.Errorf("%s: a build stopped by SIGTERM left %v", when, l)
			}
		}
	}
	if _, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225800, 0)); err != nil {
		t.Fatal(err)
	}
	checkSums(t, out, "after a full build")
	if l := leftovers(out); len(l) > 0 {
		t.Errorf("a full build left %v behind", l)
	}
}

// countdownCtx reports itself cancelled once Err has been asked n times:
// a cancellation at an exact point of a build, however fast the build.
type countdownCtx struct {
	context.Context
	n, calls atomic.Int64
}

func (c *countdownCtx) Err() error {
	if c.calls.Add(1) > c.n.Load() {
		return context.Canceled
	}
	return nil
}

// TestCancelledBuild: a build cancelled at any point (SIGINT or SIGTERM in
// the CLI) leaves out/ exactly as it was.
func TestCancelledBuild(t *testing.T) {
	cfg := quickstart(t)
	out := filepath.Join(t.TempDir(), "out")
	if _, err := quickBuild(context.Background(), cfg, out, time.Unix(1767225600, 0)); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(out, trust.SumsFile))
	count := &countdownCtx{Context: context.Background()}
	count.n.Store(1 << 62)
	if _, err := quickBuild(count, cfg, out, time.Unix(1767225600, 0)); err != nil {
		t.Fatal(err)
	}
	total := count.calls.Load()
	// At least once per bundle written, and once before the swap.
	if total < 4 {
		t.Fatalf("a build of 3 bundles checks for cancellation only %d times", total)
	}
	for at := int64(0); at < total; at++ {
		ctx := &countdownCtx{Context: context.Background()}
		ctx.n.Store(at)
		_, err := quickBuild(ctx, cfg, out, time.Unix(1767225601, 0))
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("build cancelled at check %d of %d returned %v", at, total, err)
		}
		after, _ := os.ReadFile(filepath.Join(out, trust.SumsFile))
		if string(before) != string(after) {
			t.Errorf("cancelled at check %d of %d: SHA256SUMS changed:\n%s\n->\n%s", at, total, before, after)
		}
		checkSums(t, out, fmt.Sprintf("cancelled at check %d of %d", at, total))
		if l := leftovers(out); len(l) > 0 {
			t.Errorf("cancelled at check %d of %d: left %v", at, total, l)
		}
	}
}
