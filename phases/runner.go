package phases

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/trust"
)

// ErrUntrusted means the bundle is intact but not the one the operator's
// digest (or SHA256SUMS) vouches for.
var ErrUntrusted = trust.ErrUntrusted

// Phase is one step of apply, declared as data.
type Phase struct {
	Name  string
	Short string
	// Roles the phase runs for.
	Roles []render.Role
	Run   func(ctx context.Context, r *Run) error
}

var (
	bothRoles    = []render.Role{render.ControlPlane, render.Worker}
	controlPlane = []render.Role{render.ControlPlane}
	workerOnly   = []render.Role{render.Worker}
)

// Phases lists every phase in the order apply runs them.
func Phases() []Phase {
	return []Phase{
		{"preflight", "check that the host and the bundle fit each other", bothRoles, runPreflight},
		{"files", "write the bundle's verified files to their host paths", bothRoles, runFiles},
		{"runtime", "set the kernel prerequisites; install and start the bundle's containerd, if it carries one", bothRoles, runRuntime},
		{"images", "import the bundle's images into containerd, named, pinned and unpacked", bothRoles, runImages},
		{"etcd-join", "rejoin the running etcd cluster if this member ran before and lost its data", controlPlane, runEtcdJoin},
		{"upgrade-control-plane", "in an upgrade: back up the manifests and etcd's data, then swap the static pods one at a time, rolling a failed one back", controlPlane, runUpgradeControlPlane},
		{"kubelet", "start kubelet with the bundle's unit, config and flags (in an upgrade: replace and restart it)", bothRoles, runKubelet},
		{"wait-etcd", "wait for this etcd member and a quorum, saying which members answer; promote a rejoining member", controlPlane, runWaitEtcd},
		{"wait-control-plane", "wait for the apiserver's /readyz and make admin.conf's group cluster-admin", controlPlane, runWaitControlPlane},
		{"upload-config", "store the kubeadm-config and kubelet-config ConfigMaps", controlPlane, runUploadConfig},
		{"mark-control-plane", "label and taint this node as a control plane", controlPlane, runMarkControlPlane},
		{"bootstrap-token", "publish cluster-info, node bootstrap RBAC and each worker's token", controlPlane, runBootstrapToken},
		{"addons", "apply CoreDNS, kube-proxy and the config's extra manifests", controlPlane, runAddons},
		{"tls-bootstrap", "wait for the kubelet's issued client certificate and its Node, then drop the bootstrap credential", workerOnly, runTLSBootstrap},
	}
}

// Options configure one apply.
type Options struct {
	Bundle string
	// ManifestDigest and FileSHA256 (hex sha256 of every byte) authenticate
	// the bundle; both empty means integrity only. AuthenticatedBy names
	// where they came from, for the log.
	ManifestDigest  string
	FileSHA256      string
	AuthenticatedBy string
	// SignedBy and SignerTrusted say who signed the SHA256SUMS that
	// vouched, for the log (trust.Vouch).
	SignedBy      string
	SignerTrusted bool
	// Identity is the key that decrypts the bundle's encrypted files (an
	// OpenSSH private key or an age identity file); empty means the host
	// key, trust.DefaultIdentity under Root.
	Identity        string
	Root            string // "/" on a real host
	DryRun          bool
	SkipPhases      []string
	Only            string // run just this phase
	Node            string // overrides the host-name match in preflight
	IgnorePreflight []string
	Out             io.Writer // one line per action; never a secret
	// Progress, if set, receives a changing status line for long steps.
	Progress func(string)
	// CRISocket overrides the bundle's containerRuntimeEndpoint.
	CRISocket string
	// ContainerdConfig is containerd's config file, for the sandbox image
	// check (default: /etc/containerd/config.toml under Root).
	ContainerdConfig string
	// Kubelet is KubeletSystemd or KubeletExec; empty picks systemd where
	// it is running. KubeletBinary is used in exec mode.
	Kubelet, KubeletBinary string
	Now                    func() time.Time
	// Timeout bounds each wait on the cluster.
	Timeout time.Duration
	// Images is a thin bundle's image pack (default: images.pack beside
	// the bundle).
	Images string
	// WrapPack, if set, wraps every read of the pack (tests count them).
	WrapPack func(io.ReaderAt) io.ReaderAt
	// Drain, in an upgrade, cordons the node and evicts its pods before
	// the kubelet restarts, and uncordons it after.
	Drain bool
	// UpgradeManifestHook, if set, rewrites a static pod manifest just
	// before an upgrade puts it in place (tests: a component that fails).
	UpgradeManifestHook func(component string, manifest []byte) []byte
}

// Run is the typed context every phase gets.
type Run struct {
	Options
	Manifest *bundle.Manifest
	Digest   string
	journal  *Journal
	client   kubernetes.Interface
	plan     []Phase
	// apiReady is closed when the apiserver answers, for the API steps
	// that run at once (concurrent.go).
	apiReady apiGate
	// files holds the bundle's host files (small: keys, configs,
	// manifests), kept from the verifying pass.
	files map[string][]byte
	// staged holds the others (host binaries), written to the staging
	// area by the verifying pass.
	staged *staging
	// changed lists the host paths the files phase wrote (or would, in a
	// dry run), for the restarts they call for.
	changed []string
	// upgrade is set when the node runs an older Kubernetes than the
	// bundle's (upgrade.go).
	upgrade *Upgrade
	// early is a worker's client certificate requested while the bundle
	// was verified (bootstrap.go), for the kubelet phase.
	early *earlyCert
}

// planned reports whether this run includes phase name.
func (r *Run) planned(name string) bool {
	return slices.ContainsFunc(r.plan, func(p Phase) bool { return p.Name == name })
}

// Plan validates skip and only against the known phases and returns the
// phases to run for role, in order.
func Plan(role render.Role, skip []string, only string) ([]Phase, error) {
	return plan(role, false, skip, only)
}

// plan orders an upgrade's phases as upgradePhases does (a member that
// runs needs no etcd-join, a kubelet that runs no tls-bootstrap); a first
// install has no upgrade-control-plane step.
func plan(role render.Role, upgrade bool, skip []string, only string) ([]Phase, error) {
	all := Phases()
	if upgrade {
		byName := map[string]Phase{}
		for _, p := range all {
			byName[p.Name] = p
		}
		var ordered []Phase
		for _, n := range upgradePhases {
			ordered = append(ordered, byName[n])
		}
		all = ordered
	}
	names := make([]string, 0, len(all))
	for _, p := range all {
		names = append(names, p.Name)
	}
	for _, s := range append(slices.Clone(skip), only) {
		if s != "" && !slices.Contains(names, s) {
			return nil, fmt.Errorf("unknown phase %q (phases: %s)", s, strings.Join(names, ", "))
		}
	}
	var out []Phase
	for _, p := range all {
		if only != "" && p.Name != only {
			continue
		}
		if p.Name == "upgrade-control-plane" && !upgrade && only == "" {
			continue
		}
		if slices.Contains(skip, p.Name) || !slices.Contains(p.Roles, role) {
			continue
		}
		out = append(out, p)
	}
	if only != "" && len(out) == 0 {
		return nil, fmt.Errorf("phase %s does not apply to a %s node", only, role)
	}
	return out, nil
}

// Apply verifies the bundle, then runs the planned phases under the host
// lock, recording each finished phase in the journal.
func Apply(ctx context.Context, o Options) error {
	if o.Root == "" {
		o.Root = "/"
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Timeout == 0 {
		o.Timeout = 4 * time.Minute
	}
	vouch := trust.Vouch{ManifestDigest: o.ManifestDigest, FileSHA256: o.FileSHA256, From: o.AuthenticatedBy, SignedBy: o.SignedBy, SignerTrusted: o.SignerTrusted}
	if vouch.From == "" {
		vouch.From = "the caller"
	}
	staged := newStaging(o.Root, o.DryRun || !(o.Only == "" || o.Only == "files") || slices.Contains(o.SkipPhases, "files"))
	defer staged.cleanup()
	// With the manifest digest vouched for, the host's own copies stand in
	// for the bundle's bytes (trust.Vouch.ManifestBound).
	vouch = vouch.ManifestBound()
	identity := o.Identity
	if identity == "" {
		identity = hostfs.Path(o.Root, trust.DefaultIdentity)
	}
	var early *earlyCert
	defer func() { early.stop() }()
	hooks := o.earlyCertHooks(ctx, func(e *earlyCert) { early = e })
	m, digest, files, err := verifyBundle(ctx, o.Bundle, vouch, staged, o.CRISocket, identity, hooks)
	if err != nil {
		return err
	}
	if vouch.Authenticated() {
		logf(o.Out, "bundle %s: intact, %s", o.Bundle, vouch.Describe())
	} else {
		logf(o.Out, "bundle %s: intact, not authenticated", o.Bundle)
	}
	journal, err := LoadJournal(o.Root)
	if err != nil {
		return err
	}
	// Whether this is an upgrade decides the plan, so it is found first,
	// from the host alone; one the skew policy forbids stops here.
	up, err := detectUpgrade(o.Root, m, files, journal)
	if err != nil {
		return err
	}
	plan, err := plan(render.Role(m.Role), up != nil, o.SkipPhases, o.Only)
	if err != nil {
		return err
	}
	if m.Pack != "" && slices.ContainsFunc(plan, func(p Phase) bool { return p.Name == "images" }) {
		// Before anything is written: the pack must be this build's, and
		// every blob this node needs intact.
		if err := o.VerifyPack(m); err != nil {
			staged.abandon()
			return err
		}
		logf(o.Out, "pack %s: this node's %d blobs intact, bound to the bundle by its digest", o.PackPath(), len(m.Blobs))
	}
	r := &Run{Options: o, Manifest: m, Digest: digest, plan: plan, files: files, staged: staged, upgrade: up, early: early}
	if !o.DryRun {
		unlock, err := lockHost(o.Root)
		if err != nil {
			return err
		}
		defer unlock()
		defer func() {
			// A later run trusts these instead of hashing the files again.
			if err := staged.hashes.save(o.Root); err != nil {
				logf(o.Out, "warning: keeping the hashes of the host's files for the next run: %v", err)
			}
		}()
		if r.journal, err = LoadJournal(o.Root); err != nil {
			return err
		}
	} else if r.journal, err = LoadJournal(o.Root); err != nil {
		// Read only: the cluster check needs to know what apply wrote.
		return err
	}
	runPhase := func(ctx context.Context, r *Run, p Phase) error {
		r.logf("[%s] %s", p.Name, p.Short)
		if err := p.Run(ctx, r); err != nil {
			if ctx.Err() != nil {
				if !errors.Is(err, ctx.Err()) {
					err = fmt.Errorf("%w: %w", context.Cause(ctx), err)
				}
				return fmt.Errorf("phase %s: stopped before it finished, with the journal consistent; run apply again to finish: %w", p.Name, err)
			}
			return fmt.Errorf("phase %s: %w", p.Name, err)
		}
		return nil
	}
	record := func(p Phase) error {
		if o.DryRun {
			return nil
		}
		return r.journal.done(o.Root, m, digest, p.Name)
	}
	for i := 0; i < len(plan); i++ {
		p := plan[i]
		// A signal (main cancels ctx on SIGINT and SIGTERM) stops the run
		// between phases, or at the next safe point inside one; the journal
		// was made durable before any file it lists, so a re-run or a reset
		// picks up from here.
		if ctx.Err() != nil {
			return fmt.Errorf("stopped before phase %s, with the journal consistent; run apply again to finish: %w", p.Name, context.Cause(ctx))
		}
		// The steps that only need the API run at once (concurrent.go).
		if n := concurrentSteps(plan[i:], o.DryRun); n > 1 {
			if err := r.runConcurrently(ctx, plan[i:i+n], runPhase, record); err != nil {
				return err
			}
			i += n - 1
			continue
		}
		if err := runPhase(ctx, r, p); err != nil {
			return err
		}
		if err := record(p); err != nil {
			return err
		}
	}
	return nil
}

func (r *Run) logf(format string, args ...any) { logf(r.Out, format, args...) }

func logf(w io.Writer, format string, args ...any) {
	if w != nil {
		fmt.Fprintf(w, format+"\n", args...)
	}
}

func (r *Run) path(hostPath string) string { return hostfs.Path(r.Root, hostPath) }

// verifyBundle reads the whole bundle once, keeping its small host files
// in memory and streaming the others (host binaries) to the staging area;
// nothing else touches the host unless every byte matched. Phases use
// these files and never re-read the bundle, so a bundle swapped on disk
// later cannot slip unverified files in. What the host already holds,
// verified by digest (a large file in place, a blob in containerd), is
// passed over rather than read: the result on the host is the same.
//
// Encrypted files are decrypted as they stream past, with the identity
// read from identityPath at the first of them, and kept in memory (they
// are keys and kubeconfigs); they are never passed over, since the host
// holds plaintext. A file that does not decrypt (another key, a damaged
// header) fails the whole read, before anything is written. The returned
// manifest then describes them as the host sees them: plaintext size and
// sha256, no encryption, so that the files phase compares and writes
// plaintext.
func verifyBundle(ctx context.Context, path string, v trust.Vouch, staged *staging, criSocket, identityPath string, hooks verifyHooks) (*bundle.Manifest, string, map[string][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, "", nil, fmt.Errorf("opening bundle: %w", err)
	}
	defer f.Close()
	files := map[string][]byte{}
	blobs := &heldBlobs{socket: func() string { return socketFrom(criSocket, files) }}
	defer blobs.close()
	plain := map[string]bundle.FileEntry{}
	var id *trust.Identity
	visitor := bundle.Visitor{
		File: func(fe bundle.FileEntry, rd io.Reader) error {
			if fe.Encrypted() {
				if id == nil {
					var err error
					if id, err = trust.LoadIdentity(identityPath); err != nil {
						return fmt.Errorf("encrypted, with no key to decrypt it: %w (pass --identity with the node's key)", err)
					}
				}
				b, err := decryptEntry(id, fe, rd)
				if err != nil {
					return err
				}
				files[fe.Path] = b
				sum := sha256.Sum256(b)
				plain[fe.Path] = bundle.FileEntry{Path: fe.Path, Mode: fe.Mode, Size: int64(len(b)), SHA256: hex.EncodeToString(sum[:])}
				return nil
			}
			if staged.takes(fe) {
				return staged.stage(fe, rd)
			}
			b, err := io.ReadAll(rd)
			files[fe.Path] = b
			if err == nil && hooks.file != nil && v.ManifestDigest != "" {
				hooks.file(fe.Path, b)
			}
			return err
		},
		Held: func(e bundle.HeldEntry) bool {
			if e.Blob != nil {
				return blobs.holds(ctx, *e.Blob)
			}
			mode, err := e.File.FileMode()
			return err == nil && !e.File.Encrypted() && staged.takes(*e.File) && staged.hashes.unchanged(hostfs.Path(staged.root, e.File.Path), *e.File, mode)
		},
	}
	if hooks.manifest != nil && v.ManifestDigest != "" {
		// trust.Verify has checked the digest when this runs.
		visitor.Manifest = func(m *bundle.Manifest, _ string) error {
			hooks.manifest(m)
			return nil
		}
	}
	m, digest, err := trust.Verify(f, v, visitor)
	if err != nil {
		staged.abandon()
		return nil, "", nil, fmt.Errorf("verifying %s: %w", path, err)
	}
	for i, fe := range m.Files {
		p, ok := plain[fe.Path]
		if !ok {
			continue
		}
		if err := bundle.ScanSecrets(m, p, files[fe.Path]); err != nil {
			staged.abandon()
			return nil, "", nil, fmt.Errorf("verifying %s: %w", path, &bundle.EntryError{Entry: "files" + fe.Path, Err: err})
		}
		m.Files[i] = p
	}
	return m, digest, files, nil
}

// verifyHooks see parts of a bundle authentic before the whole is read:
// only when the manifest digest is vouched for, so the manifest is
// authenticated first and each entry as soon as it verifies. Nothing they
// start may write to the host.
type verifyHooks struct {
	manifest func(m *bundle.Manifest)
	// file sees a small plaintext host file once its bytes verified.
	file func(path string, b []byte)
}

// earlyCertHooks starts a worker's client certificate request as soon as
// its bootstrap kubeconfig is verified, when this run will start the
// kubelet and the host has no valid kubelet.conf yet (a joined node has
// one, and asks nothing of the cluster). The request overlaps the rest of
// the verification; started gets it.
func (o Options) earlyCertHooks(ctx context.Context, started func(*earlyCert)) verifyHooks {
	if o.DryRun || slices.Contains(o.SkipPhases, "kubelet") || (o.Only != "" && o.Only != "kubelet") {
		return verifyHooks{}
	}
	var node string
	return verifyHooks{
		manifest: func(m *bundle.Manifest) {
			if render.Role(m.Role) == render.Worker && !kubeconfigValid(o.Root, hostfs.Path(o.Root, render.KubeletKubeconfig)) {
				node = m.Node
			}
		},
		file: func(path string, b []byte) {
			if node != "" && path == render.BootstrapKubeconfig {
				if e := startEarlyCert(ctx, b, node, o.Timeout); e != nil {
					started(e)
				}
			}
		},
	}
}

// decryptEntry decrypts one age file. The plaintext is never longer than
// the ciphertext, which bounds what is read; the ciphertext is read to its
// end, so its digest is checked before the plaintext is used.
func decryptEntry(id *trust.Identity, fe bundle.FileEntry, rd io.Reader) ([]byte, error) {
	r, err := id.Decrypt(rd)
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(r, fe.Size))
	if err != nil {
		return nil, fmt.Errorf("decrypting: %w", err)
	}
	if _, err := io.Copy(io.Discard, rd); err != nil {
		return nil, err
	}
	return b, nil
}

// lockHost keeps two applies from interleaving on one host.
func lockHost(root string) (func(), error) {
	dir := hostfs.Path(root, render.AiradmStateDir)
	if err := hostfs.MkdirAll(root, render.AiradmStateDir); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("locking %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("locking %s: another airadm apply or reset is running", dir)
		}
		return nil, fmt.Errorf("locking %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// Journal is airadm's record on the host: which bundle was applied, which
// phases finished, and which files apply wrote (for reset).
type Journal struct {
	Cluster        string   `json:"cluster"`
	Node           string   `json:"node"`
	ManifestDigest string   `json:"manifestDigest"`
	Phases         []string `json:"phases"`
	Files          []string `json:"files"`
	// KubernetesVersion is the version of the last bundle whose phases
	// ran: a worker's upgrade starts from it.
	KubernetesVersion string `json:"kubernetesVersion,omitempty"`
}

const journalFile = render.AiradmStateDir + "/journal.json"

// LoadJournal reads the journal under root; an absent one is empty.
func LoadJournal(root string) (*Journal, error) {
	var j Journal
	b, err := os.ReadFile(hostfs.Path(root, journalFile))
	if errors.Is(err, os.ErrNotExist) {
		return &j, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading journal: %w", err)
	}
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("reading journal %s: %w", journalFile, err)
	}
	return &j, nil
}

// save writes the journal durably: atomicfile syncs the file and its
// directory, and the directories above it are synced too, since the lock
// may have just created /var/lib/airadm and a crash must not lose it.
func (j *Journal) save(root string) error {
	b, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(hostfs.Path(root, journalFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("saving the journal: %w", err)
	}
	for dir := path.Dir(render.AiradmStateDir); ; dir = path.Dir(dir) {
		if err := atomicfile.SyncDir(hostfs.Path(root, dir)); err != nil {
			return fmt.Errorf("saving the journal: %w", err)
		}
		if dir == "/" {
			return nil
		}
	}
}

// foreign reports whether the journal records another cluster's node.
func (j *Journal) foreign(m *bundle.Manifest) bool {
	return j.Cluster != "" && (j.Cluster != m.Cluster || j.Node != m.Node)
}

// claim is the write-ahead record: it adds paths to the journal under m's
// cluster and node, and makes that durable before the caller writes any of
// them, so that whatever stops apply afterwards (kill -9, SIGTERM, a full
// disk), reset finds every file. Files are never dropped: those an
// earlier bundle of this node wrote stay listed.
func (j *Journal) claim(root string, m *bundle.Manifest, paths []string) error {
	if j.foreign(m) {
		return fmt.Errorf("the journal records node %s of cluster %s, not this bundle's", j.Node, j.Cluster)
	}
	changed := j.Cluster != m.Cluster || j.Node != m.Node
	j.Cluster, j.Node = m.Cluster, m.Node
	for _, p := range paths {
		if !slices.Contains(j.Files, p) {
			j.Files = append(j.Files, p)
			changed = true
		}
	}
	if !changed {
		return nil // already durable: a re-run rewrites nothing
	}
	return j.save(root)
}

func (j *Journal) done(root string, m *bundle.Manifest, digest, phase string) error {
	if j.foreign(m) {
		// Another cluster's record stays as it is, for reset: a phase
		// that ran with the cluster check ignored must not relabel it
		// (the files phase refuses such a host whatever is ignored).
		return nil
	}
	if j.ManifestDigest != digest {
		// A new bundle starts a new record of phases, but keeps the files
		// earlier applies wrote so that reset still finds them.
		j.Phases = nil
	}
	// Only the files phase's claim says whose host this is: a preflight
	// that passed on a host of unknown files does not make it ours.
	j.ManifestDigest = digest
	if phase == "kubelet" || j.KubernetesVersion == "" {
		// The node runs the bundle's version once its kubelet does.
		j.KubernetesVersion = m.KubernetesVersion
	}
	if !slices.Contains(j.Phases, phase) {
		j.Phases = append(j.Phases, phase)
	}
	return j.save(root)
}

// Client is a clientset from a kubeconfig the bundle put on the host.
func (r *Run) Client(kubeconfig string) (kubernetes.Interface, error) {
	if r.client != nil {
		return r.client, nil
	}
	b, err := os.ReadFile(r.path(kubeconfig))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", kubeconfig, err)
	}
	cfg, err := clientcmd.RESTConfigFromKubeConfig(b)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", kubeconfig, err)
	}
	cfg.Timeout = 15 * time.Second
	apiRateLimits(cfg)
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", kubeconfig, err)
	}
	r.client = cs
	return cs, nil
}
