package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"time"

	"airadm.dev/airadm/media"
)

// MediaCmd writes install media from built bundles.
type MediaCmd struct {
	ISO    MediaISOCmd    `cmd:"" name:"iso" help:"Write one ISO 9660 image (Rock Ridge, Joliet) with the runner, the bundles, SHA256SUMS and INSTALL.txt."`
	USB    MediaUSBCmd    `cmd:"" name:"usb" help:"Write the same content as a raw disk image (GPT, one FAT32 partition) for dd to a USB stick."`
	Cidata MediaCidataCmd `cmd:"" name:"cidata" help:"Write a node's cloud-init NoCloud seed (labelled CIDATA) that installs it on first boot."`
}

// mediaFlags are shared by every media command.
type mediaFlags struct {
	configFlag
	From   string `default:"out" help:"Directory holding the built bundles and their SHA256SUMS."`
	Out    string `short:"o" required:"" help:"Image file to write."`
	Runner string `help:"airadm binary for the nodes' platform, when it is not this one's (checked to be an ELF for it)."`
	JSON   bool   `name:"json" help:"Print what was written as JSON."`
}

// open loads the config, checks the bundles of nodes and picks the runner.
// With verify it also reads every byte of the bundles; without, the caller
// must (Source.VerifyEntries, or WriteISO's Verify). What is read and
// copied later is counted on p.
func (f mediaFlags) open(nodes []string, limit media.SizeLimit, verify bool, p *mediaProgress) (*media.Source, string, error) {
	c, err := f.load()
	if err != nil {
		return nil, "", err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, "", fmt.Errorf("locating this airadm: %w", err)
	}
	runner, err := media.Runner(c.Platform, f.Runner, self, runtime.GOOS, runtime.GOARCH)
	if err != nil {
		return nil, "", mediaError(err)
	}
	src, err := media.Scan(f.From, c, nodes, limit)
	if err != nil {
		return nil, "", mediaError(err)
	}
	src.Meter = &p.Meter
	if verify {
		if err := src.Verify(); err != nil {
			return nil, "", mediaError(err)
		}
	}
	return src, runner, nil
}

// mediaProgress draws, on a terminal, how much of the bundles has been
// verified and how much copied onto the medium, four times a second.
type mediaProgress struct {
	media.Meter
	stop, done chan struct{}
}

func startMediaProgress(env *Env) *mediaProgress {
	p := &mediaProgress{stop: make(chan struct{}), done: make(chan struct{})}
	if !env.IsTerminal {
		close(p.done)
		return p
	}
	line := newProgress(env)
	go func() {
		defer close(p.done)
		defer line.done()
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			stopped := false
			select {
			case <-p.stop:
				stopped = true // drawn once more: where it ended
			case <-tick.C:
			}
			line.line(fmt.Sprintf("verified %s, written %s", ofTotal(p.Verified()), ofTotal(p.Copied())))
			if stopped {
				return
			}
		}
	}()
	return p
}

func ofTotal(done, total int64) string { return humanBytes(done) + " of " + humanBytes(total) }

// end draws the line a last time and ends it, so that what is printed
// next starts on a line of its own; it may be called again.
func (p *mediaProgress) end() {
	select {
	case <-p.done:
	default:
		close(p.stop)
		<-p.done
	}
}

// epoch is SOURCE_DATE_EPOCH if set, else the bundles' build time.
func mediaEpoch(env *Env, src *media.Source) (time.Time, error) {
	if s := env.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		secs, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return time.Time{}, usageError{fmt.Errorf("reading SOURCE_DATE_EPOCH: %q is not a number of seconds", s)}
		}
		return time.Unix(secs, 0).UTC(), nil
	}
	return src.Epoch(), nil
}

// mediaError marks media's bad-input errors as usage errors (exit 2).
func mediaError(err error) error {
	var ie *media.InputError
	if errors.As(err, &ie) {
		return usageError{err}
	}
	return err
}

// medium is what a media command wrote, for --json.
type medium struct {
	Out    string `json:"out"`
	Medium string `json:"medium"` // iso, usb or cidata
	Format string `json:"format"` // the filesystem: iso9660 or fat32
	Label  string `json:"label"`
	// Epoch is every timestamp the medium records.
	Epoch   time.Time      `json:"epoch"`
	Bundles []mediumBundle `json:"bundles"`
	Pack    *mediumBundle  `json:"pack,omitempty"`
	// InstanceID is a seed's cloud-init instance-id.
	InstanceID string `json:"instanceId,omitempty"`
}

type mediumBundle struct {
	Node           string `json:"node,omitempty"`
	Role           string `json:"role,omitempty"`
	File           string `json:"file"`
	SHA256         string `json:"sha256"`
	ManifestDigest string `json:"manifestDigest,omitempty"`
}

// report prints what was written: a line, or with --json an object.
func (f mediaFlags) report(env *Env, m medium, what string, src *media.Source) error {
	for _, b := range src.Bundles {
		m.Bundles = append(m.Bundles, mediumBundle{Node: b.Node.Name, Role: string(b.Node.Role), File: b.Name, SHA256: b.SHA256, ManifestDigest: b.ManifestDigest})
	}
	if p := src.Pack; p != nil {
		m.Pack = &mediumBundle{File: p.Name, SHA256: p.SHA256}
	}
	if f.JSON {
		return json.NewEncoder(env.Stdout).Encode(m)
	}
	if m.InstanceID != "" {
		fmt.Fprintf(env.Stdout, "%s: %s, instance of manifest %s\n", m.Out, what, m.Bundles[0].ManifestDigest)
		return nil
	}
	fmt.Fprintf(env.Stdout, "%s: %s,", m.Out, what)
	for _, b := range m.Bundles {
		fmt.Fprintf(env.Stdout, " %s", b.Node)
	}
	fmt.Fprintln(env.Stdout)
	return nil
}

// MediaISOCmd writes the cluster's ISO.
type MediaISOCmd struct {
	mediaFlags
	Label string   `default:"AIRADM" help:"Volume label (1 to 32 of A-Z, 0-9 and _)."`
	Nodes []string `arg:"" optional:"" help:"Nodes whose bundles the image carries (default: all)."`
}

func (cmd *MediaISOCmd) Validate() error { return media.CheckISOLabel(cmd.Label) }

func (cmd *MediaISOCmd) Run(env *Env) error {
	// Verified while the image is laid out (ISOOptions.Verify), by entries
	// and manifest digest: the copy pass checks each file's sha256.
	p := startMediaProgress(env)
	defer p.end()
	src, runner, err := cmd.open(cmd.Nodes, media.SizeLimit{}, false, p)
	if err != nil {
		return err
	}
	epoch, err := mediaEpoch(env, src)
	if err != nil {
		return err
	}
	t, err := media.ClusterTree(src, runner, media.Mount{Label: cmd.Label})
	if err != nil {
		return mediaError(err)
	}
	if err := media.WriteISO(cmd.Out, t, media.ISOOptions{Label: cmd.Label, Epoch: epoch, Verify: src.VerifyEntries}); err != nil {
		return mediaError(err)
	}
	p.end()
	return cmd.report(env, medium{Out: cmd.Out, Medium: "iso", Format: "iso9660", Label: cmd.Label, Epoch: epoch},
		"ISO 9660 labelled "+cmd.Label+" with", src)
}

// MediaUSBCmd writes the cluster's USB disk image.
type MediaUSBCmd struct {
	mediaFlags
	Label string   `default:"AIRADM_USB" help:"Volume label (1 to 11 of A-Z, 0-9 and _); mount the stick by it: mount -o ro LABEL=<label> /mnt."`
	Nodes []string `arg:"" optional:"" help:"Nodes whose bundles the image carries (default: all)."`
}

func (cmd *MediaUSBCmd) Validate() error { return media.CheckFATLabel(cmd.Label) }

func (cmd *MediaUSBCmd) Run(env *Env) error {
	p := startMediaProgress(env)
	defer p.end()
	src, runner, err := cmd.open(cmd.Nodes, media.FAT32(), true, p)
	if err != nil {
		return err
	}
	epoch, err := mediaEpoch(env, src)
	if err != nil {
		return err
	}
	t, err := media.ClusterTree(src, runner, media.Mount{Label: cmd.Label, FAT: true})
	if err != nil {
		return mediaError(err)
	}
	if err := media.WriteFAT(cmd.Out, t, media.FATOptions{Label: cmd.Label, Epoch: epoch, Partitioned: true}); err != nil {
		return mediaError(err)
	}
	p.end()
	return cmd.report(env, medium{Out: cmd.Out, Medium: "usb", Format: "fat32", Label: cmd.Label, Epoch: epoch},
		"GPT disk, FAT32 partition labelled "+cmd.Label+" with", src)
}

// MediaCidataCmd writes one node's NoCloud seed.
type MediaCidataCmd struct {
	mediaFlags
	Format string `default:"iso" enum:"iso,fat" help:"iso (a CD-ROM image) or fat (a bare FAT32 volume, for hardware without a CD drive); both labelled CIDATA."`
	Node   string `arg:"" help:"Node the seed installs."`
}

func (cmd *MediaCidataCmd) Run(env *Env) error {
	var limit media.SizeLimit
	if cmd.Format == "fat" {
		limit = media.FAT32()
	}
	p := startMediaProgress(env)
	defer p.end()
	src, runner, err := cmd.open([]string{cmd.Node}, limit, true, p)
	if err != nil {
		return err
	}
	epoch, err := mediaEpoch(env, src)
	if err != nil {
		return err
	}
	if err := media.WriteSeed(cmd.Out, src, runner, cmd.Node, cmd.Format, epoch); err != nil {
		return mediaError(err)
	}
	b, _ := src.Bundle(cmd.Node)
	format := map[string]string{"iso": "iso9660", "fat": "fat32"}[cmd.Format]
	p.end()
	return cmd.report(env, medium{Out: cmd.Out, Medium: "cidata", Format: format, Label: media.SeedLabel, Epoch: epoch, InstanceID: media.InstanceID(b.Node, b.ManifestDigest)},
		fmt.Sprintf("cloud-init seed (%s, labelled %s) for %s", cmd.Format, media.SeedLabel, cmd.Node), src)
}
