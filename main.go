// Command airadm does what kubeadm does, split at the air gap: build one
// self-contained file per node on a connected machine, apply it on the
// air-gapped host.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/alecthomas/kong"

	"airadm.dev/airadm/build"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

// CLI is the whole command line; each leaf command is a struct with Run.
type CLI struct {
	Init    InitCmd    `cmd:"" help:"Write a commented cluster.toml template."`
	Build   BuildCmd   `cmd:"" help:"Render, pull and write one bundle per node, and SHA256SUMS."`
	Render  RenderCmd  `cmd:"" help:"Write a node's file tree (what its bundle carries, without images) for review."`
	Inspect InspectCmd `cmd:"" help:"Describe a bundle: node, files, images and certificate expiry."`
	Verify  VerifyCmd  `cmd:"" help:"Check every byte of a bundle against its manifest."`
	Apply   ApplyCmd   `cmd:"" help:"Verify a bundle and bring this host up as its node."`
	Reset   ResetCmd   `cmd:"" help:"Undo apply on this host (best effort, like kubeadm reset)."`
	Status  StatusCmd  `cmd:"" help:"List this host's certificates and kubeconfig client certificates with their expiry."`
	Images  ImagesCmd  `cmd:"" help:"Container images of the cluster."`
	Media   MediaCmd   `cmd:"" help:"Write install media (ISO, USB image, cloud-init seed) from built bundles."`
	Version VersionCmd `cmd:"" help:"Print the airadm and pinned Kubernetes versions."`
}

// Env is what commands get from the outside world; tests replace it.
type Env struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	Now    func() time.Time
	Rand   io.Reader
	Getenv func(string) string
	// IsTerminal reports whether progress may be drawn on Stderr.
	IsTerminal bool
}

// usageError marks bad usage or bad input: exit code 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// signalContext is cancelled by SIGINT or SIGTERM (what systemd and
// cloud-init send), so long commands stop at a safe point.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func main() {
	env := &Env{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Now: time.Now, Rand: rand.Reader, Getenv: os.Getenv, IsTerminal: isTerminal(os.Stderr)}
	os.Exit(run(os.Args[1:], env))
}

// run parses args, runs the command and prints any error once, returning
// the exit code: 0 success, 1 failure, 2 bad usage or input.
func run(args []string, env *Env) (code int) {
	var cli CLI
	exited := false
	parser, err := kong.New(&cli,
		kong.Name("airadm"),
		kong.Description("kubeadm, split at the air gap."),
		kong.UsageOnError(),
		kong.Writers(env.Stdout, env.Stderr),
		kong.Exit(func(c int) { exited, code = true, c }),
		kong.Bind(env),
		kong.Vars{"phases": phaseNames()},
		kong.Help(helpPrinter),
	)
	if err != nil {
		fmt.Fprintf(env.Stderr, "airadm: %v\n", err)
		return 1
	}
	// A bare `airadm` and `airadm help [COMMAND...]` show help, as users
	// of kubeadm and most CLIs expect.
	if len(args) == 0 {
		args = []string{"--help"}
	} else if args[0] == "help" {
		args = append(slices.Clone(args[1:]), "--help")
	}
	ctx, err := parser.Parse(args)
	if exited {
		return code
	}
	if err != nil {
		fmt.Fprintf(env.Stderr, "airadm: %v\n", err)
		return 2
	}
	if err := ctx.Run(); err != nil {
		return report(env.Stderr, err)
	}
	return 0
}

// report prints err as one or more "airadm: ..." lines and picks the exit code.
func report(w io.Writer, err error) int {
	code := 1
	var ue usageError
	var be *bundle.EntryError
	var ie *build.InputError
	if errors.As(err, &ue) || errors.As(err, &be) || errors.As(err, &ie) || errors.Is(err, trust.ErrUntrusted) || errors.Is(err, phases.ErrRefused) {
		code = 2 // bad input: a damaged, truncated or unvouched-for bundle
	}
	var ce *render.ConfigError
	if errors.As(err, &ce) {
		for _, l := range ce.Lines() {
			fmt.Fprintf(w, "airadm: %s\n", l)
		}
		return 2
	}
	fmt.Fprintf(w, "airadm: %v\n", err)
	return code
}

// applyUsage is how kong would summarise apply's three positionals, and
// applyForms how users type them.
const (
	applyUsage = "apply <bundle> [<name> [<phase-bundle>]]"
	applyForms = "apply (<bundle> | phase <name> <phase-bundle>)"
)

// helpPrinter is kong's own help, with apply's two forms spelled out.
func helpPrinter(o kong.HelpOptions, ctx *kong.Context) error {
	var buf bytes.Buffer
	w := ctx.Stdout
	ctx.Stdout = &buf
	err := kong.DefaultHelpPrinter(o, ctx)
	ctx.Stdout = w
	if err != nil {
		return err
	}
	_, err = io.WriteString(w, strings.ReplaceAll(buf.String(), applyUsage, applyForms))
	return err
}
