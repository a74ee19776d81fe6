package phases

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	apiversion "k8s.io/apimachinery/pkg/version"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/version"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/bundle"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

// ErrRefused means the host or cluster is in a state this bundle must not
// be applied to (an upgrade out of order, a downgrade, a skipped minor):
// bad input, exit 2, and nothing was changed.
var ErrRefused = errors.New("refused")

// Upgrade is what an apply of a newer bundle on a running node does: the
// version the node runs and the one its bundle carries. Apply finds it
// before planning, from the host alone, so that the plan is an upgrade's.
type Upgrade struct {
	From, To string
	// Leader is the control plane that upgrades first (the first member
	// of the bundle's etcd --initial-cluster): the others, and workers,
	// wait until the API server runs the new version.
	Leader string
}

// staticPodComponents are swapped in this order, as kubeadm does: etcd,
// then constants.ControlPlaneComponents.
var staticPodComponents = [...]string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}

// upgradePhases is the order of an upgrade: images are imported before
// anything changes, the static pods are swapped one at a time, the
// cluster-wide API steps follow (upload-config, then CoreDNS and
// kube-proxy in addons), and the kubelet is upgraded last, as kubeadm's
// procedure has the operator do after `kubeadm upgrade apply`.
var upgradePhases = [...]string{"preflight", "images", "files", "runtime", "upgrade-control-plane", "wait-control-plane", "upload-config", "mark-control-plane", "bootstrap-token", "addons", "kubelet"}

func manifestPath(component string) string {
	return render.ManifestsDir + "/" + component + ".yaml"
}

// heldBack reports whether the files phase leaves path to a later step of
// an upgrade: the static pod manifests (swapped one at a time by
// upgrade-control-plane) and the kubelet's binary, config and unit
// (written by the kubelet phase just before it restarts kubelet), so that
// a failed control-plane upgrade leaves the running kubelet's files as
// they were.
func heldBack(p string) bool {
	switch p {
	case render.KubeletConfigFile, render.KubeletFlagsFile, render.KubeletInstanceConfigFile,
		render.KubeletUnitFile, render.KubeletDropInFile:
		return true
	}
	return path.Dir(p) == render.ManifestsDir || path.Base(p) == "kubelet"
}

// imageTag is the tag of a static pod manifest's first container image.
func imageOf(manifest []byte) (string, error) {
	var pod corev1.Pod
	if err := yaml.Unmarshal(manifest, &pod); err != nil {
		return "", err
	}
	if len(pod.Spec.Containers) == 0 {
		return "", fmt.Errorf("no container")
	}
	return pod.Spec.Containers[0].Image, nil
}

func tagOf(image string) string {
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		return image[i+1:]
	}
	return ""
}

// leaderOf reads the first member of the bundle's etcd --initial-cluster.
func leaderOf(files map[string][]byte) string {
	var pod corev1.Pod
	if yaml.Unmarshal(files[manifestPath("etcd")], &pod) != nil || len(pod.Spec.Containers) == 0 {
		return ""
	}
	for _, a := range pod.Spec.Containers[0].Command {
		if v, ok := strings.CutPrefix(a, "--initial-cluster="); ok {
			name, _, _ := strings.Cut(v, "=")
			return name
		}
	}
	return ""
}

// installedVersion is the Kubernetes version the node runs: a control
// plane's is its kube-apiserver manifest's image tag, a worker's the one
// the journal recorded when its bundle was applied. "" means none (a
// fresh host, or a journal of another cluster).
func installedVersion(root string, m *bundle.Manifest, j *Journal) (string, error) {
	if render.Role(m.Role) == render.ControlPlane {
		b, err := os.ReadFile(hostfs.Path(root, manifestPath("kube-apiserver")))
		if errors.Is(err, fs.ErrNotExist) {
			return "", nil
		}
		if err != nil {
			return "", fmt.Errorf("reading %s: %w", manifestPath("kube-apiserver"), err)
		}
		im, err := imageOf(b)
		if err != nil {
			return "", fmt.Errorf("reading %s: %w", manifestPath("kube-apiserver"), err)
		}
		return tagOf(im), nil
	}
	if j == nil || j.foreign(m) {
		return "", nil
	}
	return j.KubernetesVersion, nil
}

// SkewPolicy is kubeadm's upgrade policy (phases/upgrade/policy.go) for a
// node running from that is given a bundle of to: one minor per step, no
// downgrade. It returns nil when to is not newer (nothing to upgrade).
func SkewPolicy(from, to string) (*Upgrade, error) {
	if from == "" || from == to {
		return nil, nil
	}
	f, err := version.ParseSemantic(from)
	if err != nil {
		return nil, fmt.Errorf("%w: the node runs Kubernetes %q, which is not a version: %w", ErrRefused, from, err)
	}
	t, err := version.ParseSemantic(to)
	if err != nil {
		return nil, fmt.Errorf("%w: the bundle's Kubernetes %q is not a version: %w", ErrRefused, to, err)
	}
	switch {
	case t.LessThan(f):
		return nil, fmt.Errorf("%w: the node runs Kubernetes %s and this bundle carries %s: airadm does not downgrade; rebuild the bundle with kubernetes_version = %q or newer", ErrRefused, from, to, from)
	case t.Major() != f.Major() || t.Minor() > f.Minor()+1:
		return nil, fmt.Errorf("%w: the node runs Kubernetes %s and this bundle carries %s: an upgrade goes one minor version at a time; apply a bundle of v%d.%d.x first", ErrRefused, from, to, f.Major(), f.Minor()+1)
	}
	return &Upgrade{From: from, To: to}, nil
}

// detectUpgrade finds whether applying m on this host is an upgrade, and
// refuses one the skew policy forbids, before anything is planned.
func detectUpgrade(root string, m *bundle.Manifest, files map[string][]byte, j *Journal) (*Upgrade, error) {
	from, err := installedVersion(root, m, j)
	if err != nil {
		return nil, err
	}
	u, err := SkewPolicy(from, m.KubernetesVersion)
	if u != nil {
		u.Leader = leaderOf(files)
	}
	return u, err
}

// upgradePreflight checks what an upgrade needs of the cluster, changing
// nothing: a worker or a control plane that is not the leader needs an API
// server at least as new as its bundle (kubelets and followers must not
// run ahead of it); a control plane needs its etcd healthy.
func (r *Run) upgradePreflight(ctx context.Context) error {
	u := r.upgrade
	r.logf("  upgrade of node %s: Kubernetes %s -> %s", r.Manifest.Node, u.From, u.To)
	if r.Drain && r.worker() {
		// A worker holds only its kubelet's credential, which may not
		// evict pods.
		return fmt.Errorf("%w: --drain needs a cluster-admin credential, which a worker does not hold: drain it from a control plane (kubectl drain %s --ignore-daemonsets), apply this bundle without --drain, then uncordon it", ErrRefused, r.Manifest.Node)
	}
	if r.DryRun {
		r.printUpgradePlan(ctx)
	}
	if r.worker() || u.Leader != r.Manifest.Node {
		cs, err := r.upgradeClient()
		if err != nil {
			return err
		}
		// The API may be restarting (a control plane just upgraded, its
		// kubelet restarted): ask again, backing off, within --timeout.
		var sv *apiversion.Info
		deadline := time.Now().Add(r.Timeout)
		for b := newBackoff(time.Second); ; {
			if sv, err = cs.Discovery().ServerVersion(); err == nil {
				break
			}
			if time.Now().After(deadline) || b.wait(ctx) != nil {
				return fmt.Errorf("asking the API server its version: %w", err)
			}
		}
		api, err := version.ParseSemantic(sv.GitVersion)
		if err != nil {
			return fmt.Errorf("reading the API server's version %q: %w", sv.GitVersion, err)
		}
		if api.LessThan(version.MustParseSemantic(u.To)) {
			first := "the control plane"
			if u.Leader != "" {
				first = "control plane " + u.Leader
			}
			return fmt.Errorf("%w: the API server runs %s, older than this bundle's %s: upgrade %s first (its bundle of %s), then this node; nothing was changed", ErrRefused, sv.GitVersion, u.To, first, u.To)
		}
		r.logf("  the API server runs %s", sv.GitVersion)
	}
	if !r.worker() && r.DryRun {
		r.logf("  skipped: etcd health (dry run)")
	} else if !r.worker() {
		if err := etcdHealthy(ctx, r.files); err != nil {
			return fmt.Errorf("etcd is not healthy, so nothing was changed: %w", err)
		}
		r.logf("  etcd healthy")
	}
	return nil
}

// etcdHealthy asks the local etcd member's /readyz on its metrics
// listener, the endpoint its static pod probes.
func etcdHealthy(ctx context.Context, files map[string][]byte) error {
	url := "http://127.0.0.1:2381/readyz"
	var pod corev1.Pod
	if yaml.Unmarshal(files[manifestPath("etcd")], &pod) == nil && len(pod.Spec.Containers) > 0 {
		for _, a := range pod.Spec.Containers[0].Command {
			if v, ok := strings.CutPrefix(a, "--listen-metrics-urls="); ok {
				url = strings.Split(v, ",")[0] + "/readyz"
			}
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("asking %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

// printUpgradePlan is --dry-run's plan: each component, old -> new.
func (r *Run) printUpgradePlan(ctx context.Context) {
	u := r.upgrade
	if !r.worker() {
		for _, c := range staticPodComponents {
			old, _ := os.ReadFile(r.path(manifestPath(c)))
			oldIm, _ := imageOf(old)
			newIm, _ := imageOf(r.files[manifestPath(c)])
			switch {
			case bytes.Equal(old, r.files[manifestPath(c)]):
				r.logf("  plan: %-24s %s (unchanged)", c, oldIm)
			case oldIm == newIm:
				r.logf("  plan: %-24s %s (manifest changes)", c, newIm)
			default:
				r.logf("  plan: %-24s %s -> %s", c, oldIm, newIm)
			}
		}
		for _, a := range addonImages(r.files[render.AddonsFile]) {
			r.logf("  plan: %-24s -> %s", a.name, a.image)
		}
	}
	r.logf("  plan: %-24s %s -> %s", "kubelet", u.From, u.To)
}

type addonImage struct{ name, image string }

// addonImages lists the CoreDNS and kube-proxy images the bundle's addons
// deploy.
func addonImages(addons []byte) []addonImage {
	var out []addonImage
	for _, doc := range render.SplitYAML(addons) {
		var obj struct {
			Kind     string            `json:"kind"`
			Metadata metav1.ObjectMeta `json:"metadata"`
			Spec     struct {
				Template corev1.PodTemplateSpec `json:"template"`
			} `json:"spec"`
		}
		if yaml.Unmarshal(doc, &obj) != nil || (obj.Kind != "Deployment" && obj.Kind != "DaemonSet") {
			continue
		}
		for _, c := range obj.Spec.Template.Spec.Containers {
			out = append(out, addonImage{obj.Metadata.Name, c.Image})
		}
	}
	return out
}

// runUpgradeControlPlane swaps the static pods one at a time, as kubeadm's
// StaticPodControlPlane does: it backs up the manifests and etcd's data
// under /etc/kubernetes/tmp/ first, then, for each component whose
// manifest differs, writes the new manifest and waits until the kubelet
// runs it (the mirror pod's kubernetes.io/config.hash changed and the pod
// is ready). A component that does not come up is rolled back to its old
// manifest, and the error names it and the backup.
func runUpgradeControlPlane(ctx context.Context, r *Run) error {
	if r.upgrade == nil {
		r.logf("  not an upgrade: the static pods were written by the files phase")
		return nil
	}
	var changed []string
	for _, c := range staticPodComponents {
		old, err := os.ReadFile(r.path(manifestPath(c)))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("reading %s: %w", manifestPath(c), err)
		}
		if !bytes.Equal(old, r.files[manifestPath(c)]) {
			changed = append(changed, c)
		}
	}
	if r.DryRun {
		r.logf("  would back up %s and %s under %s, then swap %s one at a time, waiting for each", render.ManifestsDir, render.EtcdDataDir, upgradeTmpDir, strings.Join(changed, ", "))
		return nil
	}
	if len(changed) == 0 {
		r.logf("  every static pod manifest is already the bundle's")
		return nil
	}
	stamp := r.Now().Format("2006-01-02-15-04-05")
	manifestsBackup := upgradeTmpDir + "/kubeadm-backup-manifests-" + stamp
	etcdBackup := upgradeTmpDir + "/kubeadm-backup-etcd-" + stamp
	if err := backupDir(r.path(render.ManifestsDir), r.path(manifestsBackup)); err != nil {
		return fmt.Errorf("backing up the static pod manifests: %w", err)
	}
	if err := backupDir(r.path(render.EtcdDataDir), r.path(etcdBackup)); err != nil {
		return fmt.Errorf("backing up etcd's data: %w", err)
	}
	r.logf("  backed up the manifests to %s and etcd's data to %s", manifestsBackup, etcdBackup)
	cs, err := r.Client(superAdmin)
	if err != nil {
		return err
	}
	for _, c := range changed {
		start := time.Now()
		if err := r.swapStaticPod(ctx, cs, c, manifestsBackup, etcdBackup); err != nil {
			return err
		}
		r.logf("  %s upgraded in %v", c, time.Since(start).Round(10*time.Millisecond))
	}
	return nil
}

const upgradeTmpDir = render.KubernetesDir + "/tmp"

// swapStaticPod writes component's new manifest and waits for the kubelet
// to run it; on failure it puts the backup back and waits for the old pod.
func (r *Run) swapStaticPod(ctx context.Context, cs kubernetes.Interface, component, manifestsBackup, etcdBackup string) error {
	before, err := r.mirrorPodHash(ctx, cs, component)
	if err != nil {
		return fmt.Errorf("upgrading %s: finding its running pod: %w", component, err)
	}
	data := r.files[manifestPath(component)]
	if r.UpgradeManifestHook != nil {
		data = r.UpgradeManifestHook(component, data)
	}
	if err := atomicfile.Write(r.path(manifestPath(component)), data, 0o600); err != nil {
		return fmt.Errorf("upgrading %s: %w", component, err)
	}
	r.logf("  %s: new manifest in place; waiting for the kubelet to run it", component)
	waitErr := r.waitStaticPod(ctx, cs, component, func(hash string) bool { return hash != "" && hash != before })
	if waitErr == nil {
		return nil
	}
	// Roll back this component: its old manifest, then its old pod.
	r.logf("  %s did not come up (%v); rolling back to %s", component, waitErr, manifestsBackup)
	old, err := os.ReadFile(r.path(manifestsBackup + "/" + component + ".yaml"))
	if err == nil {
		err = atomicfile.Write(r.path(manifestPath(component)), old, 0o600)
	}
	if err != nil {
		return fmt.Errorf("upgrading %s failed (%w), and restoring its manifest from %s failed too: %v", component, waitErr, manifestsBackup, err)
	}
	rollbackErr := r.waitStaticPod(ctx, cs, component, func(hash string) bool { return hash == before })
	if rollbackErr != nil && component == "etcd" {
		// The old etcd does not come back on the current data: put the
		// backup of the data back, as kubeadm's rollbackEtcdData does.
		if err := restoreDir(r.path(etcdBackup), r.path(render.EtcdDataDir)); err != nil {
			return fmt.Errorf("upgrading etcd failed (%w); restoring its data from %s failed: %v", waitErr, etcdBackup, err)
		}
		rollbackErr = r.waitStaticPod(ctx, cs, component, func(hash string) bool { return hash == before })
	}
	if rollbackErr != nil {
		return fmt.Errorf("upgrading %s failed: %w; its old manifest is back from %s (etcd's data backup: %s), but it is not running yet: %v", component, waitErr, manifestsBackup, etcdBackup, rollbackErr)
	}
	return fmt.Errorf("upgrading %s failed: %w; rolled %s back to its old manifest from %s, and it runs again (etcd's data backup: %s)", component, waitErr, component, manifestsBackup, etcdBackup)
}

// mirrorPodHash is the kubernetes.io/config.hash of the component's
// mirror pod on this node.
func (r *Run) mirrorPodHash(ctx context.Context, cs kubernetes.Interface, component string) (string, error) {
	var hash string
	err := r.poll(ctx, 250*time.Millisecond, func(ctx context.Context) (bool, error) {
		pod, err := cs.CoreV1().Pods(metav1.NamespaceSystem).Get(ctx, component+"-"+r.Manifest.Node, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		hash = pod.Annotations[configHashAnnotation]
		return hash != "", fmt.Errorf("pod %s has no %s annotation", pod.Name, configHashAnnotation)
	})
	return hash, err
}

const configHashAnnotation = "kubernetes.io/config.hash"

// waitStaticPod polls the component's mirror pod until its hash passes ok
// and it is ready (running, for a pod with no readiness probe). While the
// apiserver restarts, the requests fail and are retried.
func (r *Run) waitStaticPod(ctx context.Context, cs kubernetes.Interface, component string, ok func(hash string) bool) error {
	return r.poll(ctx, 250*time.Millisecond, func(ctx context.Context) (bool, error) {
		pod, err := cs.CoreV1().Pods(metav1.NamespaceSystem).Get(ctx, component+"-"+r.Manifest.Node, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) {
				return false, fmt.Errorf("no mirror pod %s-%s yet", component, r.Manifest.Node)
			}
			return false, err
		}
		if h := pod.Annotations[configHashAnnotation]; !ok(h) {
			return false, fmt.Errorf("the mirror pod's hash is %s", h)
		}
		if pod.Status.Phase != corev1.PodRunning {
			return false, fmt.Errorf("pod %s is %s", pod.Name, pod.Status.Phase)
		}
		for _, c := range pod.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, fmt.Errorf("pod %s is running but not ready", pod.Name)
	})
}

// backupDir copies the tree at src to dst (which must not exist), as
// kubeadm's CopyDir (cp -r) does, owner-only: etcd's data holds the
// cluster's Secrets. A missing src is an empty backup.
func backupDir(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	if err := os.Chmod(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	if _, err := os.Stat(src); errors.Is(err, fs.ErrNotExist) {
		return os.Mkdir(dst, 0o700)
	}
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		return err
	}
	return ownerOnly(dst)
}

// restoreDir replaces dst's content with the backup at src.
func restoreDir(src, dst string) error {
	if err := os.RemoveAll(dst); err != nil {
		return err
	}
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		return err
	}
	return ownerOnly(dst)
}

// ownerOnly makes a copied tree 0700 directories and 0600 files (CopyFS
// creates them by the umask), as etcd keeps its data directory.
func ownerOnly(dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.Chmod(p, 0o700)
		}
		return os.Chmod(p, 0o600)
	})
}

// upgradeClient is the API client an upgrade uses on this node: the
// super-admin on a control plane, the kubelet's own credential on a
// worker, which holds no other.
func (r *Run) upgradeClient() (kubernetes.Interface, error) {
	if r.worker() {
		return r.Client(render.KubeletKubeconfig)
	}
	return r.Client(superAdmin)
}

// upgradeKubelet writes the kubelet's held-back files (binary, config,
// flags, unit), restarts it, and waits for the Node to report the new
// version. With Drain, the node is cordoned and its pods evicted first,
// and uncordoned after.
func (r *Run) upgradeKubelet(ctx context.Context) error {
	u := r.upgrade
	if r.DryRun {
		r.logf("  would write the kubelet's binary, config and flags of %s and restart it", u.To)
		if r.Drain {
			r.logf("  would drain node %s first and uncordon it after", r.Manifest.Node)
		}
		return nil
	}
	cs, err := r.upgradeClient()
	if err != nil {
		return err
	}
	if r.Drain {
		if err := r.drain(ctx, cs); err != nil {
			return err
		}
	}
	wrote, _, err := r.writeEntries(ctx, heldBackKubelet, true)
	if err != nil {
		return err
	}
	r.logf("  wrote %d of the kubelet's files", wrote)
	if err := r.restartKubelet(ctx); err != nil {
		return err
	}
	start := time.Now()
	err = r.poll(ctx, 250*time.Millisecond, func(ctx context.Context) (bool, error) {
		n, err := cs.CoreV1().Nodes().Get(ctx, r.Manifest.Node, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if v := n.Status.NodeInfo.KubeletVersion; v != u.To {
			return false, fmt.Errorf("node %s reports kubelet %s", r.Manifest.Node, v)
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, fmt.Errorf("node %s is not Ready", r.Manifest.Node)
	})
	if err != nil {
		return fmt.Errorf("waiting for node %s to report kubelet %s: %w", r.Manifest.Node, u.To, err)
	}
	r.logf("  node %s reports kubelet %s and is Ready after %v", r.Manifest.Node, u.To, time.Since(start).Round(10*time.Millisecond))
	if r.Drain {
		if err := r.cordon(ctx, cs, false); err != nil {
			return err
		}
		r.logf("  node %s uncordoned", r.Manifest.Node)
	}
	return nil
}

func heldBackKubelet(p string) bool { return heldBack(p) && path.Dir(p) != render.ManifestsDir }

// restartKubelet restarts a running kubelet on its new binary and config.
func (r *Run) restartKubelet(ctx context.Context) error {
	if r.kubeletMode() == KubeletSystemd {
		// Restart whether or not its config changed: its binary did.
		for _, args := range [][]string{{"daemon-reload"}, {"restart", "kubelet"}} {
			if out, err := exec.CommandContext(ctx, "systemctl", args...).CombinedOutput(); err != nil {
				return fmt.Errorf("systemctl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
			}
		}
		r.logf("  kubelet restarted by systemd")
		return nil
	}
	if pid, ok := r.runningKubelet(); ok {
		if err := stopProcess(pid); err != nil {
			return err
		}
		r.logf("  stopped kubelet (pid %d)", pid)
	}
	return startKubelet(ctx, r)
}

// drain cordons the node and evicts its pods but mirror and DaemonSet
// pods, as `kubectl drain --ignore-daemonsets` does, waiting until they
// are gone.
func (r *Run) drain(ctx context.Context, cs kubernetes.Interface) error {
	if err := r.cordon(ctx, cs, true); err != nil {
		return err
	}
	pods, err := cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + r.Manifest.Node})
	if err != nil {
		return fmt.Errorf("draining node %s: %w", r.Manifest.Node, err)
	}
	var evicted []corev1.Pod
	for _, p := range pods.Items {
		if _, mirror := p.Annotations[corev1.MirrorPodAnnotationKey]; mirror {
			continue
		}
		if ref := metav1.GetControllerOf(&p); ref != nil && ref.Kind == "DaemonSet" {
			continue
		}
		ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace}}
		if err := cs.PolicyV1().Evictions(p.Namespace).Evict(ctx, ev); err != nil {
			return fmt.Errorf("draining node %s: evicting %s/%s: %w", r.Manifest.Node, p.Namespace, p.Name, err)
		}
		evicted = append(evicted, p)
	}
	err = r.poll(ctx, 250*time.Millisecond, func(ctx context.Context) (bool, error) {
		for _, p := range evicted {
			got, err := cs.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
			if err == nil && got.UID == p.UID {
				return false, fmt.Errorf("pod %s/%s is still there", p.Namespace, p.Name)
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("draining node %s: %w", r.Manifest.Node, err)
	}
	r.logf("  node %s cordoned and drained (%d pods evicted)", r.Manifest.Node, len(evicted))
	return nil
}

func (r *Run) cordon(ctx context.Context, cs kubernetes.Interface, on bool) error {
	patch := []byte(`{"spec":{"unschedulable":` + strconv.FormatBool(on) + `}}`)
	if _, err := cs.CoreV1().Nodes().Patch(ctx, r.Manifest.Node, "application/strategic-merge-patch+json", patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("setting node %s unschedulable=%v: %w", r.Manifest.Node, on, err)
	}
	return nil
}
