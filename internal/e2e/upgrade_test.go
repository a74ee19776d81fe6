package e2e_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"

	"airadm.dev/airadm/internal/k8sbin"
	"airadm.dev/airadm/render"
)

// TestUpgrade builds a v1.36.3 cluster (a control plane and a worker)
// from airadm bundles on real binaries, runs a Deployment and a ConfigMap
// on it, and upgrades it to v1.37.2 by applying rebuilt bundles, control
// plane first. On the way it checks that the worker's new bundle is
// refused while the control plane is older, and that a control-plane
// upgrade whose apiserver cannot start is rolled back.
func TestUpgrade(t *testing.T) {
	needRootAndTools(t, "network and mount namespaces")
	from, to := k8sbin.PreviousKubernetesVersion, render.KubernetesVersion
	kubeadm, err := k8sbin.PathFor(to, "kubeadm")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer reg.Close()
	repo := strings.TrimPrefix(reg.URL, "http://") + "/k8s"
	// The upgrade e2e's airadm has the hook that breaks a component.
	airadm := buildAiradm(t, "airadm_testhooks")

	// One cluster.toml, rebuilt with the new version: the secrets beside it
	// are reused, as an operator's would be.
	work := t.TempDir()
	cfg := filepath.Join(work, "cluster.toml")
	clusters := map[string]*render.Cluster{}
	for _, v := range []string{from, to} {
		os.WriteFile(cfg, []byte(fmt.Sprintf(`name = "up"
kubernetes_version = %q
[network]
pod_subnet = "10.244.0.0/16"
[pki]
algorithm = "ECDSA-P256"
[images]
repository = %q
`+buildMachineTOML+`[[nodes]]
name = "cp1"
role = "control-plane"
address = "10.77.0.11"
kubelet_config = { cgroupRoot = "/airadm-e2e-cp1" }
[[nodes]]
name = "w1"
role = "worker"
address = "10.77.0.21"
kubelet_config = { cgroupRoot = "/airadm-e2e-w1" }
`, v, repo)+runtimeHostFilesFor(t, v)), 0o644)
		clusters[v] = loadAndPush(t, cfg, repo)
		airadmBuild(t, airadm, "-c", cfg, "-o", filepath.Join(work, v))
	}
	bundle := func(v, node string) string { return filepath.Join(work, v, node+".bundle") }

	network(t)
	mountPoints(t)
	cp := newNode(t, "cp1", "10.77.0.11")
	w := newNode(t, "w1", "10.77.0.21")
	for n, subnet := range map[*node]string{cp: "10.244.0.0/24", w: "10.244.1.0/24"} {
		n.makeCgroupRoot()
		os.WriteFile(filepath.Join(n.dir, "etc_cni_net.d", "10-e2e.conflist"), []byte(fmt.Sprintf(cniConfig, subnet)), 0o644)
	}
	t.Cleanup(func() {
		for _, n := range []*node{w, cp} {
			if out, err := n.run(context.Background(), airadm, "reset", "--force"); err != nil {
				t.Logf("reset %s: %v\n%s", n.name, err, out)
			}
		}
	})
	// apply runs airadm apply on n and returns its output and exit code.
	apply := func(n *node, path string, env []string, args ...string) (string, int) {
		t.Helper()
		args = append([]string{"apply"}, args...)
		args = append(args, "--node", n.name, "--kubelet", "exec", "--kubelet-binary", "/usr/local/bin/kubelet", path)
		cmd := n.command(ctx, airadm, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return string(out), exit.ExitCode()
		}
		if err != nil {
			t.Fatalf("airadm apply on %s: %v\n%s", n.name, err, out)
		}
		return string(out), 0
	}
	mustApply := func(n *node, path string) string {
		t.Helper()
		out, code := apply(n, path, nil)
		if code != 0 {
			logs, _ := os.ReadFile(filepath.Join(n.dir, "var_log_airadm", "kubelet.log"))
			t.Fatalf("airadm apply %s on %s: exit %d\n%s\n--- kubelet log (end):\n%s", filepath.Base(filepath.Dir(path)), n.name, code, out, lastLines(string(logs), 40))
		}
		t.Logf("airadm apply %s on %s:\n%s", filepath.Base(filepath.Dir(path)), n.name, out)
		return out
	}

	mustApply(cp, bundle(from, "cp1"))
	restCfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(cp.dir, "etc_kubernetes", "admin.conf"))
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		t.Fatal(err)
	}
	mustApply(w, bundle(from, "w1"))
	nodesAt := func(v string) (int, error) {
		nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return 0, err
		}
		n := 0
		for _, nd := range nodes.Items {
			for _, c := range nd.Status.Conditions {
				if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue && nd.Status.NodeInfo.KubeletVersion == v {
					n++
				}
			}
		}
		return n, nil
	}
	waitFor(t, ctx, 3*time.Minute, "both nodes Ready on "+from, func() (bool, error) {
		n, err := nodesAt(from)
		return n == 2, err
	})

	// The workload that must come through untouched.
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "keep", Namespace: "default"}, Data: map[string]string{"k": "v"}}
	if _, err := cs.CoreV1().ConfigMaps("default").Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"app": "keep"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "keep", Namespace: "default"},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(int32(2)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name: "pause", Image: clusters[from].PauseImage(), ImagePullPolicy: corev1.PullNever,
				}}},
			},
		},
	}
	if _, err := cs.AppsV1().Deployments("default").Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	runningPods := func() ([]string, error) {
		pods, err := cs.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=keep"})
		if err != nil {
			return nil, err
		}
		var uids []string
		for _, p := range pods.Items {
			if p.Status.Phase == corev1.PodRunning {
				uids = append(uids, string(p.UID))
			}
		}
		slices.Sort(uids)
		return uids, nil
	}
	var before []string
	waitFor(t, ctx, 2*time.Minute, "the Deployment's 2 pods running", func() (bool, error) {
		uids, err := runningPods()
		before = uids
		return len(uids) == 2, err
	})

	t.Run("RefusedOrder", func(t *testing.T) {
		// The worker's new bundle while the control plane is still older.
		snap := func() string {
			h := sha256.New()
			for _, f := range []string{"usr_local_bin/kubelet", "var_lib_kubelet/config.yaml", "var_lib_airadm/journal.json", "etc_kubernetes/kubelet.conf"} {
				b, _ := os.ReadFile(filepath.Join(w.dir, f))
				h.Write(b)
			}
			return fmt.Sprintf("%x", h.Sum(nil))
		}
		was := snap()
		out, code := apply(w, bundle(to, "w1"), nil)
		if code != 2 || !strings.Contains(out, "older than this bundle's "+to+": upgrade ") {
			t.Fatalf("worker's %s bundle before the control plane's: exit %d, want 2 naming the control plane\n%s", to, code, out)
		}
		if snap() != was {
			t.Error("the refused apply changed the worker's files")
		}
		if n, err := nodesAt(from); err != nil || n != 2 {
			t.Errorf("after the refused apply, %d nodes Ready on %s (%v), want 2", n, from, err)
		}
		t.Logf("refused as it should be:\n%s", lastLines(out, 3))
	})

	t.Run("Rollback", func(t *testing.T) {
		out, code := apply(cp, bundle(to, "cp1"), []string{"AIRADM_TEST_BREAK_UPGRADE=kube-apiserver"}, "--timeout", "60s")
		if code == 0 || !strings.Contains(out, "upgrading kube-apiserver failed") || !strings.Contains(out, "/etc/kubernetes/tmp/kubeadm-backup-manifests-") {
			t.Fatalf("an upgrade whose apiserver cannot start: exit %d, want non-zero naming kube-apiserver and the backup\n%s", code, out)
		}
		waitFor(t, ctx, 2*time.Minute, "the API back on "+from, func() (bool, error) {
			v, err := cs.Discovery().ServerVersion()
			if err != nil {
				return false, err
			}
			return v.GitVersion == from, fmt.Errorf("the API server runs %s", v.GitVersion)
		})
		manifest, _ := os.ReadFile(filepath.Join(cp.dir, "etc_kubernetes", "manifests", "kube-apiserver.yaml"))
		if !strings.Contains(string(manifest), "kube-apiserver:"+from) || strings.Contains(string(manifest), "no-such-flag") {
			t.Errorf("kube-apiserver.yaml was not rolled back:\n%s", manifest)
		}
		t.Logf("rolled back:\n%s", lastLines(out, 4))
	})

	// The upgrade, watched from outside: /readyz every 100 ms.
	stopWatch := watchReadyzGaps(ctx, cp.addr, 100*time.Millisecond)
	cpOut := mustApply(cp, bundle(to, "cp1"))
	wOut := mustApply(w, bundle(to, "w1"))
	gap := stopWatch()
	for _, want := range []string{"kube-apiserver upgraded", "kubeadm-backup-manifests-", "kubeadm-backup-etcd-"} {
		if !strings.Contains(cpOut, want) {
			t.Errorf("the control plane's upgrade does not say %q", want)
		}
	}
	if !strings.Contains(wOut, "reports kubelet "+to) {
		t.Errorf("the worker's upgrade does not say it reports kubelet %s", to)
	}

	waitFor(t, ctx, 2*time.Minute, "both nodes Ready on "+to, func() (bool, error) {
		n, err := nodesAt(to)
		return n == 2, err
	})
	want := map[string]string{}
	for _, im := range clusters[to].CoreImages() {
		want[im.Component] = im.Ref
	}
	waitFor(t, ctx, 2*time.Minute, "every control-plane pod on the "+to+" images", func() (bool, error) {
		pods, err := cs.CoreV1().Pods(metav1.NamespaceSystem).List(ctx, metav1.ListOptions{LabelSelector: "tier=control-plane"})
		if err != nil {
			return false, err
		}
		if len(pods.Items) != 4 {
			return false, fmt.Errorf("%d control-plane pods", len(pods.Items))
		}
		for _, p := range pods.Items {
			c := p.Labels["component"]
			if got := p.Spec.Containers[0].Image; got != want[c] {
				return false, fmt.Errorf("%s runs %s, want %s", p.Name, got, want[c])
			}
			if p.Status.Phase != corev1.PodRunning {
				return false, fmt.Errorf("%s is %s", p.Name, p.Status.Phase)
			}
		}
		return true, nil
	})
	got, err := cs.CoreV1().ConfigMaps("default").Get(ctx, "keep", metav1.GetOptions{})
	if err != nil || got.Data["k"] != "v" {
		t.Errorf("the ConfigMap did not survive: %v %v", got, err)
	}
	after, err := runningPods()
	if err != nil || !slices.Equal(after, before) {
		t.Errorf("the Deployment's running pods were %v, are %v (%v)", before, after, err)
	}
	// The real kubeadm of the new version reads the cluster.
	plan, err := cp.run(ctx, kubeadm, "upgrade", "plan", "-v=1", "--kubeconfig", "/etc/kubernetes/admin.conf")
	t.Logf("kubeadm upgrade plan:\n%s", plan)
	// kubeadm prints the version without its "v".
	if err != nil || !strings.Contains(plan, "Cluster version: "+strings.TrimPrefix(to, "v")) {
		t.Errorf("kubeadm upgrade plan: %v, want it to find the cluster at %s", err, to)
	}
	n, _ := nodesAt(to)
	untouched := "workload untouched"
	if !slices.Equal(after, before) {
		untouched = "workload CHANGED"
	}
	fmt.Printf("upgrade-e2e: %s -> %s, %d/2 nodes, API unavailable %s at most, %s\n", from, to, n, gap.Round(100*time.Millisecond), untouched)
}

// watchReadyzGaps polls https://addr:6443/readyz every interval and, when
// stopped, returns the longest time it went without an ok.
func watchReadyzGaps(ctx context.Context, addr string, interval time.Duration) func() time.Duration {
	ctx, cancel := context.WithCancel(ctx)
	client := &http.Client{Timeout: interval, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}}
	var longest time.Duration
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		lastOK := time.Now()
		for ctx.Err() == nil {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+":6443/readyz", nil)
			ok := false
			if resp, err := client.Do(req); err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				ok = resp.StatusCode == http.StatusOK && string(b) == "ok"
			}
			now := time.Now()
			if ok {
				lastOK = now
			}
			longest = max(longest, now.Sub(lastOK))
			select {
			case <-ctx.Done():
			case <-tick.C:
			}
		}
	}()
	return func() time.Duration {
		cancel()
		wg.Wait()
		return longest
	}
}
