package render

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"math/big"
	"net"
	"net/netip"

	"airadm.dev/airadm/pki"
)

// CA names one of the cluster's three certificate authorities by kubeadm's
// base file name under /etc/kubernetes/pki.
type CA string

const (
	ClusterCA    CA = "ca"
	FrontProxyCA CA = "front-proxy-ca"
	EtcdCA       CA = "etcd/ca"
)

// CAs lists the authorities with their subjects, as kubeadm's certlist.go.
func CAs() []struct {
	CA         CA
	CommonName string
} {
	return []struct {
		CA         CA
		CommonName string
	}{
		{ClusterCA, "kubernetes"},
		{FrontProxyCA, "front-proxy-ca"},
		{EtcdCA, "etcd-ca"},
	}
}

// Leaf is one certificate a node needs, signed by CA.
type Leaf struct {
	// Name keys the leaf in the secrets store and the file set: a base name
	// under /etc/kubernetes/pki such as "apiserver" or "etcd/peer", or
	// "kubeconfig/<file>" for a client certificate embedded in a kubeconfig.
	Name string
	CA   CA
	Spec pki.Spec
	// FromCANotBefore marks the kubeconfig client certificates: kubeadm
	// leaves their NotBefore unset, so it is inherited from the CA.
	FromCANotBefore bool
}

// Leaves is kubeadm's `certs all` plus `kubeconfig all` for node n. Workers
// get none: they obtain their client certificate through TLS bootstrap.
func (c *Cluster) Leaves(n Node) []Leaf {
	if n.Role != ControlPlane {
		return nil
	}
	serverClient := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	client := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	etcdDNS := []string{n.Name, "localhost"}
	etcdIPs := []net.IP{ip(n.Address), net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	kubeconfig := func(file, cn string, org ...string) Leaf {
		return Leaf{Name: "kubeconfig/" + file, CA: ClusterCA, FromCANotBefore: true,
			Spec: pki.Spec{CommonName: cn, Organization: org, Usages: client}}
	}
	return []Leaf{
		{Name: "apiserver", CA: ClusterCA, Spec: c.apiServerSpec(n)},
		{Name: "apiserver-kubelet-client", CA: ClusterCA, Spec: pki.Spec{CommonName: "kube-apiserver-kubelet-client", Usages: client}},
		{Name: "front-proxy-client", CA: FrontProxyCA, Spec: pki.Spec{CommonName: "front-proxy-client", Usages: client}},
		{Name: "etcd/server", CA: EtcdCA, Spec: pki.Spec{CommonName: n.Name, DNSNames: etcdDNS, IPs: etcdIPs, Usages: serverClient}},
		{Name: "etcd/peer", CA: EtcdCA, Spec: pki.Spec{CommonName: n.Name, DNSNames: etcdDNS, IPs: etcdIPs, Usages: serverClient}},
		{Name: "etcd/healthcheck-client", CA: EtcdCA, Spec: pki.Spec{CommonName: "kube-etcd-healthcheck-client", Usages: client}},
		{Name: "apiserver-etcd-client", CA: EtcdCA, Spec: pki.Spec{CommonName: "kube-apiserver-etcd-client", Usages: client}},
		kubeconfig("admin.conf", "kubernetes-admin", "kubeadm:cluster-admins"),
		kubeconfig("super-admin.conf", "kubernetes-super-admin", "system:masters"),
		kubeconfig("controller-manager.conf", "system:kube-controller-manager"),
		kubeconfig("scheduler.conf", "system:kube-scheduler"),
		kubeconfig("kubelet.conf", "system:node:"+n.Name, "system:nodes"),
	}
}

// apiServerSpec follows pkiutil.GetAPIServerAltNames.
func (c *Cluster) apiServerSpec(n Node) pki.Spec {
	s := pki.Spec{
		CommonName: "kube-apiserver",
		DNSNames:   []string{n.Name, "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc." + c.DNSDomain},
		IPs:        []net.IP{ip(c.APIServerServiceIP()), ip(n.Address)},
		Usages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if a, err := netip.ParseAddr(c.EndpointHost); err == nil {
		s.IPs = append(s.IPs, ip(a))
	} else {
		s.DNSNames = append(s.DNSNames, c.EndpointHost)
	}
	for _, san := range c.ExtraSANs {
		if a, err := netip.ParseAddr(san); err == nil {
			s.IPs = append(s.IPs, ip(a))
		} else {
			s.DNSNames = append(s.DNSNames, san)
		}
	}
	return s
}

// APIServerServiceIP is the first address of the service subnet: the
// ClusterIP of the kubernetes Service.
func (c *Cluster) APIServerServiceIP() netip.Addr { return nthIP(c.ServiceSubnet, 1) }

// DNSServiceIP is the tenth address of the service subnet, where kubeadm puts
// the kube-dns Service.
func (c *Cluster) DNSServiceIP() netip.Addr { return nthIP(c.ServiceSubnet, 10) }

func nthIP(p netip.Prefix, n int64) netip.Addr {
	if !p.IsValid() {
		return netip.Addr{}
	}
	b := new(big.Int).SetBytes(p.Addr().AsSlice())
	b.Add(b, big.NewInt(n))
	raw := b.FillBytes(make([]byte, p.Addr().BitLen()/8))
	a, _ := netip.AddrFromSlice(raw)
	return a
}

// ip converts to net.IP with IPv4 in its 4-byte form, as x509 encodes it.
func ip(a netip.Addr) net.IP {
	return net.IP(a.Unmap().AsSlice())
}

// Token is a bootstrap token (https://kubernetes.io/docs/reference/access-authn-authz/bootstrap-tokens/).
type Token struct {
	ID     string
	Secret string
}

// String is the token as a bearer credential, "id.secret".
func (t Token) String() string { return t.ID + "." + t.Secret }

// Secrets is every secret a cluster's file sets are rendered from. The
// secrets package creates and stores it; render only reads it.
type Secrets struct {
	CAs map[CA]pki.Pair
	// ServiceAccountKey signs service-account tokens (sa.key / sa.pub).
	ServiceAccountKey crypto.Signer
	// Leaves holds each control-plane node's issued leaves by Leaf.Name.
	Leaves map[string]map[string]pki.Pair
	// Tokens holds each worker's bootstrap token.
	Tokens map[string]Token
}

func (s *Secrets) leaf(node, name string) (pki.Pair, error) {
	p, ok := s.Leaves[node][name]
	if !ok {
		return pki.Pair{}, fmt.Errorf("no %s certificate issued for node %s", name, node)
	}
	return p, nil
}
