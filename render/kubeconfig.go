package render

import (
	"fmt"
	"net"
	"strconv"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"airadm.dev/airadm/pki"
)

// BootstrapTokenUser is the user name kubeadm gives the token credential in
// bootstrap-kubelet.conf.
const BootstrapTokenUser = "tls-bootstrap-token-user"

// kubeconfigServer returns the server URL kubeadm puts in each kubeconfig:
// the control-plane endpoint for admin and super-admin, and the node's own
// apiserver for controller-manager, scheduler and, since kubeadm made
// ControlPlaneKubeletLocalMode the default, the control plane's kubelet.
func (c *Cluster) kubeconfigServer(file string, n Node) string {
	switch file {
	case "controller-manager.conf", "scheduler.conf", "kubelet.conf":
		return "https://" + net.JoinHostPort(n.Address.String(), strconv.Itoa(APIServerPort))
	}
	return "https://" + c.Endpoint()
}

// newKubeconfig follows kubeadm's kubeconfigutil.CreateBasic: one cluster,
// one user and a context named user@cluster.
func newKubeconfig(server, cluster, user string, caPEM []byte, auth *clientcmdapi.AuthInfo) ([]byte, error) {
	ctx := fmt.Sprintf("%s@%s", user, cluster)
	cfg := &clientcmdapi.Config{
		Clusters:       map[string]*clientcmdapi.Cluster{cluster: {Server: server, CertificateAuthorityData: caPEM}},
		Contexts:       map[string]*clientcmdapi.Context{ctx: {Cluster: cluster, AuthInfo: user}},
		AuthInfos:      map[string]*clientcmdapi.AuthInfo{user: auth},
		CurrentContext: ctx,
	}
	b, err := clientcmd.Write(*cfg)
	if err != nil {
		return nil, fmt.Errorf("encoding kubeconfig for %s: %w", user, err)
	}
	return b, nil
}

func (c *Cluster) certKubeconfig(file string, n Node, ca, client pki.Pair) ([]byte, error) {
	key, err := pki.EncodeKey(client.Key)
	if err != nil {
		return nil, err
	}
	return newKubeconfig(c.kubeconfigServer(file, n), c.Name, client.Cert.Subject.CommonName, pki.EncodeCert(ca.Cert),
		&clientcmdapi.AuthInfo{ClientCertificateData: pki.EncodeCert(client.Cert), ClientKeyData: key})
}

// BootstrapKubeconfig is a worker's bootstrap-kubelet.conf: the endpoint,
// the cluster CA and the node's bootstrap token, and nothing else.
func (c *Cluster) BootstrapKubeconfig(ca pki.Pair, t Token) ([]byte, error) {
	return newKubeconfig("https://"+c.Endpoint(), c.Name, BootstrapTokenUser, pki.EncodeCert(ca.Cert),
		&clientcmdapi.AuthInfo{Token: t.String()})
}
