package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"time"

	"airadm.dev/airadm/phases"
)

// ApplyCmd runs a bundle's phases on this host.
type ApplyCmd struct {
	All   ApplyAllCmd   `cmd:"" name:"all" default:"withargs" help:"Run every phase; the default, so airadm apply BUNDLE does this."`
	Phase ApplyPhaseCmd `cmd:"" help:"Run one phase: ${phases}."`
}

type applyFlags struct {
	ManifestDigest        string        `help:"Manifest digest to authenticate the bundle against (default: SHA256SUMS beside it)."`
	Root                  string        `default:"/" help:"Treat DIR as the host's / (tests, image building)."`
	DryRun                bool          `help:"Print what each phase would do; change nothing."`
	Node                  string        `help:"Apply even though the host name differs from the bundle's node."`
	IgnorePreflightErrors []string      `sep:"," help:"Preflight checks to ignore by name, or all."`
	CRISocket             string        `name:"cri-socket" help:"Container runtime endpoint (default: the bundle's kubelet config)."`
	ContainerdConfig      string        `help:"containerd's config file, read for its sandbox image (default: /etc/containerd/config.toml)."`
	Kubelet               string        `enum:"systemd,exec," default:"" help:"How to start kubelet: systemd or exec (default: systemd where it runs)."`
	KubeletBinary         string        `default:"/usr/bin/kubelet" help:"The kubelet binary, in exec mode."`
	Timeout               time.Duration `default:"4m" help:"How long each wait on the cluster may take."`
}

func (f applyFlags) options(env *Env, bundlePath string) (phases.Options, error) {
	digest, from := trustedManifest(bundlePath, f.ManifestDigest)
	if from == "" {
		fmt.Fprintf(env.Stderr, "warning: %s is checked for integrity only: no SHA256SUMS beside it and no --manifest-digest\n", bundlePath)
	}
	return phases.Options{
		Bundle: bundlePath, ManifestDigest: digest, Root: f.Root, DryRun: f.DryRun, Node: f.Node,
		IgnorePreflight: f.IgnorePreflightErrors, Out: env.Stdout, Now: env.Now,
		CRISocket: f.CRISocket, ContainerdConfig: f.ContainerdConfig, Kubelet: f.Kubelet, KubeletBinary: f.KubeletBinary,
		Timeout:  f.Timeout,
		Progress: newProgress(env).line,
	}, nil
}

type ApplyAllCmd struct {
	applyFlags
	SkipPhases []string `sep:"," help:"Phases to skip."`
	Bundle     string   `arg:"" help:"Bundle file."`
}

func (cmd *ApplyAllCmd) Run(env *Env) error {
	o, err := cmd.options(env, cmd.Bundle)
	if err != nil {
		return err
	}
	o.SkipPhases = cmd.SkipPhases
	return apply(o)
}

type ApplyPhaseCmd struct {
	applyFlags
	Name   string `arg:"" help:"Phase name."`
	Bundle string `arg:"" help:"Bundle file."`
}

func (cmd *ApplyPhaseCmd) Run(env *Env) error {
	o, err := cmd.options(env, cmd.Bundle)
	if err != nil {
		return err
	}
	o.Only = cmd.Name
	return apply(o)
}

func apply(o phases.Options) error {
	if _, err := phases.Plan("control-plane", o.SkipPhases, o.Only); err != nil && strings.HasPrefix(err.Error(), "unknown phase") {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := phases.Apply(ctx, o); err != nil {
		return fmt.Errorf("applying %s: %w", o.Bundle, err)
	}
	return nil
}

func phaseNames() string {
	var names []string
	for _, p := range phases.Phases() {
		names = append(names, p.Name)
	}
	return strings.Join(names, ", ")
}

// ResetCmd undoes apply on this host.
type ResetCmd struct {
	Root      string `default:"/" help:"Treat DIR as the host's /."`
	CRISocket string `name:"cri-socket" default:"unix:///var/run/containerd/containerd.sock" help:"Container runtime whose Kubernetes containers to remove."`
	Force     bool   `short:"f" help:"Do not ask for confirmation."`
}

func (cmd *ResetCmd) Run(env *Env) error {
	if !cmd.Force {
		if !env.IsTerminal || env.Stdin == nil {
			return usageError{fmt.Errorf("resetting %s: this removes the node's Kubernetes state; pass --force to confirm", cmd.Root)}
		}
		fmt.Fprintf(env.Stderr, "Remove this node's Kubernetes files, containers and state under %s? [y/N] ", cmd.Root)
		var answer string
		fmt.Fscanln(env.Stdin, &answer)
		if answer != "y" && answer != "Y" && answer != "yes" {
			return fmt.Errorf("resetting: not confirmed")
		}
	}
	return phases.Reset(context.Background(), phases.ResetOptions{Root: cmd.Root, Out: env.Stdout, CRISocket: cmd.CRISocket})
}
