package phases

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	bootstrapapi "k8s.io/cluster-bootstrap/token/api"

	"airadm.dev/airadm/render"
)

const superAdmin = render.KubernetesDir + "/super-admin.conf"

// poll calls f until it returns true, with backoff from 20 ms doubling
// up to maxInterval, for at most the run's timeout. It tells a cancelled
// run (a signal) from a wait that ran out of time.
func (r *Run) poll(ctx context.Context, maxInterval time.Duration, f func(context.Context) (bool, error)) error {
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, r.Timeout)
	defer cancel()
	b := newBackoff(maxInterval)
	var last error
	for {
		done, err := f(ctx)
		if done {
			return nil
		}
		if err != nil {
			last = err
		}
		if b.wait(ctx) == nil {
			continue
		}
		switch {
		case parent.Err() != nil && last != nil:
			return fmt.Errorf("%w (last error: %v)", context.Cause(parent), last)
		case parent.Err() != nil:
			return context.Cause(parent)
		case last != nil:
			return fmt.Errorf("gave up after %v: %w", r.Timeout, last)
		default:
			return fmt.Errorf("gave up after %v", r.Timeout)
		}
	}
}

func runWaitControlPlane(ctx context.Context, r *Run) error {
	if r.DryRun {
		r.logf("  would wait up to %v for /readyz through %s, then bind group %s to cluster-admin", r.Timeout, superAdmin, ClusterAdminsGroup)
		return nil
	}
	cs, err := r.Client(superAdmin)
	if err != nil {
		return err
	}
	start := time.Now()
	// The other API steps (and the cluster-admins binding) need only an
	// apiserver that serves requests and has its kube-system namespace,
	// which it does a second or two before /readyz, while its post-start
	// hooks finish. They start then, with retries for anything not yet in
	// place, so that they are done, or nearly, when /readyz answers.
	admins := make(chan error, 1)
	actx, stopAdmins := context.WithCancel(ctx)
	defer stopAdmins()
	opened := false
	open := func() {
		opened = true
		r.logf("  apiserver answering after %v; the other API steps start", time.Since(start).Round(10*time.Millisecond))
		r.apiIsReady()
		go func() { admins <- EnsureClusterAdmins(actx, cs) }()
	}
	err = r.poll(ctx, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(body) == "ok" {
			return true, nil
		}
		var status apierrors.APIStatus
		if !opened && errors.As(err, &status) {
			if _, nsErr := cs.CoreV1().Namespaces().Get(ctx, metav1.NamespaceSystem, metav1.GetOptions{}); nsErr == nil {
				open()
			}
		}
		return false, err
	})
	if err != nil {
		if opened {
			stopAdmins()
			<-admins
		}
		return fmt.Errorf("the apiserver is not ready: %w; %s", err, staticPodHealth(ctx))
	}
	r.logf("  apiserver ready after %v", time.Since(start).Round(10*time.Millisecond))
	if !opened {
		open()
	}
	return <-admins
}

// staticPodHealth asks each control-plane component's own health endpoint,
// so a failed wait says which static pod is at fault.
func staticPodHealth(ctx context.Context) string {
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		// Only liveness is read; the components serve self-signed certificates.
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}}
	var parts []string
	for _, c := range []struct{ name, url string }{
		{"etcd", "http://127.0.0.1:2381/health"},
		{"kube-apiserver", "https://127.0.0.1:6443/livez"},
		{"kube-controller-manager", "https://127.0.0.1:10257/healthz"},
		{"kube-scheduler", "https://127.0.0.1:10259/healthz"},
	} {
		req, _ := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodGet, c.url, nil)
		resp, err := client.Do(req)
		switch {
		case err != nil:
			parts = append(parts, c.name+" not answering")
		case resp.StatusCode != http.StatusOK:
			parts = append(parts, fmt.Sprintf("%s unhealthy (HTTP %d)", c.name, resp.StatusCode))
		default:
			parts = append(parts, c.name+" healthy")
		}
		if resp != nil {
			resp.Body.Close()
		}
	}
	return "static pods: " + strings.Join(parts, ", ") + " (see crictl ps -a and the kubelet log)"
}

func runUploadConfig(ctx context.Context, r *Run) error {
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	clusterCfg, kubeletCfg := files[render.KubeadmConfigFile], files[render.ClusterKubeletConfigFile]
	if clusterCfg == nil || kubeletCfg == nil {
		return fmt.Errorf("the bundle lacks %s or %s", render.KubeadmConfigFile, render.ClusterKubeletConfigFile)
	}
	if r.DryRun {
		r.logf("  would store ConfigMaps kube-system/kubeadm-config and kube-system/kubelet-config with their RBAC")
		return nil
	}
	if err := r.waitAPI(ctx); err != nil {
		return err
	}
	cs, err := r.Client(superAdmin)
	if err != nil {
		return err
	}
	// Six objects that name but do not need each other: all at once.
	g, gctx := errgroup.WithContext(ctx)
	cms := cs.CoreV1().ConfigMaps(metav1.NamespaceSystem)
	for _, cm := range []*corev1.ConfigMap{
		{ObjectMeta: metav1.ObjectMeta{Name: "kubeadm-config", Namespace: metav1.NamespaceSystem}, Data: map[string]string{"ClusterConfiguration": string(clusterCfg)}},
		render.SignComponentConfig(&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kubelet-config", Namespace: metav1.NamespaceSystem}, Data: map[string]string{"kubelet": string(kubeletCfg)}}),
	} {
		g.Go(func() error { return createOrUpdate(gctx, cms, cm, keepVersion) })
	}
	// kubeadm lets nodes and token holders read both, so that `kubeadm
	// join` and `kubeadm upgrade node` work on this cluster later.
	subjects := []rbacv1.Subject{group(nodesGroup), group(NodeBootstrapTokenAuthGroup)}
	for name, cm := range map[string]string{"kubeadm:nodes-kubeadm-config": "kubeadm-config", "kubeadm:kubelet-config": "kubelet-config"} {
		role := &rbacv1.Role{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: metav1.NamespaceSystem},
			Rules:      []rbacv1.PolicyRule{{Verbs: []string{"get"}, APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{cm}}},
		}
		binding := &rbacv1.RoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: metav1.NamespaceSystem},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name},
			Subjects:   subjects,
		}
		g.Go(func() error {
			return createOrUpdate(gctx, cs.RbacV1().Roles(metav1.NamespaceSystem), role, keepVersion)
		})
		g.Go(func() error {
			return createOrUpdate(gctx, cs.RbacV1().RoleBindings(metav1.NamespaceSystem), binding, keepVersion)
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	r.logf("  stored kube-system/kubeadm-config and kube-system/kubelet-config")
	return nil
}

// Control-plane node markings, as kubeadm's markcontrolplane phase.
const (
	ControlPlaneLabel = "node-role.kubernetes.io/control-plane"
	excludeLBLabel    = "node.kubernetes.io/exclude-from-external-load-balancers"
)

func runMarkControlPlane(ctx context.Context, r *Run) error {
	node := r.Manifest.Node
	if r.DryRun {
		r.logf("  would label node %s %s and taint it %s:NoSchedule", node, ControlPlaneLabel, ControlPlaneLabel)
		return nil
	}
	if err := r.waitAPI(ctx); err != nil {
		return err
	}
	cs, err := r.Client(superAdmin)
	if err != nil {
		return err
	}
	// The Node appears when this host's kubelet registers it.
	err = r.poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		taints := n.Spec.Taints
		has := false
		for _, t := range taints {
			if t.Key == ControlPlaneLabel && t.Effect == corev1.TaintEffectNoSchedule {
				has = true
			}
		}
		if !has {
			taints = append(taints, corev1.Taint{Key: ControlPlaneLabel, Effect: corev1.TaintEffectNoSchedule})
		}
		taintPatch, err := json.Marshal(map[string]any{
			"metadata": map[string]any{"labels": map[string]string{ControlPlaneLabel: "", excludeLBLabel: ""}, "resourceVersion": n.ResourceVersion},
			"spec":     map[string]any{"taints": taints},
		})
		if err != nil {
			return false, err
		}
		_, err = cs.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, taintPatch, metav1.PatchOptions{})
		return err == nil, err
	})
	if err != nil {
		return fmt.Errorf("marking node %s: %w", node, err)
	}
	r.logf("  node %s labelled and tainted", node)
	return nil
}

func runBootstrapToken(ctx context.Context, r *Run) error {
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	var join render.Join
	if err := json.Unmarshal(files[render.JoinFile], &join); err != nil {
		return fmt.Errorf("reading %s from the bundle: %w", render.JoinFile, err)
	}
	ttl, err := time.ParseDuration(join.TokenTTL)
	if err != nil {
		return fmt.Errorf("reading %s from the bundle: token TTL: %w", render.JoinFile, err)
	}
	if r.DryRun {
		r.logf("  would publish kube-public/cluster-info, node bootstrap RBAC and %d worker tokens valid for %v", len(join.Tokens), ttl)
		return nil
	}
	if err := r.waitAPI(ctx); err != nil {
		return err
	}
	cs, err := r.Client(superAdmin)
	if err != nil {
		return err
	}
	// cluster-info, the RBAC and the tokens do not depend on each other.
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return r.ensureClusterInfo(gctx, files) })
	g.Go(func() error { return EnsureNodeBootstrapRBAC(gctx, cs) })
	now := r.Now()
	for _, t := range join.Tokens {
		g.Go(func() error {
			return EnsureBootstrapToken(gctx, cs, render.Token{ID: t.ID, Secret: t.Secret}, t.Node, now, ttl)
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for _, t := range join.Tokens {
		// The token ID is public (it names the Secret); the secret half never appears.
		r.logf("  token %s for worker %s", t.ID, t.Node)
	}
	return nil
}

// ensureClusterInfo publishes the cluster's CA and endpoint in
// kube-public/cluster-info, readable anonymously, as kubeadm does; the
// bootstrap signer signs it for token-based discovery by other tools.
func (r *Run) ensureClusterInfo(ctx context.Context, files map[string][]byte) error {
	cs, err := r.Client(superAdmin)
	if err != nil {
		return err
	}
	admin, err := clientcmd.Load(files[render.KubernetesDir+"/admin.conf"])
	if err != nil {
		return fmt.Errorf("reading admin.conf from the bundle: %w", err)
	}
	var server string
	for _, c := range admin.Clusters {
		server = c.Server
	}
	info := clientcmdapi.NewConfig()
	info.Clusters[""] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: files[render.PKIDir+"/ca.crt"]}
	kubeconfig, err := clientcmd.Write(*info)
	if err != nil {
		return err
	}
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: bootstrapapi.ConfigMapClusterInfo, Namespace: metav1.NamespacePublic},
		Data:       map[string]string{bootstrapapi.KubeConfigKey: string(kubeconfig)},
	}
	// The controller-manager's bootstrap signer adds a signature per token
	// to cluster-info; keep them, so that a re-apply does not strip and
	// re-sign them (and leaves cluster-info untouched when nothing changed).
	keepSignatures := func(live, obj *corev1.ConfigMap) {
		obj.ResourceVersion = live.ResourceVersion
		for k, v := range live.Data {
			if strings.HasPrefix(k, bootstrapapi.JWSSignatureKeyPrefix) {
				obj.Data[k] = v
			}
		}
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return createOrUpdate(ctx, cs.CoreV1().ConfigMaps(metav1.NamespacePublic), cm, keepSignatures)
	})
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeadm:bootstrap-signer-clusterinfo", Namespace: metav1.NamespacePublic},
		Rules: []rbacv1.PolicyRule{{Verbs: []string{"get"}, APIGroups: []string{""}, Resources: []string{"configmaps"},
			ResourceNames: []string{bootstrapapi.ConfigMapClusterInfo}}},
	}
	binding := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name, Namespace: metav1.NamespacePublic},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, Name: "system:anonymous"}},
	}
	g.Go(func() error { return createOrUpdate(ctx, cs.RbacV1().Roles(metav1.NamespacePublic), role, keepVersion) })
	g.Go(func() error {
		return createOrUpdate(ctx, cs.RbacV1().RoleBindings(metav1.NamespacePublic), binding, keepVersion)
	})
	return g.Wait()
}
