package main

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/term"

	"airadm.dev/airadm/bundle"
)

func isTerminal(f *os.File) bool { return term.IsTerminal(int(f.Fd())) }

// progress draws one self-updating line on a terminal and nothing otherwise,
// so logs and pipes stay quiet.
type progress struct {
	env  *Env
	mu   sync.Mutex
	drew bool
}

func newProgress(env *Env) *progress { return &progress{env: env} }

func (p *progress) pull(s bundle.Progress) {
	if !p.env.IsTerminal {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.env.Stderr, "\rpulling images: %d/%d blobs, %.1f/%.1f MB ", s.Blobs, s.TotalBlobs, float64(s.Bytes)/1e6, float64(s.TotalBytes)/1e6)
	p.drew = true
}

func (p *progress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.drew {
		fmt.Fprintln(p.env.Stderr)
		p.drew = false
	}
}

// line shows a changing status line on a terminal.
func (p *progress) line(s string) {
	if !p.env.IsTerminal {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.env.Stderr, "\r%s ", s)
	p.drew = true
}
