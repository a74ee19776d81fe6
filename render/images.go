package render

import (
	"slices"
	"strconv"
)

// KubernetesVersion is the one place the Kubernetes release is pinned. The
// k8s.io modules in go.mod and the scratch modules under hack/ follow it, and
// TestPinnedVersionsAgree keeps them in step.
const KubernetesVersion = "v1.37.2"

// Versions of the images kubeadm v1.37.2 deploys with the pinned release
// (cmd/kubeadm/app/constants: DefaultEtcdVersion, CoreDNSVersion, PauseVersion).
const (
	EtcdVersion    = "3.7.0-0"
	CoreDNSVersion = "v1.14.6"
	PauseVersion   = "3.10.2"
)

// Release is what kubeadm v1.37.2 renders differently by the minor version
// of kubernetesVersion. The kube-* images carry the version itself; the
// rest comes from kubeadm's constants: etcd from SupportedEtcdVersion (which
// has no entry for 37, so kubeadm falls back to its highest, 36's), CoreDNS
// and pause from constants that do not depend on the version. No flag, feature
// gate or component config default of kubeadm v1.37.2 depends on the version
// it deploys (TestOracle checks both minors byte for byte).
type Release struct {
	Minor   int
	Etcd    string // etcd image tag
	CoreDNS string
	Pause   string
}

// Releases is the one table of the Kubernetes minors this airadm renders,
// newest first: the pinned one and the one before, as kubeadm v1.37 deploys
// control planes one minor older (constants.MinimumControlPlaneVersion).
func Releases() []Release {
	return []Release{
		{Minor: 37, Etcd: EtcdVersion, CoreDNS: CoreDNSVersion, Pause: PauseVersion},
		{Minor: 36, Etcd: "3.7.0-0", CoreDNS: CoreDNSVersion, Pause: PauseVersion},
	}
}

// ReleaseOf returns the row of Releases for version (v1.MINOR.PATCH).
func ReleaseOf(version string) (Release, bool) {
	m := versionRE.FindStringSubmatch(version)
	if m == nil || m[1] != "1" {
		return Release{}, false
	}
	for _, r := range Releases() {
		if strconv.Itoa(r.Minor) == m[2] {
			return r, true
		}
	}
	return Release{}, false
}

// release is the cluster's row; validate refuses any version without one, so
// the pinned row stands in only for hand-built Clusters in tests.
func (c *Cluster) release() Release {
	if r, ok := ReleaseOf(c.KubernetesVersion); ok {
		return r
	}
	return Releases()[0]
}

// Image names the images of one cluster under its repository.
type Image struct {
	Component string // kube-apiserver, etcd, coredns, pause, ...
	Ref       string
}

// CoreImages is kubeadm's image list for the cluster, in the order
// `kubeadm config images list` prints it.
func (c *Cluster) CoreImages() []Image {
	k := func(component string) Image {
		return Image{component, c.Repository + "/" + component + ":" + c.KubernetesVersion}
	}
	return []Image{
		k("kube-apiserver"),
		k("kube-controller-manager"),
		k("kube-scheduler"),
		k("kube-proxy"),
		{"coredns", c.corednsRepository() + "/coredns:" + c.release().CoreDNS},
		{"pause", c.PauseImage()},
		{"etcd", c.Repository + "/etcd:" + c.release().Etcd},
	}
}

// corednsRepository follows kubeadm's images.GetDNSImage: only the default
// registry moved CoreDNS to a coredns/ sub-path; mirrors keep it flat.
func (c *Cluster) corednsRepository() string {
	if c.Repository == DefaultRepository {
		return c.Repository + "/coredns"
	}
	return c.Repository
}

// PauseImage is the sandbox image containerd must find on every node.
func (c *Cluster) PauseImage() string {
	return c.Repository + "/pause:" + c.release().Pause
}

func (c *Cluster) image(component string) string {
	for _, im := range c.CoreImages() {
		if im.Component == component {
			return im.Ref
		}
	}
	panic("render: no image for " + component)
}

// Images returns every image reference the cluster needs, each once:
// kubeadm's list and then images.extra (an extra that repeats a core image,
// or itself, adds nothing).
func (c *Cluster) Images() []string {
	var out []string
	for _, im := range c.CoreImages() {
		out = append(out, im.Ref)
	}
	return appendNew(out, c.ExtraImages...)
}

func appendNew(list []string, refs ...string) []string {
	for _, r := range refs {
		if !slices.Contains(list, r) {
			list = append(list, r)
		}
	}
	return list
}

// NodeImages returns the images node needs on disk. A worker runs no
// control-plane pods, but it runs kube-proxy, the pod sandbox and, because
// it carries no taint, may be chosen for CoreDNS.
func (c *Cluster) NodeImages(n Node) []string {
	if n.Role == ControlPlane {
		return c.Images()
	}
	out := []string{c.image("kube-proxy"), c.image("coredns"), c.image("pause")}
	return appendNew(out, c.ExtraImages...)
}
