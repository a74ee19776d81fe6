package phases

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"airadm.dev/airadm/bundle"
)

// fakeRun is a Run with a journal under a temp root and no bundle files.
func fakeRun(t *testing.T, out *bytes.Buffer) *Run {
	t.Helper()
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "var/lib/airadm"), 0o700); err != nil {
		t.Fatal(err)
	}
	j, err := LoadJournal(root)
	if err != nil {
		t.Fatal(err)
	}
	return &Run{Options: Options{Root: root, Out: out, Timeout: time.Minute}, Manifest: &bundle.Manifest{Cluster: "c", Node: "cp1", Role: "control-plane"}, journal: j}
}

func TestRunConcurrently(t *testing.T) {
	boom := errors.New("boom")
	tests := []struct {
		name string
		// fail names the phase that fails; "" for none.
		fail     string
		wantErr  string
		wantDone []string
	}{
		{"all succeed, the others after the gate", "", "", []string{"wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons"}},
		{"wait fails, the others are stopped and the cause reported", "wait-control-plane", "wait-control-plane: boom", nil},
		{"one step fails, the rest finish and are recorded", "bootstrap-token", "bootstrap-token: boom", []string{"wait-control-plane", "upload-config", "mark-control-plane", "addons"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			r := fakeRun(t, &out)
			var mu sync.Mutex
			var order []string
			var steps []Phase
			for _, name := range apiSteps {
				steps = append(steps, Phase{Name: name, Short: "step " + name, Run: func(ctx context.Context, r *Run) error {
					if name == "wait-control-plane" {
						if tt.fail == name {
							return boom
						}
						r.logf("  ready")
						r.apiIsReady()
						return nil
					}
					// Every other step waits for the gate.
					if err := r.waitAPI(ctx); err != nil {
						return err
					}
					mu.Lock()
					order = append(order, name)
					mu.Unlock()
					if tt.fail == name {
						return boom
					}
					r.logf("  did %s", name)
					return nil
				}})
			}
			var recorded []string
			run := func(ctx context.Context, r *Run, p Phase) error {
				r.logf("[%s] %s", p.Name, p.Short)
				if err := p.Run(ctx, r); err != nil {
					return errors.New(p.Name + ": " + err.Error())
				}
				return nil
			}
			record := func(p Phase) error {
				recorded = append(recorded, p.Name)
				return r.journal.done(r.Root, r.Manifest, "digest", p.Name)
			}
			err := r.runConcurrently(context.Background(), steps, run, record)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
			slices.Sort(recorded)
			want := slices.Clone(tt.wantDone)
			slices.Sort(want)
			if !slices.Equal(recorded, want) {
				t.Errorf("recorded %v, want %v", recorded, want)
			}
			j, _ := LoadJournal(r.Root)
			got := slices.Clone(j.Phases)
			slices.Sort(got)
			if !slices.Equal(got, want) {
				t.Errorf("journal phases %v, want %v", j.Phases, want)
			}
			if tt.fail == "wait-control-plane" && len(order) != 0 {
				t.Errorf("steps %v ran although the apiserver never became ready", order)
			}
			// Each phase's lines stay together.
			for _, name := range tt.wantDone {
				if name == "wait-control-plane" {
					if !strings.Contains(out.String(), "[wait-control-plane] step wait-control-plane\n  ready\n") {
						t.Errorf("wait-control-plane's lines are not together:\n%s", out.String())
					}
					continue
				}
				if !strings.Contains(out.String(), "["+name+"] step "+name+"\n  did "+name+"\n  done in ") {
					t.Errorf("%s's lines are not together:\n%s", name, out.String())
				}
			}
		})
	}
}

func TestPollReportsCancellation(t *testing.T) {
	r := &Run{Options: Options{Timeout: time.Hour}}
	ctx, cancel := context.WithCancelCause(context.Background())
	calls := 0
	err := r.poll(ctx, time.Second, func(context.Context) (bool, error) {
		calls++
		if calls == 3 {
			cancel(errors.New("interrupted"))
		}
		return false, errors.New("not yet")
	})
	if err == nil || !strings.Contains(err.Error(), "interrupted") || strings.Contains(err.Error(), "gave up") || !strings.Contains(err.Error(), "not yet") {
		t.Fatalf("err = %v, want the cancellation's cause with the last error, not a timeout", err)
	}
}

func TestPollTimeout(t *testing.T) {
	r := &Run{Options: Options{Timeout: 50 * time.Millisecond}}
	err := r.poll(context.Background(), time.Millisecond, func(context.Context) (bool, error) {
		return false, errors.New("not yet")
	})
	if err == nil || err.Error() != "gave up after 50ms: not yet" {
		t.Fatalf("err = %v", err)
	}
}

func TestBackoffDelays(t *testing.T) {
	b := newBackoff(time.Second)
	var got []time.Duration
	for range 8 {
		got = append(got, b.next)
		b.next = min(2*b.next, b.cap)
	}
	want := []time.Duration{20 * time.Millisecond, 40 * time.Millisecond, 80 * time.Millisecond, 160 * time.Millisecond, 320 * time.Millisecond, 640 * time.Millisecond, time.Second, time.Second}
	if !slices.Equal(got, want) {
		t.Errorf("delays %v, want %v", got, want)
	}
	if b := newBackoff(5 * time.Millisecond); b.next != 5*time.Millisecond {
		t.Errorf("a cap below the first delay: first %v", b.next)
	}
}

func TestRetryStopsOnCancelAndStopRetry(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	n := 0
	err := retry(ctx, "creating x", func(context.Context) error {
		n++
		if n == 2 {
			cancel()
		}
		return errors.New("refused")
	})
	if err == nil || !strings.Contains(err.Error(), "creating x: context canceled") || !strings.Contains(err.Error(), "refused") {
		t.Errorf("cancelled retry: %v", err)
	}
	err = retry(context.Background(), "creating y", func(context.Context) error { return &stopRetry{errTokenRejected} })
	if !errors.Is(err, errTokenRejected) {
		t.Errorf("stopRetry: %v", err)
	}
}

// The API steps send a few dozen requests at once; client-go's default
// limiter (5 a second after a burst of 10) spread them over more than half
// a second after /readyz.
func TestClientIsNotRateLimitedToDefaults(t *testing.T) {
	r := fakeRun(t, nil)
	kc := filepath.Join(r.Root, "etc/kubernetes/super-admin.conf")
	if err := os.MkdirAll(filepath.Dir(kc), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	cs, err := r.Client(superAdmin)
	if err != nil {
		t.Fatal(err)
	}
	if qps := cs.CoreV1().RESTClient().GetRateLimiter().QPS(); qps < 100 {
		t.Errorf("client QPS %v: the API steps' burst would be throttled", qps)
	}
}
