package e2e_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// timeline is one side's bring-up, timed from outside: when the command
// started, when kubelet started, when the apiserver's /readyz first
// answered ok, and when the command returned.
type timeline struct {
	start, kubelet, readyz, end time.Time
	// healthy is when the controller-manager and the scheduler both
	// answered their health checks too (kubeadm init waits for it; airadm
	// apply does not).
	healthy time.Time
	// cpu is the host's CPU use over the whole run: the floor depends on
	// what else this small machine was doing.
	cpu cpuSample
	// phases holds when each "[phase]" line of airadm's output appeared.
	phases []stamp
}

type stamp struct {
	what string
	at   time.Time
	took string // as the phase reported it, if it did
}

func (tl timeline) wall() time.Duration { return tl.end.Sub(tl.start) }

// since formats b-a, or "?" when either is unknown.
func since(a, b time.Time) string {
	if a.IsZero() || b.IsZero() {
		return "?"
	}
	return b.Sub(a).Round(10 * time.Millisecond).String()
}

// phaseDurations turns the phase stamps into "name 0.12s" pairs. A phase
// that reported "done in" (those apply runs at once) is given that; any
// other lasts until the next one started, the last until the end. The
// first pair is the verification of the bundle, before any phase.
func (tl timeline) phaseDurations() string {
	var parts []string
	if len(tl.phases) > 0 {
		parts = append(parts, "verify "+since(tl.start, tl.phases[0].at))
	}
	for i, p := range tl.phases {
		if p.took == "-" {
			continue // a boundary, not a phase
		}
		if p.took != "" {
			parts = append(parts, p.what+" "+p.took)
			continue
		}
		next := tl.end
		if i+1 < len(tl.phases) {
			next = tl.phases[i+1].at
		}
		parts = append(parts, p.what+" "+since(p.at, next))
	}
	return strings.Join(parts, ", ")
}

// runStreaming runs cmd, calling onLine with each output line as it
// arrives and the time it arrived; it returns the whole output.
func runStreaming(cmd *exec.Cmd, onLine func(line string, at time.Time)) (string, error) {
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	var out strings.Builder
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			at := time.Now()
			out.WriteString(sc.Text() + "\n")
			if onLine != nil {
				onLine(sc.Text(), at)
			}
		}
		io.Copy(io.Discard, pr)
	}()
	err := cmd.Start()
	if err == nil {
		err = cmd.Wait()
	}
	pw.Close()
	<-done
	return out.String(), err
}

// watchReadyz polls https://addr:6443/readyz every 20 ms from the test's
// own network until it answers ok, and returns a function that stops the
// poll and reports when that was (zero if never). The same probe times
// both kubeadm and airadm.
func watchReadyz(ctx context.Context, addr string) func() time.Time {
	// stop ends the loop after the request in flight, which is not
	// cancelled: when apply returns within a poll interval of /readyz (it
	// takes ~20 ms after it), that request is the one that sees it.
	stop := make(chan struct{})
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		// Only the readiness answer is read, anonymously.
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}}
	var at time.Time
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+":6443/readyz", nil)
			sent := time.Now()
			if resp, err := client.Do(req); err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK && string(b) == "ok" {
					// The answer was true somewhere between sending and now.
					at = sent.Add(time.Since(sent) / 2)
					return
				}
			}
			select {
			case <-ctx.Done():
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	return func() time.Time {
		close(stop)
		wg.Wait()
		return at
	}
}

// watchNodeReady watches Node name and reports when it is first Ready.
func watchNodeReady(ctx context.Context, cs kubernetes.Interface, name string) <-chan time.Time {
	ch := make(chan time.Time, 1)
	go func() {
		for ctx.Err() == nil {
			w, err := cs.CoreV1().Nodes().Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name})
			if err != nil {
				select {
				case <-ctx.Done():
				case <-time.After(50 * time.Millisecond):
				}
				continue
			}
			for ev := range w.ResultChan() {
				n, ok := ev.Object.(*corev1.Node)
				if !ok {
					continue
				}
				for _, c := range n.Status.Conditions {
					if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
						w.Stop()
						ch <- time.Now()
						return
					}
				}
			}
		}
	}()
	return ch
}

// median of ds, for reports over several rounds.
func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

func ratio(a, b time.Duration) string {
	if b == 0 {
		return "?"
	}
	return fmt.Sprintf("%.2f", float64(a)/float64(b))
}

// cpuSample is the host's busy and total jiffies from /proc/stat, and the
// CPU time (ns) the e2e nodes' pods used (their cgroup roots).
type cpuSample struct{ busy, total, pods uint64 }

func readCPU() cpuSample {
	var s cpuSample
	roots, _ := filepath.Glob("/sys/fs/cgroup/cpuacct/airadm-e2e-*/cpuacct.usage")
	for _, r := range roots {
		b, _ := os.ReadFile(r)
		v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		s.pods += v
	}
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return s
	}
	line, _, _ := strings.Cut(string(b), "\n")
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		s.total += v
		if i != 3 && i != 4 { // idle, iowait
			s.busy += v
		}
	}
	return s
}

// busy describes CPU use between a and b, with the load average at b.
func busy(a, b cpuSample) string {
	load, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(load))
	l := "?"
	if len(f) > 0 {
		l = f[0]
	}
	if b.total <= a.total {
		return "host CPU ?, load " + l
	}
	// jiffies are 1/100 s on these kernels (USER_HZ).
	busyS := float64(b.busy-a.busy) / 100
	podsS := float64(b.pods-a.pods) / 1e9
	return fmt.Sprintf("host CPU %.0f%% busy (%.1f CPU-s, of which the control-plane pods %.1f), load %s",
		100*float64(b.busy-a.busy)/float64(b.total-a.total), busyS, podsS, l)
}

// watchComponents polls, from inside netns, the controller-manager's and
// the scheduler's health endpoints (they listen on 127.0.0.1 only) every
// 20 ms until both answer ok. The function it returns waits up to limit
// for that and reports when it was (zero if never).
func watchComponents(ctx context.Context, netns string) func(limit time.Duration) time.Time {
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		DialContext: dialIn(netns),
		// Only the health answers are read, anonymously.
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		DisableKeepAlives: true,
	}}
	ok := func(url string) bool {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	done := make(chan time.Time, 1)
	go func() {
		pending := []string{"https://127.0.0.1:10257/healthz", "https://127.0.0.1:10259/livez"}
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for len(pending) > 0 {
			if ok(pending[0]) {
				pending = pending[1:]
				continue
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
		done <- time.Now()
	}()
	return func(limit time.Duration) time.Time {
		select {
		case at := <-done:
			return at
		case <-time.After(limit):
			return time.Time{}
		}
	}
}

// dialIn dials from inside network namespace netns: the socket is made on
// a thread moved into it and back. The thread must come back rather than
// be thrown away: the harness starts processes with Pdeathsig, which fires
// when the thread that forked them ends, and any thread may have.
func dialIn(netns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			runtime.LockOSThread()
			home, err := os.Open("/proc/thread-self/ns/net")
			if err != nil {
				runtime.UnlockOSThread()
				ch <- result{nil, err}
				return
			}
			defer home.Close()
			f, err := os.Open("/run/netns/" + netns)
			if err != nil {
				runtime.UnlockOSThread()
				ch <- result{nil, err}
				return
			}
			defer f.Close()
			if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
				runtime.UnlockOSThread()
				ch <- result{nil, err}
				return
			}
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if unix.Setns(int(home.Fd()), unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			} // else the thread stays locked and ends with this goroutine
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}

// settle waits, up to limit, until the host's CPU has been at most 25%
// busy over half a second, and returns the last half-second's figure. A
// join timed right after the control plane's start would otherwise pay
// for whatever its pods were still doing, and the two joins are timed at
// different moments.
func settle(limit time.Duration) string {
	deadline := time.Now().Add(limit)
	for {
		a := readCPU()
		time.Sleep(500 * time.Millisecond)
		b := readCPU()
		pct := 0.0
		if b.total > a.total {
			pct = 100 * float64(b.busy-a.busy) / float64(b.total-a.total)
		}
		if pct <= 25 || time.Now().After(deadline) {
			return fmt.Sprintf("%.0f%%", pct)
		}
	}
}

// join is one timed join: start to Node Ready, and how busy the host's
// CPU was just before it.
type join struct {
	took time.Duration
	busy string
}

func medianJoin(js []join) time.Duration {
	var ds []time.Duration
	for _, j := range js {
		ds = append(ds, j.took)
	}
	return median(ds)
}

func joinList(js []join) string {
	var parts []string
	for _, j := range js {
		parts = append(parts, fmt.Sprintf("%s (%s)", j.took.Round(10*time.Millisecond), j.busy))
	}
	return strings.Join(parts, ", ")
}
