package render

import "slices"

// KubernetesVersion is the one place the Kubernetes release is pinned. The
// k8s.io modules in go.mod and the scratch modules under hack/ follow it, and
// TestPinnedVersionsAgree keeps them in step.
const KubernetesVersion = "v1.37.2"

// Versions of the images kubeadm v1.37.2 deploys with this release
// (cmd/kubeadm/app/constants: DefaultEtcdVersion, CoreDNSVersion, PauseVersion).
const (
	EtcdVersion    = "3.7.0-0"
	CoreDNSVersion = "v1.14.6"
	PauseVersion   = "3.10.2"
)

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
		{"coredns", c.corednsRepository() + "/coredns:" + CoreDNSVersion},
		{"pause", c.PauseImage()},
		{"etcd", c.Repository + "/etcd:" + EtcdVersion},
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
	return c.Repository + "/pause:" + PauseVersion
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
