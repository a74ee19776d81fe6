package phases

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/rest"
)

// apiSteps are the control-plane phases that need nothing but the API:
// once wait-control-plane has seen /readyz, none of them waits for
// another, so apply runs them at once (wait-control-plane itself included,
// since its cluster-admins binding is just another API call). Each is
// still a phase of its own: run alone, logged and journaled by name.
var apiSteps = []string{"wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons"}

// concurrentSteps returns how many phases at the head of plan are API
// steps that apply runs together (0 or 1: run it the ordinary way).
func concurrentSteps(plan []Phase, dryRun bool) int {
	if dryRun {
		return 0 // nothing waits in a dry run, and its output keeps its order
	}
	n := 0
	for n < len(plan) && isAPIStep(plan[n].Name) {
		n++
	}
	return n
}

func isAPIStep(name string) bool {
	for _, s := range apiSteps {
		if s == name {
			return true
		}
	}
	return false
}

// apiRateLimits lifts client-go's default client-side limit (5 requests a
// second after a burst of 10) for apply's clients: the API steps send a
// few dozen requests at once, once, and the default limiter alone spread
// them over half a second or more after /readyz.
func apiRateLimits(cfg *rest.Config) {
	cfg.QPS, cfg.Burst = 200, 400
}

// apiGate is closed by wait-control-plane once the apiserver answers
// /readyz; the other API steps of the same run start then. It is nil when
// wait-control-plane is not part of the run, and they start at once
// (their retries cover an apiserver that is still settling).
type apiGate = *gate

type gate struct {
	open chan struct{}
	at   time.Time // when it opened; read only after open is closed
}

// waitAPI blocks until this run's apiserver is ready, or ctx ends.
func (r *Run) waitAPI(ctx context.Context) error {
	if r.apiReady == nil {
		return nil
	}
	select {
	case <-r.apiReady.open:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// apiIsReady opens the gate for the other API steps; only
// wait-control-plane calls it, once per run.
func (r *Run) apiIsReady() {
	if r.apiReady != nil {
		r.apiReady.at = time.Now()
		close(r.apiReady.open)
	}
}

// runConcurrently runs steps at once. Each phase logs into a buffer of its
// own, printed whole when it ends, so its lines stay together; record (the
// journal) is called for each phase that finished, one at a time. The
// first failure cancels the others, and is the error returned: the others
// only report that they were stopped.
func (r *Run) runConcurrently(ctx context.Context, steps []Phase, run func(context.Context, *Run, Phase) error, record func(Phase) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	for _, p := range steps {
		if p.Name == "wait-control-plane" {
			r.apiReady = &gate{open: make(chan struct{})}
		}
	}
	names := make([]string, len(steps))
	for i, p := range steps {
		names[i] = p.Name
	}
	r.logf("at once: %s (each printed when done)", strings.Join(names, ", "))
	// One client for all, made before they share the Run; if it cannot be
	// made, each phase says so.
	r.Client(superAdmin)
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		firstErr error
	)
	for _, p := range steps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf bytes.Buffer
			rc := *r
			rc.Out = &buf
			rc.Progress = nil
			start := time.Now()
			err := run(ctx, &rc, p)
			if err == nil {
				// A step that waited for the apiserver is timed from then.
				if g := r.apiReady; g != nil && p.Name != "wait-control-plane" {
					start = g.at
				}
				rc.logf("  done in %v", time.Since(start).Round(time.Millisecond))
			}
			mu.Lock()
			defer mu.Unlock()
			if r.Out != nil {
				r.Out.Write(buf.Bytes())
			}
			if err == nil {
				err = record(p)
			}
			if err != nil && firstErr == nil {
				// The first to fail is the cause; those that end after it
				// were stopped because of it.
				firstErr = err
				cancel(err)
			}
		}()
	}
	wg.Wait()
	return firstErr
}
