package phases

import (
	"cmp"
	"context"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
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
	b := files[superAdmin]
	cfg, err := clientcmd.RESTConfigFromKubeConfig(b)
	if err != nil {
		return fmt.Errorf("loading %s: %w", superAdmin, err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	cs, err := r.Client(superAdmin)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(cs.Discovery()))
	for _, o := range objs {
		err := retry(ctx, "applying "+o.GetKind()+" "+qualified(o.Unstructured), func(ctx context.Context) error {
			gvk := o.GroupVersionKind()
			mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				mapper.Reset() // a CRD applied just before may be new to discovery
				return err
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
		if err != nil {
			return err
		}
	}
	r.logf("  applied %d objects", len(objs))
	return nil
}

func qualified(o *unstructured.Unstructured) string {
	if o.GetNamespace() != "" {
		return o.GetNamespace() + "/" + o.GetName()
	}
	return o.GetName()
}
