package phases

import (
	"context"
	"crypto"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	watchtools "k8s.io/client-go/tools/watch"
	certutil "k8s.io/client-go/util/cert"
	"k8s.io/client-go/util/certificate"
	"k8s.io/client-go/util/certificate/csr"
	"k8s.io/client-go/util/keyutil"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

// KubeletPKIDir is kubelet's default --cert-dir, where it keeps its
// client certificate pairs.
const KubeletPKIDir = render.KubeletDir + "/pki"

// ErrControlPlaneUnreachable means BootstrapKubelet could not reach the
// apiserver at all; the kubelet then does its own TLS bootstrap once it
// can, as it would after `kubeadm join`.
var ErrControlPlaneUnreachable = errors.New("the control plane is not reachable")

// errTokenRejected is what a 401 to the bootstrap token means.
var errTokenRejected = errors.New("the control plane rejects this node's bootstrap token: it has expired (join.token_ttl counts from the control plane's bootstrap-token phase) or was never published. If this node was added to cluster.toml after the control plane was set up: run `airadm build` (it rebuilds the control-plane bundles with this node's token), apply the rebuilt control-plane bundle on a control plane, then apply this node's bundle again. If the token expired: run `airadm apply phase bootstrap-token <control-plane>.bundle` on a control plane, then run this again")

// BootstrapKubelet does the kubelet's TLS bootstrap before the kubelet
// starts, the way the kubelet itself would (pkg/kubelet/certificate/
// bootstrap): a P-256 key made on this host, a CSR for
// system:node:<node> in system:nodes to the kube-apiserver-client-kubelet
// signer, posted with the token from bootstrap-kubelet.conf and approved
// by the controller-manager as for the kubelet; then the pair in
// /var/lib/kubelet/pki/kubelet-client-<time>.pem behind the
// kubelet-client-current.pem symlink, and kubelet.conf pointing at it, as
// kubelet leaves them after `kubeadm join`. So the kubelet starts with a
// working credential: it registers its Node and watches it from its first
// moment, and rotates the certificate itself later (rotateCertificates).
//
// It does nothing, and says so, if kubelet.conf already holds a valid
// credential or there is no bootstrap-kubelet.conf. Paths are under root.
func BootstrapKubelet(ctx context.Context, root, node string, timeout time.Duration) (issued bool, err error) {
	kubeconfig := hostfs.Path(root, render.KubeletKubeconfig)
	if kubeconfigValid(root, kubeconfig) {
		return false, nil
	}
	bootPath := hostfs.Path(root, render.BootstrapKubeconfig)
	if _, err := os.Stat(bootPath); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	bootCfg, err := clientcmd.BuildConfigFromFlags("", bootPath)
	if err != nil {
		return false, fmt.Errorf("loading %s: %w", render.BootstrapKubeconfig, err)
	}
	c := requestClientCert(ctx, bootCfg, node, timeout)
	if c.err != nil {
		return false, c.err
	}
	return true, c.write(root)
}

// clientCert is the kubelet's client certificate pair as the cluster
// issued it, with the bootstrap kubeconfig it was requested through (its
// cluster goes into kubelet.conf), or why there is none.
type clientCert struct {
	boot            *rest.Config
	certPEM, keyPEM []byte
	err             error
}

// requestClientCert asks the cluster for the kubelet's client certificate
// with the bootstrap token, as the kubelet's own bootstrap does, and
// waits (up to timeout) until it is issued. It writes nothing.
func requestClientCert(ctx context.Context, bootCfg *rest.Config, node string, timeout time.Duration) clientCert {
	fail := func(err error) clientCert { return clientCert{err: err} }
	bootCfg = rest.CopyConfig(bootCfg)
	bootCfg.Timeout = 10 * time.Second
	client, err := kubernetes.NewForConfig(bootCfg)
	if err != nil {
		return fail(fmt.Errorf("loading %s: %w", render.BootstrapKubeconfig, err))
	}

	// One round trip tells a rejected token (fail now, saying how to renew
	// it) and an apiserver that does not answer (leave the bootstrap to the
	// kubelet) from a cluster that will take the request.
	if _, err := client.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{}); err != nil {
		var status apierrors.APIStatus
		switch {
		case apierrors.IsUnauthorized(err):
			return fail(errTokenRejected)
		case !errors.As(err, &status):
			return fail(fmt.Errorf("%w: %w", ErrControlPlaneUnreachable, err))
		}
	}

	keyPEM, err := keyutil.MakeEllipticPrivateKeyPEM()
	if err != nil {
		return fail(fmt.Errorf("making the kubelet's client key: %w", err))
	}
	key, err := keyutil.ParsePrivateKeyPEM(keyPEM)
	if err != nil {
		return fail(fmt.Errorf("making the kubelet's client key: %w", err))
	}
	subject := &pkix.Name{CommonName: "system:node:" + node, Organization: []string{nodesGroup}}
	csrPEM, err := certutil.MakeCSR(key, subject, nil, nil)
	if err != nil {
		return fail(fmt.Errorf("making the kubelet's certificate request: %w", err))
	}
	// The usages kubelet asks for with an ECDSA key.
	usages := []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageClientAuth}
	name, err := csrName(key.(crypto.Signer).Public(), subject, usages)
	if err != nil {
		return fail(err)
	}

	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var reqName, reqUID string
	err = retry(ctx, "requesting the kubelet's client certificate", func(ctx context.Context) error {
		n, uid, err := csr.RequestCertificateWithContext(ctx, client, csrPEM, name, certificatesv1.KubeAPIServerClientKubeletSignerName, nil, usages, key)
		if apierrors.IsUnauthorized(err) {
			return &stopRetry{errTokenRejected}
		}
		reqName, reqUID = n, string(uid)
		return err
	})
	if err != nil {
		return fail(err)
	}
	// csr.WaitForCertificate watches the request until it is issued.
	certPEM, err := csr.WaitForCertificate(ctx, client, reqName, types.UID(reqUID))
	if err != nil {
		return fail(fmt.Errorf("waiting for the kubelet's client certificate (CSR %s): %w", reqName, err))
	}
	return clientCert{boot: bootCfg, certPEM: certPEM, keyPEM: keyPEM}
}

// write stores the pair where the kubelet keeps it and points kubelet.conf
// at it.
func (c clientCert) write(root string) error {
	store, err := certificate.NewFileStore("kubelet-client", hostfs.Path(root, KubeletPKIDir), hostfs.Path(root, KubeletPKIDir), "", "")
	if err != nil {
		return fmt.Errorf("storing the kubelet's client certificate: %w", err)
	}
	if _, err := store.Update(c.certPEM, c.keyPEM); err != nil {
		return fmt.Errorf("storing the kubelet's client certificate: %w", err)
	}
	// kubelet.conf as kubelet writes it after its bootstrap: the bootstrap
	// kubeconfig's cluster, and the current pair for both certificate and
	// key, named by its path on the host.
	current := path.Join(KubeletPKIDir, "kubelet-client-current.pem")
	kc := clientcmdapi.Config{
		Clusters: map[string]*clientcmdapi.Cluster{"default-cluster": {
			Server: c.boot.Host, InsecureSkipTLSVerify: c.boot.Insecure,
			CertificateAuthority: c.boot.CAFile, CertificateAuthorityData: caDataUnlessFile(c.boot),
		}},
		AuthInfos: map[string]*clientcmdapi.AuthInfo{"default-auth": {ClientCertificate: current, ClientKey: current}},
		Contexts: map[string]*clientcmdapi.Context{"default-context": {
			Cluster: "default-cluster", AuthInfo: "default-auth", Namespace: "default",
		}},
		CurrentContext: "default-context",
	}
	b, err := clientcmd.Write(kc)
	if err != nil {
		return fmt.Errorf("writing %s: %w", render.KubeletKubeconfig, err)
	}
	if err := atomicfile.Write(hostfs.Path(root, render.KubeletKubeconfig), b, 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", render.KubeletKubeconfig, err)
	}
	return nil
}

func caDataUnlessFile(c *rest.Config) []byte {
	if c.CAFile != "" {
		return nil
	}
	return c.CAData
}

// stopRetry ends a retry at once: retrying cannot help.
type stopRetry struct{ err error }

func (s *stopRetry) Error() string { return s.err.Error() }

// csrName is kubelet's digestedName: the same key, subject and usages
// give the same CSR name, so a repeated request finds the first.
func csrName(pub crypto.PublicKey, subject *pkix.Name, usages []certificatesv1.KeyUsage) (string, error) {
	hash := sha512.New512_256()
	encode := base64.RawURLEncoding.EncodeToString
	write := func(data []byte) {
		hash.Write([]byte(encode(data)))
		hash.Write([]byte{'|'})
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	write(der)
	write([]byte(subject.CommonName))
	for _, o := range subject.Organization {
		write([]byte(o))
	}
	for _, u := range usages {
		write([]byte(u))
	}
	return "node-csr-" + encode(hash.Sum(nil)), nil
}

// kubeconfigValid is kubelet's own test for skipping its bootstrap: the
// kubeconfig loads and its client certificate has not expired.
func kubeconfigValid(root, kubeconfig string) bool {
	cfg, err := kubeletRESTConfig(root, kubeconfig)
	if err != nil {
		return false
	}
	certs, err := certutil.ParseCertsPEM(cfg.CertData)
	if err != nil || len(certs) == 0 {
		return false
	}
	now := time.Now()
	for _, c := range certs {
		if now.After(c.NotAfter) {
			return false
		}
	}
	return true
}

// kubeletRESTConfig loads kubelet.conf, reading the certificate and key it
// names (host paths) under root, inline.
func kubeletRESTConfig(root, kubeconfig string) (*rest.Config, error) {
	cfg, err := clientcmd.LoadFromFile(kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", render.KubeletKubeconfig, err)
	}
	for _, a := range cfg.AuthInfos {
		for _, f := range []struct {
			file *string
			data *[]byte
		}{{&a.ClientCertificate, &a.ClientCertificateData}, {&a.ClientKey, &a.ClientKeyData}} {
			if *f.file == "" {
				continue
			}
			p := *f.file
			if filepath.IsAbs(p) && root != "/" && root != "" && !isUnder(p, root) {
				p = hostfs.Path(root, p)
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return nil, fmt.Errorf("loading %s: %w", render.KubeletKubeconfig, err)
			}
			*f.data, *f.file = b, ""
		}
	}
	rc, err := clientcmd.NewDefaultClientConfig(*cfg, nil).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", render.KubeletKubeconfig, err)
	}
	return rc, nil
}

func isUnder(p, root string) bool {
	rel, err := filepath.Rel(root, p)
	return err == nil && rel != ".." && !filepath.IsAbs(rel) && (len(rel) < 3 || rel[:3] != "../")
}

// waitNodeRegistered watches for Node name, through the kubelet's own
// credential, until it exists.
func waitNodeRegistered(ctx context.Context, cs kubernetes.Interface, name string) error {
	sel := fields.OneTermEqualSelector("metadata.name", name).String()
	lw := &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = sel
			return cs.CoreV1().Nodes().List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = sel
			return cs.CoreV1().Nodes().Watch(ctx, o)
		},
	}
	_, err := watchtools.UntilWithSync(ctx, lw, &corev1.Node{}, func(store cache.Store) (bool, error) {
		_, ok, err := store.GetByKey(name)
		return ok, err
	}, func(ev watch.Event) (bool, error) {
		return ev.Type == watch.Added || ev.Type == watch.Modified, nil
	})
	return err
}

// earlyCert is a worker's kubelet client certificate requested while the
// rest of its bundle is still being verified: the CSR round trip (the
// controller-manager approves and signs it) then overlaps the reading of
// the bundle instead of delaying the kubelet's start. It is started only
// from bytes already authentic (the manifest digest vouched for, the
// entry verified against it), writes nothing, and its result is used by
// the kubelet phase, or dropped with the run.
type earlyCert struct {
	started time.Time
	done    chan struct{}
	cancel  context.CancelFunc
	cert    clientCert
}

// startEarlyCert starts the request with the bootstrap kubeconfig's bytes;
// nil if they do not load (the kubelet phase then loads the file and says
// what is wrong with it).
func startEarlyCert(ctx context.Context, bootKubeconfig []byte, node string, timeout time.Duration) *earlyCert {
	cfg, err := clientcmd.RESTConfigFromKubeConfig(bootKubeconfig)
	if err != nil {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	e := &earlyCert{started: time.Now(), done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(e.done)
		e.cert = requestClientCert(ctx, cfg, node, timeout)
	}()
	return e
}

// result waits for the request's outcome.
func (e *earlyCert) result(ctx context.Context) clientCert {
	select {
	case <-e.done:
		return e.cert
	case <-ctx.Done():
		return clientCert{err: fmt.Errorf("waiting for the kubelet's client certificate: %w", context.Cause(ctx))}
	}
}

// stop ends a request the run no longer needs; nil-safe.
func (e *earlyCert) stop() {
	if e != nil {
		e.cancel()
		<-e.done
	}
}
