// Package phases runs a bundle on its host: preflight, files, images,
// kubelet, and the post-start steps kubeadm performs through the API.
//
// This file holds the API objects kubeadm creates after the control plane
// starts, and an idempotent way to create them.
package phases

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	bootstrapapi "k8s.io/cluster-bootstrap/token/api"
	bootstraputil "k8s.io/cluster-bootstrap/token/util"

	"airadm.dev/airadm/render"
)

// Names kubeadm v1.37.2 gives its RBAC objects (cmd/kubeadm/app/constants).
const (
	NodeBootstrapTokenAuthGroup = "system:bootstrappers:kubeadm:default-node-token"
	ClusterAdminsGroup          = "kubeadm:cluster-admins"
	nodesGroup                  = "system:nodes"
)

// BootstrapTokenSecret is the Secret kubeadm's BootstrapTokenToSecret makes
// for a default `kubeadm token create`: authentication and signing usages and
// the default node group. expires is zero for a token that never expires.
func BootstrapTokenSecret(t render.Token, node string, expires time.Time) *corev1.Secret {
	data := map[string][]byte{
		bootstrapapi.BootstrapTokenIDKey:                          []byte(t.ID),
		bootstrapapi.BootstrapTokenSecretKey:                      []byte(t.Secret),
		bootstrapapi.BootstrapTokenDescriptionKey:                 []byte("airadm join token for node " + node),
		bootstrapapi.BootstrapTokenUsagePrefix + "authentication": []byte("true"),
		bootstrapapi.BootstrapTokenUsagePrefix + "signing":        []byte("true"),
		bootstrapapi.BootstrapTokenExtraGroupsKey:                 []byte(NodeBootstrapTokenAuthGroup),
	}
	if !expires.IsZero() {
		data[bootstrapapi.BootstrapTokenExpirationKey] = []byte(expires.UTC().Format(time.RFC3339))
	}
	return &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: bootstraputil.BootstrapTokenSecretName(t.ID), Namespace: metav1.NamespaceSystem},
		Type:       bootstrapapi.SecretTypeBootstrapToken,
		Data:       data,
	}
}

func clusterRoleBinding(name, role string, subject rbacv1.Subject) *rbacv1.ClusterRoleBinding {
	return &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
		Subjects:   []rbacv1.Subject{subject},
	}
}

func group(name string) rbacv1.Subject { return rbacv1.Subject{Kind: rbacv1.GroupKind, Name: name} }

// ClusterAdminsBinding lets admin.conf's group act as cluster-admin;
// kubeadm init creates it with super-admin.conf.
func ClusterAdminsBinding() *rbacv1.ClusterRoleBinding {
	return clusterRoleBinding(ClusterAdminsGroup, "cluster-admin", group(ClusterAdminsGroup))
}

// NodeBootstrapRBAC is kubeadm's node TLS-bootstrap RBAC
// (phases/bootstraptoken/node/tlsbootstrap.go): token holders may post CSRs
// that are approved automatically and read Nodes; nodes may renew their own
// client certificates; the apiserver may reach the kubelet API.
func NodeBootstrapRBAC() ([]*rbacv1.ClusterRole, []*rbacv1.ClusterRoleBinding) {
	roles := []*rbacv1.ClusterRole{{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeadm:get-nodes"},
		Rules:      []rbacv1.PolicyRule{{Verbs: []string{"get"}, APIGroups: []string{""}, Resources: []string{"nodes"}}},
	}}
	bindings := []*rbacv1.ClusterRoleBinding{
		clusterRoleBinding("kubeadm:kubelet-bootstrap", "system:node-bootstrapper", group(NodeBootstrapTokenAuthGroup)),
		clusterRoleBinding("kubeadm:get-nodes", "kubeadm:get-nodes", group(NodeBootstrapTokenAuthGroup)),
		clusterRoleBinding("kubeadm:node-autoapprove-bootstrap", "system:certificates.k8s.io:certificatesigningrequests:nodeclient", group(NodeBootstrapTokenAuthGroup)),
		clusterRoleBinding("kubeadm:node-autoapprove-certificate-rotation", "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient", group(nodesGroup)),
		clusterRoleBinding("kubeadm:apiserver-kubelet-client", "system:kubelet-api-admin", rbacv1.Subject{Kind: rbacv1.UserKind, Name: "kube-apiserver-kubelet-client"}),
	}
	return roles, bindings
}

// Retries of API calls while a fresh control plane settles: the first
// retry comes after 20 ms and the delay doubles up to 250 ms, so a call
// refused in the first moments after /readyz (a namespace the apiserver is
// still creating, say) is retried within milliseconds, not after a fixed
// step; retrySpan bounds every step.
const (
	retryFirst = 20 * time.Millisecond
	retryCap   = 250 * time.Millisecond
	retrySpan  = 2 * time.Minute
)

// backoff yields the delays before each retry: 20 ms doubling to a cap.
type backoff struct{ next, cap time.Duration }

func newBackoff(capped time.Duration) *backoff {
	return &backoff{next: min(retryFirst, capped), cap: capped}
}

// wait sleeps for the next delay, or until ctx ends.
func (b *backoff) wait(ctx context.Context) error {
	t := time.NewTimer(b.next)
	defer t.Stop()
	b.next = min(2*b.next, b.cap)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// retry runs f with backoff until it succeeds, the context ends or
// retrySpan has passed, and then reports the last error. A cancelled
// context is reported as such, with the last error beside it.
func retry(ctx context.Context, what string, f func(context.Context) error) error {
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, retrySpan)
	defer cancel()
	b := newBackoff(retryCap)
	for {
		last := f(ctx)
		if last == nil {
			return nil
		}
		if stop := (*stopRetry)(nil); errors.As(last, &stop) {
			return stop.err
		}
		if err := b.wait(ctx); err != nil {
			if parent.Err() != nil {
				return fmt.Errorf("%s: %w (last error: %v)", what, context.Cause(parent), last)
			}
			return fmt.Errorf("%s: gave up after %v: %w", what, retrySpan, last)
		}
	}
}

// object is what createOrUpdate needs of a typed client.
type object interface{ GetName() string }

type typedClient[T object] interface {
	Create(context.Context, T, metav1.CreateOptions) (T, error)
	Get(context.Context, string, metav1.GetOptions) (T, error)
	Update(context.Context, T, metav1.UpdateOptions) (T, error)
}

// createOrUpdate makes obj exist as given, with retries, like kubeadm's
// apiclient.CreateOrUpdate. setVersion copies the live resourceVersion.
func createOrUpdate[T object](ctx context.Context, c typedClient[T], obj T, setVersion func(live, obj T)) error {
	return retry(ctx, "creating "+obj.GetName(), func(ctx context.Context) error {
		_, err := c.Create(ctx, obj, metav1.CreateOptions{})
		if !apierrors.IsAlreadyExists(err) {
			return err
		}
		live, err := c.Get(ctx, obj.GetName(), metav1.GetOptions{})
		if err != nil {
			return err
		}
		setVersion(live, obj)
		_, err = c.Update(ctx, obj, metav1.UpdateOptions{})
		return err
	})
}

func keepVersion[T interface {
	GetResourceVersion() string
	SetResourceVersion(string)
}](live, obj T) {
	obj.SetResourceVersion(live.GetResourceVersion())
}

// EnsureClusterAdmins creates the kubeadm:cluster-admins binding.
func EnsureClusterAdmins(ctx context.Context, cs kubernetes.Interface) error {
	return createOrUpdate(ctx, cs.RbacV1().ClusterRoleBindings(), ClusterAdminsBinding(), keepVersion)
}

// EnsureNodeBootstrapRBAC creates NodeBootstrapRBAC, all at once: a
// binding may name a role that does not exist yet.
func EnsureNodeBootstrapRBAC(ctx context.Context, cs kubernetes.Interface) error {
	roles, bindings := NodeBootstrapRBAC()
	g, ctx := errgroup.WithContext(ctx)
	for _, r := range roles {
		g.Go(func() error { return createOrUpdate(ctx, cs.RbacV1().ClusterRoles(), r, keepVersion) })
	}
	for _, b := range bindings {
		g.Go(func() error { return createOrUpdate(ctx, cs.RbacV1().ClusterRoleBindings(), b, keepVersion) })
	}
	return g.Wait()
}

// EnsureBootstrapToken stores a worker's token Secret, expiring ttl after
// now (never, if ttl is zero). A Secret that already holds this token and is
// still valid is left exactly as it is: re-applying a control-plane bundle
// (to publish a new worker's token, say) must not move the other tokens'
// expiry or rewrite their Secrets. An expired one, or one whose content
// differs, is renewed, which is how a token is renewed on purpose.
func EnsureBootstrapToken(ctx context.Context, cs kubernetes.Interface, t render.Token, node string, now time.Time, ttl time.Duration) error {
	var expires time.Time
	if ttl > 0 {
		expires = now.Add(ttl)
	}
	s := BootstrapTokenSecret(t, node, expires)
	secrets := cs.CoreV1().Secrets(metav1.NamespaceSystem)
	err := retry(ctx, "creating "+s.Name, func(ctx context.Context) error {
		_, err := secrets.Create(ctx, s, metav1.CreateOptions{})
		if !apierrors.IsAlreadyExists(err) {
			return err
		}
		live, err := secrets.Get(ctx, s.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if liveTokenCurrent(live, s, now) {
			return nil
		}
		s.ResourceVersion = live.ResourceVersion
		_, err = secrets.Update(ctx, s, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		// The secret's name holds only the public token ID.
		return fmt.Errorf("storing bootstrap token for %s: %w", node, err)
	}
	return nil
}

// liveTokenCurrent reports whether the live token Secret is the one want
// describes, apart from its expiry, and has not expired (or, like want,
// never expires).
func liveTokenCurrent(live, want *corev1.Secret, now time.Time) bool {
	if live.Type != want.Type || len(live.Data) != len(want.Data) {
		return false
	}
	for k, v := range want.Data {
		lv, ok := live.Data[k]
		if !ok {
			return false
		}
		if k != bootstrapapi.BootstrapTokenExpirationKey && string(lv) != string(v) {
			return false
		}
	}
	exp, ok := live.Data[bootstrapapi.BootstrapTokenExpirationKey]
	if !ok {
		return true // never expires, as wanted (the lengths matched)
	}
	t, err := time.Parse(time.RFC3339, string(exp))
	return err == nil && t.After(now)
}
