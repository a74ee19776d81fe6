package phases

import (
	"context"
	"fmt"
	"sort"
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
// re-run) update those fields and leave others' alone.
const fieldManager = "airadm"

// runAddons server-side applies kubeadm's CoreDNS and kube-proxy, then the
// config's extra manifests in their order.
func runAddons(ctx context.Context, r *Run) error {
	files, err := r.readFiles()
	if err != nil {
		return err
	}
	var names []string
	for p := range files {
		if p == render.AddonsFile || strings.HasPrefix(p, render.ExtraAddonsDir+"/") {
			names = append(names, p)
		}
	}
	sort.Strings(names) // kubeadm.yaml before extra/
	var objs []*unstructured.Unstructured
	for _, name := range names {
		for i, doc := range render.SplitYAML(files[name]) {
			var m map[string]any
			if err := yaml.Unmarshal(doc, &m); err != nil {
				return fmt.Errorf("%s document %d: %w", name, i+1, err)
			}
			objs = append(objs, &unstructured.Unstructured{Object: m})
		}
	}
	if r.DryRun {
		for _, o := range objs {
			r.logf("  would apply %s %s", o.GetKind(), qualified(o))
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
		err := retry(ctx, "applying "+o.GetKind()+" "+qualified(o), func(ctx context.Context) error {
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
			_, err = ri.Patch(ctx, o.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{FieldManager: fieldManager, Force: ptr.To(true)})
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
