package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"k8s.io/apimachinery/pkg/util/duration"

	"airadm.dev/airadm/expiry"
)

// StatusCmd lists this host's certificates with their expiry, like
// `kubeadm certs check-expiration`.
type StatusCmd struct {
	Root string `default:"/" help:"Host root; every host path is under it."`
	JSON bool   `name:"json" help:"Print JSON."`
}

func (cmd *StatusCmd) Run(env *Env) error {
	now := env.Now()
	certs, err := expiry.Host(cmd.Root, now)
	if err != nil {
		return err
	}
	if cmd.JSON {
		enc := json.NewEncoder(env.Stdout)
		enc.SetIndent("", "  ")
		if certs == nil {
			certs = []expiry.Cert{}
		}
		return enc.Encode(certs)
	}
	if len(certs) == 0 {
		fmt.Fprintf(env.Stdout, "no certificates under %s\n", cmd.Root)
		return nil
	}
	w := tabwriter.NewWriter(env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "CERTIFICATE\tEXPIRES\tRESIDUAL TIME\tAUTHORITY")
	for _, c := range certs {
		name := c.Path
		if c.File != "" {
			name += " (" + c.File + ")"
		}
		residual := duration.ShortHumanDuration(c.Residual)
		if c.Residual <= 0 {
			residual = "EXPIRED"
		}
		authority := c.Authority
		switch {
		case c.IsCA && authority == "":
			authority = "(CA)"
		case authority == "":
			authority = "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", name, c.NotAfter.Format("Jan 02, 2006 15:04 MST"), residual, authority)
	}
	return w.Flush()
}
