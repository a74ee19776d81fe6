package phases

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/render"
)

// KubeletClientCert is where kubelet keeps the client certificate the
// cluster issued it.
const KubeletClientCert = render.KubeletDir + "/pki/kubelet-client-current.pem"

// runTLSBootstrap waits until the kubelet holds an issued client certificate
// and its Node exists, then removes bootstrap-kubelet.conf: the token has
// done its work and should not stay on disk.
func runTLSBootstrap(ctx context.Context, r *Run) error {
	node := r.Manifest.Node
	if r.DryRun {
		r.logf("  would wait up to %v for %s and Node %s, then remove %s", r.Timeout, KubeletClientCert, node, render.BootstrapKubeconfig)
		return nil
	}
	boot := r.path(render.BootstrapKubeconfig)
	kubeconfig := r.path(render.KubeletKubeconfig)
	start := time.Now()
	if !kubeconfigValid(r.Root, kubeconfig) {
		// The kubelet phase did not issue the credential (it was skipped,
		// or ran an older airadm): the kubelet does its own TLS bootstrap.
		if _, err := os.Stat(boot); err == nil {
			// Fail fast on a token the cluster will not accept, instead of
			// waiting out the timeout while kubelet retries.
			if err := checkToken(ctx, boot); err != nil {
				return err
			}
		}
		err := r.poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
			if !kubeconfigValid(r.Root, kubeconfig) {
				return false, fmt.Errorf("no client certificate yet at %s", KubeletClientCert)
			}
			return true, nil
		})
		if err != nil {
			return fmt.Errorf("joining as %s: %w", node, err)
		}
	}
	cfg, err := kubeletRESTConfig(r.Root, kubeconfig)
	if err != nil {
		return err
	}
	cfg.Timeout = 10 * time.Second
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	// The kubelet registers its Node; watch for it with its credential.
	wctx, cancel := context.WithTimeout(ctx, r.Timeout)
	defer cancel()
	if err := waitNodeRegistered(wctx, cs, node); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("joining as %s: waiting for its Node: %w", node, context.Cause(ctx))
		}
		return fmt.Errorf("joining as %s: no Node registered after %v: %w", node, r.Timeout, err)
	}
	r.logf("  node %s registered after %v", node, time.Since(start).Round(time.Millisecond))
	if err := os.Remove(boot); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", render.BootstrapKubeconfig, err)
	}
	return nil
}

func kubeletClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", render.KubeletKubeconfig, err)
	}
	cfg.Timeout = 10 * time.Second
	return kubernetes.NewForConfig(cfg)
}

// checkToken asks the apiserver who the bootstrap token is. A 401 means it
// expired, was never created, or belongs to another cluster.
func checkToken(ctx context.Context, bootstrapKubeconfig string) error {
	cs, err := kubeletClient(bootstrapKubeconfig)
	if err != nil {
		return err
	}
	var last error
	b := newBackoff(time.Second)
	for i := 0; i < 10; i++ { // about 4 s in all
		_, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
		if err == nil {
			return nil
		}
		if apierrors.IsUnauthorized(err) {
			return errTokenRejected
		}
		last = err
		if err := b.wait(ctx); err != nil {
			return fmt.Errorf("checking the bootstrap token: %w (last error: %v)", context.Cause(ctx), last)
		}
	}
	return fmt.Errorf("checking the bootstrap token: %w", last)
}
