package phases

import (
	"cmp"
	"context"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/render"
)

// fieldManager owns what airadm applies, so later applies by airadm (or a
// re-run) update those fields and leave others' alone. The config's extra
// manifests have a manager of their own: a user's partial override of a
// kubeadm addon (only a Deployment's replicas, say) then adds to kubeadm's
// fields instead of replacing the whole set airadm owns, which would strip
// the containers and be refused.
const (
	fieldManager      = "airadm"
	extraFieldManager = "airadm-addons"
)

// addonFile is one file of the addons phase with the manager that applies it.
type addonFile struct {
	path, manager string
}

// addonFiles lists the addon files of a bundle in the order they must be
// applied: kubeadm's CoreDNS and kube-proxy first, then the config's extra
// manifests in the config's order, so that a user's override of a kubeadm
// addon is applied last and wins.
func addonFiles(files map[string][]byte) []addonFile {
	var out []addonFile
	if _, ok := files[render.AddonsFile]; ok {
		out = append(out, addonFile{render.AddonsFile, fieldManager})
	}
	var extra []string
	for p := range files {
		if strings.HasPrefix(p, render.ExtraAddonsDir+"/") {
			extra = append(extra, p)
		}
	}
	// render names them "<index>-<base name>"; the index is compared as a
	// number, so that entry 100 comes after entry 99.
	index := func(p string) int {
		n, _, _ := strings.Cut(path.Base(p), "-")
		i, err := strconv.Atoi(n)
		if err != nil {
			return -1
		}
		return i
	}
	slices.SortFunc(extra, func(a, b string) int {
		return cmp.Or(cmp.Compare(index(a), index(b)), strings.Compare(a, b))
	})
	for _, p := range extra {
		out = append(out, addonFile{p, extraFieldManager})
	}
	return out
}

// addonObject is one document to apply, with its field manager.
type addonObject struct {
	*unstructured.Unstructured
	manager string
}

// runAddons server-side applies kubeadm's CoreDNS and kube-proxy, then the
// config's extra manifests in their order.
func runAddons(ctx context.Context, r *Run) error {
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	var objs []addonObject
	for _, f := range addonFiles(files) {
		name := f.path
		for i, doc := range render.SplitYAML(files[name]) {
			var m map[string]any
			if err := yaml.Unmarshal(doc, &m); err != nil {
				return fmt.Errorf("%s document %d: %w", name, i+1, err)
			}
			objs = append(objs, addonObject{&unstructured.Unstructured{Object: m}, f.manager})
		}
	}
	if r.DryRun {
		for _, o := range objs {
			r.logf("  would apply %s %s", o.GetKind(), qualified(o.Unstructured))
		}
		return nil
	}
	if err := r.waitAPI(ctx); err != nil {
		return err
	}
	b := files[superAdmin]
	cfg, err := clientcmd.RESTConfigFromKubeConfig(b)
	if err != nil {
		return fmt.Errorf("loading %s: %w", superAdmin, err)
	}
	apiRateLimits(cfg)
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	cs, err := r.Client(superAdmin)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(cs.Discovery()))
	var mapMu sync.Mutex // the deferred mapper's Reset is not safe beside lookups
	apply := func(ctx context.Context, o addonObject) error {
		return retry(ctx, "applying "+o.GetKind()+" "+qualified(o.Unstructured), func(ctx context.Context) error {
			gvk := o.GroupVersionKind()
			mapping, ok := builtinMapping(gvk)
			if !ok {
				// Only the config's extra manifests bring other kinds;
				// discovery is asked for them alone.
				mapMu.Lock()
				m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
				if err != nil {
					mapper.Reset() // a CRD applied just before may be new to discovery
				}
				mapMu.Unlock()
				if err != nil {
					return err
				}
				mapping = m
			}
			data, err := o.MarshalJSON()
			if err != nil {
				return err
			}
			var ri dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
			if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
				ns := o.GetNamespace()
				if ns == "" {
					ns = metav1.NamespaceDefault
				}
				ri = dyn.Resource(mapping.Resource).Namespace(ns)
			}
			_, err = ri.Patch(ctx, o.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{FieldManager: o.manager, Force: ptr.To(true)})
			return err
		})
	}
	// kubeadm's own objects depend on none of each other (a server-side
	// apply needs no referenced object to exist), so they go at once; the
	// extra manifests follow one by one in the config's order, so that a
	// CRD comes before its resources and a user's override comes last.
	var own, extra []addonObject
	for _, o := range objs {
		if o.manager == fieldManager {
			own = append(own, o)
		} else {
			extra = append(extra, o)
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, o := range own {
		g.Go(func() error { return apply(gctx, o) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for _, o := range extra {
		if err := apply(ctx, o); err != nil {
			return err
		}
	}
	r.logf("  applied %d objects", len(objs))
	return nil
}

// builtinMapping maps the kinds of kubeadm's addons without asking
// discovery, which costs round trips on an apiserver that has just started.
func builtinMapping(gvk schema.GroupVersionKind) (*meta.RESTMapping, bool) {
	type res struct {
		resource   string
		namespaced bool
	}
	known := map[schema.GroupVersionKind]res{
		{Version: "v1", Kind: "ConfigMap"}:                                              {"configmaps", true},
		{Version: "v1", Kind: "ServiceAccount"}:                                         {"serviceaccounts", true},
		{Version: "v1", Kind: "Service"}:                                                {"services", true},
		{Version: "v1", Kind: "Secret"}:                                                 {"secrets", true},
		{Version: "v1", Kind: "Namespace"}:                                              {"namespaces", false},
		{Group: "apps", Version: "v1", Kind: "Deployment"}:                              {"deployments", true},
		{Group: "apps", Version: "v1", Kind: "DaemonSet"}:                               {"daemonsets", true},
		{Group: "policy", Version: "v1", Kind: "PodDisruptionBudget"}:                   {"poddisruptionbudgets", true},
		{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "ClusterRole"}:        {"clusterroles", false},
		{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "ClusterRoleBinding"}: {"clusterrolebindings", false},
		{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "Role"}:               {"roles", true},
		{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "RoleBinding"}:        {"rolebindings", true},
	}
	k, ok := known[gvk]
	if !ok {
		return nil, false
	}
	scope := meta.RESTScopeRoot
	if k.namespaced {
		scope = meta.RESTScopeNamespace
	}
	return &meta.RESTMapping{Resource: gvk.GroupVersion().WithResource(k.resource), GroupVersionKind: gvk, Scope: scope}, true
}

func qualified(o *unstructured.Unstructured) string {
	if o.GetNamespace() != "" {
		return o.GetNamespace() + "/" + o.GetName()
	}
	return o.GetName()
}
