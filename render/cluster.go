package render

import (
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"k8s.io/apimachinery/pkg/util/validation"

	"airadm.dev/airadm/pki"
)

// Role is what a node does in the cluster.
type Role string

const (
	ControlPlane Role = "control-plane"
	Worker       Role = "worker"
)

// Cluster is a validated cluster.toml with every default filled in.
type Cluster struct {
	Name              string
	KubernetesVersion string
	// Endpoint is host:port of the API as every client sees it.
	EndpointHost  string
	EndpointPort  int
	PodSubnet     netip.Prefix // invalid (zero) when unset, as kubeadm allows
	ServiceSubnet netip.Prefix
	DNSDomain     string
	Algorithm     pki.Algorithm
	CertValidity  time.Duration
	CAValidity    time.Duration
	// RenewBefore is how close to its expiry a build reissues a leaf
	// certificate or kubeconfig client certificate.
	RenewBefore time.Duration
	ExtraSANs   []string
	Repository  string
	ExtraImages []string
	Platform    string // os/arch[/variant] of every image, default linux/amd64
	// ImageLayout, if set, is an OCI layout directory (relative to the
	// config file) that serves every image instead of registries.
	ImageLayout  string
	TokenTTL     time.Duration // 0 means the tokens never expire, as in kubeadm
	CgroupDriver string
	CRISocket    string
	// KubeletOverrides is [kubelet.config], validated against the type.
	KubeletOverrides map[string]any
	Nodes            []Node
	// AddonManifests are the extra manifests, read by Load.
	AddonManifests []Manifest
	// StaticPods are the extra static pods, read by Load and named
	// <metadata.name>.yaml.
	StaticPods []Manifest
	// HostFiles and HostArchives are [host]: binaries the bundles carry,
	// fetched and unpacked at build time (package bundle).
	HostFiles    []HostFile
	HostArchives []HostArchive
	// ContainerdOverrides is [containerd.config], checked against
	// containerd's default config.
	ContainerdOverrides map[string]any
	addonPaths          []string
	staticPodPaths      []string
}

// Node is one host of the cluster.
type Node struct {
	Name    string
	Role    Role
	Address netip.Addr
	// KubeletOverrides is the node's kubelet_config.
	KubeletOverrides map[string]any
	// Prefix (default 24 for IPv4, 64 for IPv6), Gateway (invalid when
	// unset), Nameservers and Interface (a name, glob or MAC address; empty
	// for the first ethernet interface) set up the node's network on first
	// boot; only install media use them.
	Prefix      int
	Gateway     netip.Addr
	Nameservers []netip.Addr
	Interface   string
	// Recipient is the canonical form of the node's recipient (an age
	// X25519 recipient, or an SSH ed25519 key without comment); empty
	// means its secrets travel in the clear.
	Recipient string
}

// Defaults of kubeadm v1.37.2 (cmd/kubeadm/app/apis/kubeadm/v1beta4/defaults.go
// and constants.go).
const (
	DefaultClusterName   = "kubernetes"
	DefaultServiceSubnet = "10.96.0.0/12"
	DefaultDNSDomain     = "cluster.local"
	DefaultRepository    = "registry.k8s.io"
	DefaultCertValidity  = "8760h"
	DefaultCAValidity    = "87600h"
	// DefaultRenewBefore is airadm's: 30 days, the window in which kubeadm's
	// docs tell operators to renew, and an upgrade's usual cadence.
	DefaultRenewBefore  = "720h"
	DefaultTokenTTL     = "24h"
	DefaultCgroupDriver = "systemd"
	DefaultCRISocket    = "unix:///var/run/containerd/containerd.sock"
	DefaultPlatform     = "linux/amd64"
	APIServerPort       = 6443
)

// Node returns the node called name.
func (c *Cluster) Node(name string) (Node, bool) {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n, true
		}
	}
	return Node{}, false
}

// ControlPlanes returns the control-plane nodes in config order.
func (c *Cluster) ControlPlanes() []Node {
	var out []Node
	for _, n := range c.Nodes {
		if n.Role == ControlPlane {
			out = append(out, n)
		}
	}
	return out
}

// Workers returns the worker nodes in config order.
func (c *Cluster) Workers() []Node {
	var out []Node
	for _, n := range c.Nodes {
		if n.Role == Worker {
			out = append(out, n)
		}
	}
	return out
}

// Endpoint is the control-plane endpoint as host:port.
func (c *Cluster) Endpoint() string {
	return net.JoinHostPort(c.EndpointHost, strconv.Itoa(c.EndpointPort))
}

var (
	versionRE  = regexp.MustCompile(`^v(\d+)\.(\d+)\.(\d+)$`)
	platformRE = regexp.MustCompile(`^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$`)
)

type collector struct{ problems []Problem }

func (c *collector) add(field, format string, args ...any) {
	c.problems = append(c.problems, Problem{Field: field, Msg: fmt.Sprintf(format, args...)})
}

// validate checks every field, gathering all problems rather than stopping
// at the first, and fills in kubeadm's defaults.
func (cfg *Config) validate() (*Cluster, []Problem) {
	var p collector
	c := &Cluster{
		Name:                orDefault(cfg.Name, DefaultClusterName),
		KubernetesVersion:   orDefault(cfg.KubernetesVersion, KubernetesVersion),
		DNSDomain:           orDefault(cfg.Network.DNSDomain, DefaultDNSDomain),
		Algorithm:           pki.Algorithm(orDefault(cfg.PKI.Algorithm, string(pki.RSA2048))),
		Repository:          strings.TrimSuffix(orDefault(cfg.Images.Repository, DefaultRepository), "/"),
		ExtraImages:         cfg.Images.Extra,
		Platform:            orDefault(cfg.Images.Platform, DefaultPlatform),
		ImageLayout:         cfg.Images.Layout,
		ExtraSANs:           cfg.PKI.ExtraSANs,
		CgroupDriver:        orDefault(cfg.Kubelet.CgroupDriver, DefaultCgroupDriver),
		CRISocket:           orDefault(cfg.Kubelet.CRISocket, DefaultCRISocket),
		addonPaths:          cfg.Addons.Manifests,
		staticPodPaths:      cfg.Addons.StaticPods,
		KubeletOverrides:    cfg.Kubelet.Config,
		ContainerdOverrides: cfg.Containerd.Config,
	}

	if len(validation.IsDNS1123Subdomain(c.Name)) > 0 {
		p.add("name", "%q is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')", c.Name)
	}
	if m := versionRE.FindStringSubmatch(c.KubernetesVersion); m == nil {
		p.add("kubernetes_version", "%q is not a version of the form v1.37.2", c.KubernetesVersion)
	} else if _, ok := ReleaseOf(c.KubernetesVersion); !ok {
		var minors []string
		for _, r := range Releases() {
			minors = append(minors, fmt.Sprintf("v1.%d.x", r.Minor))
		}
		p.add("kubernetes_version", "%s is not supported: this airadm renders Kubernetes %s", c.KubernetesVersion, strings.Join(minors, " and "))
	}
	if !c.Algorithm.Valid() {
		var names []string
		for _, a := range pki.Algorithms() {
			names = append(names, string(a))
		}
		p.add("pki.algorithm", "%q is not one of %s", c.Algorithm, strings.Join(names, ", "))
	}
	c.CertValidity = duration(&p, "pki.cert_validity", orDefault(cfg.PKI.CertValidity, DefaultCertValidity), false)
	c.CAValidity = duration(&p, "pki.ca_validity", orDefault(cfg.PKI.CAValidity, DefaultCAValidity), false)
	if c.CertValidity > 0 && c.CAValidity > 0 && c.CertValidity > c.CAValidity {
		p.add("pki.cert_validity", "%s outlasts pki.ca_validity %s", cfg.PKI.CertValidity, orDefault(cfg.PKI.CAValidity, DefaultCAValidity))
	}
	// A window as long as the validity would reissue every certificate on
	// every build: builds would no longer be reproducible.
	c.RenewBefore = duration(&p, "pki.renew_before", orDefault(cfg.PKI.RenewBefore, DefaultRenewBefore), false)
	if cfg.PKI.RenewBefore == "" && c.CertValidity > 0 && c.CertValidity/3 < c.RenewBefore {
		// Short-lived certificates renew in their last third, as the
		// kubelet rotates its own (in the last 10-30%).
		c.RenewBefore = c.CertValidity / 3
	}
	if c.RenewBefore > 0 && c.CertValidity > 0 && c.RenewBefore >= c.CertValidity {
		p.add("pki.renew_before", "%q is not shorter than pki.cert_validity %q: every build would reissue every certificate", orDefault(cfg.PKI.RenewBefore, DefaultRenewBefore), orDefault(cfg.PKI.CertValidity, DefaultCertValidity))
	}
	c.TokenTTL = duration(&p, "join.token_ttl", orDefault(cfg.Join.TokenTTL, DefaultTokenTTL), true)
	for i, san := range c.ExtraSANs {
		if _, err := netip.ParseAddr(san); err == nil {
			continue
		}
		if len(validation.IsDNS1123Subdomain(san)) > 0 && len(validation.IsWildcardDNS1123Subdomain(san)) > 0 {
			p.add(fmt.Sprintf("pki.extra_sans[%d]", i), "%q is neither an IP address nor a DNS name", san)
		}
	}
	if len(validation.IsDNS1123Subdomain(c.DNSDomain)) > 0 {
		p.add("network.dns_domain", "%q is not a DNS domain (lowercase letters, digits, '-' and '.')", c.DNSDomain)
	}
	if c.CgroupDriver != "systemd" && c.CgroupDriver != "cgroupfs" {
		p.add("kubelet.cgroup_driver", "%q is neither systemd nor cgroupfs", c.CgroupDriver)
	}
	if !strings.HasPrefix(c.CRISocket, "unix://") {
		p.add("kubelet.cri_socket", "%q is not a unix:// socket URL", c.CRISocket)
	}
	if _, err := name.NewRegistry(strings.SplitN(c.Repository, "/", 2)[0]); err != nil || strings.Contains(c.Repository, ":/") {
		p.add("images.repository", "%q is not a registry host with an optional path", c.Repository)
	}
	if !platformRE.MatchString(c.Platform) {
		p.add("images.platform", "%q is not os/arch or os/arch/variant, such as linux/amd64", c.Platform)
	}
	for i, ref := range c.ExtraImages {
		if _, err := name.ParseReference(ref, name.StrictValidation); err != nil {
			p.add(fmt.Sprintf("images.extra[%d]", i), "%q is not a fully qualified image reference (registry/repository:tag or @digest)", ref)
		}
	}

	c.ServiceSubnet = subnet(&p, "network.service_subnet", orDefault(cfg.Network.ServiceSubnet, DefaultServiceSubnet))
	if c.ServiceSubnet.IsValid() {
		hostBits := c.ServiceSubnet.Addr().BitLen() - c.ServiceSubnet.Bits()
		// kubeadm: at least 10 addresses and at most 20 host bits.
		if addresses(hostBits).Cmp(big.NewInt(10)) < 0 {
			p.add("network.service_subnet", "%s is too small: it needs room for at least 10 addresses", c.ServiceSubnet)
		} else if hostBits > 20 {
			p.add("network.service_subnet", "%s is too large: at most 20 host bits (a /%d)", c.ServiceSubnet, c.ServiceSubnet.Addr().BitLen()-20)
		}
	}
	if cfg.Network.PodSubnet != "" {
		c.PodSubnet = subnet(&p, "network.pod_subnet", cfg.Network.PodSubnet)
		if c.PodSubnet.IsValid() {
			// kube-controller-manager hands each node a /24 (IPv4) or /64 (IPv6).
			nodeMask := 24
			if c.PodSubnet.Addr().Is6() {
				nodeMask = 64
			}
			if c.PodSubnet.Bits() > nodeMask {
				p.add("network.pod_subnet", "%s is too small: each node gets a /%d from it", c.PodSubnet, nodeMask)
			}
			if c.ServiceSubnet.IsValid() && c.PodSubnet.Overlaps(c.ServiceSubnet) {
				p.add("network.pod_subnet", "%s overlaps network.service_subnet %s", c.PodSubnet, c.ServiceSubnet)
			}
		}
	}

	endpoint := cfg.ControlPlaneEndpoint
	if endpoint != "" {
		host, port, err := net.SplitHostPort(endpoint)
		pn, perr := strconv.Atoi(port)
		switch {
		case err != nil:
			p.add("control_plane_endpoint", "%q is not host:port", endpoint)
		case perr != nil || pn < 1 || pn > 65535:
			p.add("control_plane_endpoint", "%q has no valid port", endpoint)
		case net.ParseIP(host) == nil && len(validation.IsDNS1123Subdomain(host)) > 0:
			p.add("control_plane_endpoint", "%q: host is neither an IP address nor a DNS name", endpoint)
		default:
			c.EndpointHost, c.EndpointPort = host, pn
		}
	}

	names := map[string]int{}
	addrs := map[netip.Addr]int{}
	for i, n := range cfg.Nodes {
		field := fmt.Sprintf("nodes[%d]", i)
		node := Node{Name: n.Name, Role: Role(n.Role), KubeletOverrides: n.KubeletConfig}
		if n.Name == "" {
			p.add(field+".name", "missing")
		} else if len(validation.IsDNS1123Subdomain(n.Name)) > 0 {
			p.add(field+".name", "%q is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')", n.Name)
		} else if j, dup := names[n.Name]; dup {
			p.add(field+".name", "%q is already the name of nodes[%d]", n.Name, j)
		} else {
			names[n.Name] = i
		}
		if node.Role != ControlPlane && node.Role != Worker {
			p.add(field+".role", "%q is neither %q nor %q", n.Role, ControlPlane, Worker)
		}
		addr, err := netip.ParseAddr(n.Address)
		switch {
		case n.Address == "":
			p.add(field+".address", "missing")
		case err != nil || addr.Zone() != "":
			p.add(field+".address", "%q is not an IP address", n.Address)
		case addr.IsUnspecified() || addr.IsMulticast():
			p.add(field+".address", "%s cannot be a node address", addr)
		default:
			addr = addr.Unmap()
			if j, dup := addrs[addr]; dup {
				p.add(field+".address", "%s is already the address of nodes[%d]", addr, j)
			} else {
				addrs[addr] = i
			}
			if c.ServiceSubnet.IsValid() && c.ServiceSubnet.Contains(addr) {
				p.add(field+".address", "%s lies inside network.service_subnet %s", addr, c.ServiceSubnet)
			}
			if c.PodSubnet.IsValid() && c.PodSubnet.Contains(addr) {
				p.add(field+".address", "%s lies inside network.pod_subnet %s", addr, c.PodSubnet)
			}
			node.Address = addr
		}
		nodeNetwork(&p, field, n, &node)
		if n.Recipient != "" {
			if _, canon, err := ParseRecipient(n.Recipient); err != nil {
				p.add(field+".recipient", "%v", err)
			} else {
				node.Recipient = canon
			}
		}
		c.Nodes = append(c.Nodes, node)
	}
	if len(cfg.Nodes) == 0 {
		p.add("nodes", "no nodes: add at least one [[nodes]] with role = %q", ControlPlane)
	} else if len(c.ControlPlanes()) == 0 {
		p.add("nodes", "no node has role = %q", ControlPlane)
	}
	if endpoint == "" {
		if cps := c.ControlPlanes(); len(cps) > 0 && cps[0].Address.IsValid() {
			c.EndpointHost, c.EndpointPort = cps[0].Address.String(), APIServerPort
		}
		if len(c.ControlPlanes()) > 1 {
			p.add("control_plane_endpoint", "required with %d control-plane nodes: name a load balancer or VIP in front of them", len(c.ControlPlanes()))
		}
	}
	cfg.validateHost(&p, c)
	validateContainerd(&p, c.ContainerdOverrides)
	// Last: the kubelet config depends on the fields checked above.
	if len(c.KubeletOverrides) > 0 && c.ServiceSubnet.IsValid() {
		if _, err := c.KubeletConfiguration(Node{}); err != nil {
			p.add("kubelet.config", "%v", err)
		}
	}
	for i, n := range c.Nodes {
		if len(n.KubeletOverrides) > 0 && c.ServiceSubnet.IsValid() {
			if _, err := c.KubeletConfiguration(Node{KubeletOverrides: n.KubeletOverrides}); err != nil {
				p.add(fmt.Sprintf("nodes[%d].kubelet_config", i), "%v", err)
			}
		}
	}
	if len(p.problems) == 0 {
		// The rendered config must agree with each node's kubelet.
		for _, n := range c.Nodes {
			if _, err := c.ContainerdConfigTOML(n); err != nil && c.carriesRuntime(n) {
				p.add("containerd.config", "node %s: %v", n.Name, err)
			}
		}
	}
	return c, p.problems
}

func orDefault(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

func duration(p *collector, field, s string, zeroOK bool) time.Duration {
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		p.add(field, "%q is not a duration such as 8760h or 30m", s)
	case d < 0 || (d == 0 && !zeroOK):
		p.add(field, "%q must be positive", s)
	}
	return d
}

func subnet(p *collector, field, s string) netip.Prefix {
	pfx, err := netip.ParsePrefix(s)
	if err != nil {
		p.add(field, "%q is not a CIDR such as 10.96.0.0/12", s)
		return netip.Prefix{}
	}
	if pfx.Masked() != pfx {
		p.add(field, "%q has host bits set; did you mean %s?", s, pfx.Masked())
		return netip.Prefix{}
	}
	return pfx
}

func addresses(hostBits int) *big.Int {
	return new(big.Int).Lsh(big.NewInt(1), uint(hostBits))
}

var (
	ifaceNameRE = regexp.MustCompile(`^[A-Za-z0-9_.*?-]{1,15}$`)
	macRE       = regexp.MustCompile(`^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$`)
)

// nodeNetwork checks a node's first-boot network keys against its address
// (already in node.Address when valid) and fills them in.
func nodeNetwork(p *collector, field string, n NodeConfig, node *Node) {
	maxBits := 32
	node.Prefix = 24
	if node.Address.Is6() {
		maxBits, node.Prefix = 128, 64
	}
	if n.Prefix != nil {
		node.Prefix = *n.Prefix
		if *n.Prefix < 1 || *n.Prefix > maxBits {
			p.add(field+".prefix", "%d is not a prefix length from 1 to %d", *n.Prefix, maxBits)
			node.Prefix = 0
		}
	}
	if n.Gateway != "" {
		gw, err := netip.ParseAddr(n.Gateway)
		switch {
		case err != nil || gw.Zone() != "":
			p.add(field+".gateway", "%q is not an IP address", n.Gateway)
		case !node.Address.IsValid() || node.Prefix == 0:
			// The address or prefix is already reported.
		case gw.Unmap() == node.Address:
			p.add(field+".gateway", "%s is the node's own address", gw)
		case !netip.PrefixFrom(node.Address, node.Prefix).Masked().Contains(gw.Unmap()):
			p.add(field+".gateway", "%s is not on the node's network %s", gw, netip.PrefixFrom(node.Address, node.Prefix).Masked())
		default:
			node.Gateway = gw.Unmap()
		}
	}
	for i, ns := range n.Nameservers {
		a, err := netip.ParseAddr(ns)
		if err != nil || a.Zone() != "" || a.IsUnspecified() {
			p.add(fmt.Sprintf("%s.nameservers[%d]", field, i), "%q is not an IP address", ns)
			continue
		}
		node.Nameservers = append(node.Nameservers, a.Unmap())
	}
	if n.Interface != "" && !macRE.MatchString(n.Interface) && !ifaceNameRE.MatchString(n.Interface) {
		p.add(field+".interface", "%q is neither an interface name (at most 15 letters, digits, '-', '_', '.', globs * and ?) nor a MAC address such as 52:54:00:12:34:56", n.Interface)
	}
	node.Interface = n.Interface
	if macRE.MatchString(n.Interface) {
		node.Interface = strings.ToLower(n.Interface) // as the kernel shows it
	}
}
