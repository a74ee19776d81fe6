package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/phases"
	"airadm.dev/airadm/trust"
)

// ApplyCmd runs a bundle's phases on this host. `apply BUNDLE` runs them
// all; `apply phase NAME BUNDLE` runs one. Both take the same flags, which
// is why this is one command with its arguments read by hand rather than
// two subcommands: kong would show only the subcommands in apply's help.
type ApplyCmd struct {
	authFlags
	Root                  string        `default:"/" help:"Treat DIR as the host's / (tests, image building)."`
	Identity              string        `type:"path" placeholder:"FILE" help:"Key that decrypts the bundle's encrypted secrets: an OpenSSH private key or an age identity file (default: /etc/ssh/ssh_host_ed25519_key under --root)."`
	DryRun                bool          `help:"Print what each phase would do; change nothing."`
	SkipPhases            []string      `sep:"," help:"Phases to skip: ${phases}."`
	Node                  string        `help:"Apply even though the host name differs from the bundle's node."`
	IgnorePreflightErrors []string      `sep:"," help:"Preflight checks to ignore by name, or all."`
	CRISocket             string        `name:"cri-socket" help:"Container runtime endpoint (default: the bundle's kubelet config)."`
	ContainerdConfig      string        `help:"containerd's config file, read for its sandbox image (default: /etc/containerd/config.toml)."`
	Kubelet               string        `enum:"systemd,exec," default:"" help:"How to start kubelet: systemd or exec (default: systemd where it runs)."`
	KubeletBinary         string        `default:"/usr/bin/kubelet" help:"The kubelet binary, in exec mode."`
	Timeout               time.Duration `default:"4m" help:"How long each wait on the cluster may take."`
	Images                string        `type:"path" placeholder:"FILE" help:"A thin bundle's image pack (default: images.pack beside the bundle)."`
	Drain                 bool          `help:"In an upgrade: cordon the node and evict its pods before the kubelet restarts, uncordon it after (the operator's choice; off by default)."`
	// Three positionals rather than one slice: kong ends a slice at the
	// first flag, and `apply phase images --root R BUNDLE` must parse.
	Bundle    string `arg:"" name:"bundle" help:"The bundle file; or: phase NAME BUNDLE, to run one phase (${phases})."`
	PhaseName string `arg:"" optional:"" name:"name" help:"With phase: the phase to run."`
	PhaseOf   string `arg:"" optional:"" name:"phase-bundle" help:"With phase: the bundle file."`
}

// target splits the arguments into the bundle and the one phase to run.
func (cmd *ApplyCmd) target() (bundlePath, only string, err error) {
	switch {
	case cmd.PhaseName == "" && cmd.PhaseOf == "":
		return cmd.Bundle, "", nil
	case cmd.Bundle == "phase" && cmd.PhaseOf != "":
		if len(cmd.SkipPhases) > 0 {
			return "", "", fmt.Errorf("--skip-phases does not go with apply phase")
		}
		return cmd.PhaseOf, cmd.PhaseName, nil
	}
	got := strings.TrimSpace(strings.Join([]string{cmd.Bundle, cmd.PhaseName, cmd.PhaseOf}, " "))
	return "", "", fmt.Errorf("expected apply BUNDLE or apply phase NAME BUNDLE, got apply %s", got)
}

func (cmd *ApplyCmd) Run(env *Env) error {
	path, only, err := cmd.target()
	if err != nil {
		return usageError{err}
	}
	if _, err := phases.Plan("control-plane", cmd.SkipPhases, only); err != nil {
		return usageError{err}
	}
	v, err := cmd.vouch(path, hostfs.Path(cmd.Root, trust.TrustedKeysPath))
	if err != nil {
		return err
	}
	if !v.Authenticated() {
		fmt.Fprintf(env.Stderr, "warning: %s is checked for integrity only: %s\n", path, v.Why)
	}
	return apply(phases.Options{
		Bundle: path, ManifestDigest: v.ManifestDigest, FileSHA256: v.FileSHA256, AuthenticatedBy: v.From, SignedBy: v.SignedBy, SignerTrusted: v.SignerTrusted, Identity: cmd.Identity, Root: cmd.Root, DryRun: cmd.DryRun, Node: cmd.Node,
		SkipPhases: cmd.SkipPhases, Only: only,
		IgnorePreflight: cmd.IgnorePreflightErrors, Out: env.Stdout, Now: env.Now,
		CRISocket: cmd.CRISocket, ContainerdConfig: cmd.ContainerdConfig, Kubelet: cmd.Kubelet, KubeletBinary: cmd.KubeletBinary,
		Timeout:             cmd.Timeout,
		Images:              cmd.Images,
		Drain:               cmd.Drain,
		UpgradeManifestHook: upgradeManifestHook(),
		Progress:            newProgress(env).line,
	})
}

func apply(o phases.Options) error {
	ctx, stop := signalContext()
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
	CRISocket string `name:"cri-socket" help:"Container runtime whose Kubernetes containers to remove (default: unix:///var/run/containerd/containerd.sock when --root is /, none under another root)."`
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
	err := phases.Reset(context.Background(), phases.ResetOptions{Root: cmd.Root, Out: env.Stdout, CRISocket: cmd.CRISocket})
	if errors.Is(err, phases.ErrNoRoot) {
		return usageError{err}
	}
	return err
}
