package render

import (
	"fmt"
	"math"
	"net"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Host paths, as kubeadm lays them out.
const (
	KubernetesDir  = "/etc/kubernetes"
	PKIDir         = KubernetesDir + "/pki"
	ManifestsDir   = KubernetesDir + "/manifests"
	KubeletDir     = "/var/lib/kubelet"
	EtcdDataDir    = "/var/lib/etcd"
	AiradmStateDir = "/var/lib/airadm"
)

const (
	etcdClientPort  = 2379
	etcdPeerPort    = 2380
	etcdMetricsPort = 2381
	schedulerPort   = 10259
	ctrlMgrPort     = 10257
	probePortName   = "probe-port"
	// controlPlaneHealthCheckSeconds is kubeadm's default
	// timeouts.controlPlaneComponentHealthCheck (4m).
	controlPlaneHealthCheckSeconds = 240
)

// caCertsVolumes are the host trust-store directories mounted into the
// apiserver and controller-manager. kubeadm mounts /etc/ssl/certs and, of a
// longer list, those that exist on the host where it runs. airadm renders on
// another machine, so it mounts the set that exists on Debian and Ubuntu
// hosts; docs/kubeadm-compatibility.md explains the difference.
var caCertsVolumes = []struct{ name, path string }{
	{"ca-certs", "/etc/ssl/certs"},
	{"etc-ca-certificates", "/etc/ca-certificates"},
	{"usr-local-share-ca-certificates", "/usr/local/share/ca-certificates"},
	{"usr-share-ca-certificates", "/usr/share/ca-certificates"},
}

type arg struct{ name, value string }

// command renders kubeadm's ArgumentsToCommand: sorted --name=value flags.
func command(binary string, args []arg) []string {
	sort.Slice(args, func(i, j int) bool { return args[i].name < args[j].name })
	out := []string{binary}
	for _, a := range args {
		out = append(out, fmt.Sprintf("--%s=%s", a.name, a.value))
	}
	return out
}

func pkiPath(name string) string { return PKIDir + "/" + name }

func hostPath(name, path string, t corev1.HostPathType) corev1.Volume {
	return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: path, Type: &t}}}
}

func probe(host, path string, scheme corev1.URIScheme, initialDelay, failures, period int32) *corev1.Probe {
	return &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
			Host: host, Path: path, Port: intstr.FromString(probePortName), Scheme: scheme,
		}},
		InitialDelaySeconds: initialDelay,
		TimeoutSeconds:      15,
		FailureThreshold:    failures,
		PeriodSeconds:       period,
	}
}

// The three probe shapes of kubeadm's staticpod utilities.
func liveness(host, path string, s corev1.URIScheme) *corev1.Probe {
	return probe(host, path, s, 10, 8, 10)
}
func readiness(host, path string, s corev1.URIScheme) *corev1.Probe {
	return probe(host, path, s, 0, 3, 1)
}
func startup(host, path string, s corev1.URIScheme) *corev1.Probe {
	return probe(host, path, s, 10, int32(math.Ceil(controlPlaneHealthCheckSeconds/10.0)), 10)
}

// sortedMounts orders mounts by name, as kubeadm's VolumeMountMapToSlice
// does for every component but etcd, whose list it writes out literally.
func sortedMounts(m []corev1.VolumeMount) []corev1.VolumeMount {
	sort.Slice(m, func(i, j int) bool { return m[i].Name < m[j].Name })
	return m
}

// componentPod is kubeadm's staticpod.ComponentPod.
func componentPod(c corev1.Container, volumes []corev1.Volume, annotations map[string]string) *corev1.Pod {
	priority := int32(2000001000)
	c.ImagePullPolicy = corev1.PullIfNotPresent
	sort.Slice(volumes, func(i, j int) bool { return volumes[i].Name < volumes[j].Name })
	return &corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			Name:        c.Name,
			Namespace:   metav1.NamespaceSystem,
			Labels:      map[string]string{"component": c.Name, "tier": "control-plane"},
			Annotations: annotations,
		},
		Spec: corev1.PodSpec{
			Containers:        []corev1.Container{c},
			Priority:          &priority,
			PriorityClassName: "system-node-critical",
			HostNetwork:       true,
			Volumes:           volumes,
			SecurityContext: &corev1.PodSecurityContext{
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
		},
	}
}

func cpu(q string) corev1.ResourceRequirements {
	return corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(q)}}
}

func probePort(port int32) []corev1.ContainerPort {
	return []corev1.ContainerPort{{Name: probePortName, ContainerPort: port, Protocol: corev1.ProtocolTCP}}
}

// loopback is the address the local components use to reach etcd, matching
// the family of the node address as kubeadm does.
func loopback(n Node) string {
	if n.Address.Is6() {
		return "::1"
	}
	return "127.0.0.1"
}

func (c *Cluster) apiServerPod(n Node) *corev1.Pod {
	addr := n.Address.String()
	args := []arg{
		{"advertise-address", addr},
		{"enable-admission-plugins", "NodeRestriction"},
		{"service-cluster-ip-range", c.ServiceSubnet.String()},
		{"service-account-key-file", pkiPath("sa.pub")},
		{"service-account-signing-key-file", pkiPath("sa.key")},
		{"service-account-issuer", "https://kubernetes.default.svc." + c.DNSDomain},
		{"client-ca-file", pkiPath("ca.crt")},
		{"tls-cert-file", pkiPath("apiserver.crt")},
		{"tls-private-key-file", pkiPath("apiserver.key")},
		{"kubelet-client-certificate", pkiPath("apiserver-kubelet-client.crt")},
		{"kubelet-client-key", pkiPath("apiserver-kubelet-client.key")},
		{"enable-bootstrap-token-auth", "true"},
		{"secure-port", strconv.Itoa(APIServerPort)},
		{"allow-privileged", "true"},
		{"kubelet-preferred-address-types", "InternalIP,ExternalIP,Hostname"},
		{"requestheader-username-headers", "X-Remote-User"},
		{"requestheader-group-headers", "X-Remote-Group"},
		{"requestheader-extra-headers-prefix", "X-Remote-Extra-"},
		{"requestheader-client-ca-file", pkiPath("front-proxy-ca.crt")},
		{"requestheader-allowed-names", "front-proxy-client"},
		{"proxy-client-cert-file", pkiPath("front-proxy-client.crt")},
		{"proxy-client-key-file", pkiPath("front-proxy-client.key")},
		{"etcd-servers", "https://" + net.JoinHostPort(loopback(n), strconv.Itoa(etcdClientPort))},
		{"etcd-cafile", pkiPath("etcd/ca.crt")},
		{"etcd-certfile", pkiPath("apiserver-etcd-client.crt")},
		{"etcd-keyfile", pkiPath("apiserver-etcd-client.key")},
		{"authorization-mode", "Node,RBAC"},
	}
	volumes, mounts := c.caCertVolumes()
	volumes = append(volumes, hostPath("k8s-certs", PKIDir, corev1.HostPathDirectoryOrCreate))
	mounts = append(mounts, corev1.VolumeMount{Name: "k8s-certs", MountPath: PKIDir, ReadOnly: true})
	return componentPod(corev1.Container{
		Name:           "kube-apiserver",
		Image:          c.image("kube-apiserver"),
		Command:        command("kube-apiserver", args),
		VolumeMounts:   sortedMounts(mounts),
		LivenessProbe:  liveness(addr, "/livez", corev1.URISchemeHTTPS),
		ReadinessProbe: readiness(addr, "/readyz", corev1.URISchemeHTTPS),
		StartupProbe:   startup(addr, "/livez", corev1.URISchemeHTTPS),
		Resources:      cpu("250m"),
		Ports:          probePort(APIServerPort),
	}, volumes, map[string]string{
		"kubeadm.kubernetes.io/kube-apiserver.advertise-address.endpoint": net.JoinHostPort(addr, strconv.Itoa(APIServerPort)),
	})
}

func (c *Cluster) caCertVolumes() ([]corev1.Volume, []corev1.VolumeMount) {
	var vols []corev1.Volume
	var mounts []corev1.VolumeMount
	for _, v := range caCertsVolumes {
		vols = append(vols, hostPath(v.name, v.path, corev1.HostPathDirectoryOrCreate))
		mounts = append(mounts, corev1.VolumeMount{Name: v.name, MountPath: v.path, ReadOnly: true})
	}
	return vols, mounts
}

func (c *Cluster) controllerManagerPod() *corev1.Pod {
	kubeconfig := KubernetesDir + "/controller-manager.conf"
	args := []arg{
		{"bind-address", "127.0.0.1"},
		{"leader-elect", "true"},
		{"kubeconfig", kubeconfig},
		{"authentication-kubeconfig", kubeconfig},
		{"authorization-kubeconfig", kubeconfig},
		{"client-ca-file", pkiPath("ca.crt")},
		{"requestheader-client-ca-file", pkiPath("front-proxy-ca.crt")},
		{"root-ca-file", pkiPath("ca.crt")},
		{"service-account-private-key-file", pkiPath("sa.key")},
		{"cluster-signing-cert-file", pkiPath("ca.crt")},
		{"cluster-signing-key-file", pkiPath("ca.key")},
		{"use-service-account-credentials", "true"},
		{"controllers", "*,bootstrapsigner,tokencleaner"},
		{"cluster-name", c.Name},
	}
	if c.PodSubnet.IsValid() {
		args = append(args,
			arg{"allocate-node-cidrs", "true"},
			arg{"cluster-cidr", c.PodSubnet.String()},
			arg{"service-cluster-ip-range", c.ServiceSubnet.String()})
	}
	volumes, mounts := c.caCertVolumes()
	volumes = append(volumes,
		hostPath("k8s-certs", PKIDir, corev1.HostPathDirectoryOrCreate),
		hostPath("kubeconfig", kubeconfig, corev1.HostPathFileOrCreate))
	mounts = append(mounts,
		corev1.VolumeMount{Name: "k8s-certs", MountPath: PKIDir, ReadOnly: true},
		corev1.VolumeMount{Name: "kubeconfig", MountPath: kubeconfig, ReadOnly: true})
	return componentPod(corev1.Container{
		Name:          "kube-controller-manager",
		Image:         c.image("kube-controller-manager"),
		Command:       command("kube-controller-manager", args),
		VolumeMounts:  sortedMounts(mounts),
		LivenessProbe: liveness("127.0.0.1", "/healthz", corev1.URISchemeHTTPS),
		StartupProbe:  startup("127.0.0.1", "/healthz", corev1.URISchemeHTTPS),
		Resources:     cpu("200m"),
		Ports:         probePort(ctrlMgrPort),
	}, volumes, nil)
}

func (c *Cluster) schedulerPod() *corev1.Pod {
	kubeconfig := KubernetesDir + "/scheduler.conf"
	args := []arg{
		{"bind-address", "127.0.0.1"},
		{"leader-elect", "true"},
		{"kubeconfig", kubeconfig},
		{"authentication-kubeconfig", kubeconfig},
		{"authorization-kubeconfig", kubeconfig},
	}
	return componentPod(corev1.Container{
		Name:           "kube-scheduler",
		Image:          c.image("kube-scheduler"),
		Command:        command("kube-scheduler", args),
		VolumeMounts:   []corev1.VolumeMount{{Name: "kubeconfig", MountPath: kubeconfig, ReadOnly: true}},
		LivenessProbe:  liveness("127.0.0.1", "/livez", corev1.URISchemeHTTPS),
		ReadinessProbe: readiness("127.0.0.1", "/readyz", corev1.URISchemeHTTPS),
		StartupProbe:   startup("127.0.0.1", "/livez", corev1.URISchemeHTTPS),
		Resources:      cpu("100m"),
		Ports:          probePort(schedulerPort),
	}, []corev1.Volume{hostPath("kubeconfig", kubeconfig, corev1.HostPathFileOrCreate)}, nil)
}

// InitialCluster is etcd's --initial-cluster for the cluster: every
// control-plane node, known at build time, so stacked members start
// together without kubeadm's one-by-one member add.
func (c *Cluster) InitialCluster() string {
	var members []string
	for _, cp := range c.ControlPlanes() {
		members = append(members, cp.Name+"="+peerURL(cp))
	}
	return strings.Join(members, ",")
}

func clientURL(n Node) string {
	return "https://" + net.JoinHostPort(n.Address.String(), strconv.Itoa(etcdClientPort))
}

func peerURL(n Node) string {
	return "https://" + net.JoinHostPort(n.Address.String(), strconv.Itoa(etcdPeerPort))
}

func (c *Cluster) etcdPod(n Node) *corev1.Pod {
	lo := loopback(n)
	etcdPKI := PKIDir + "/etcd"
	args := []arg{
		{"name", n.Name},
		{"listen-client-urls", "https://" + net.JoinHostPort(lo, strconv.Itoa(etcdClientPort)) + "," + clientURL(n)},
		{"advertise-client-urls", clientURL(n)},
		{"listen-peer-urls", peerURL(n)},
		{"initial-advertise-peer-urls", peerURL(n)},
		{"data-dir", EtcdDataDir},
		{"cert-file", pkiPath("etcd/server.crt")},
		{"key-file", pkiPath("etcd/server.key")},
		{"trusted-ca-file", pkiPath("etcd/ca.crt")},
		{"client-cert-auth", "true"},
		{"peer-cert-file", pkiPath("etcd/peer.crt")},
		{"peer-key-file", pkiPath("etcd/peer.key")},
		{"peer-trusted-ca-file", pkiPath("etcd/ca.crt")},
		{"peer-client-cert-auth", "true"},
		{"snapshot-count", "10000"},
		{"listen-metrics-urls", "http://" + net.JoinHostPort(lo, strconv.Itoa(etcdMetricsPort))},
		{"feature-gates", "InitialCorruptCheck=true"},
		{"watch-progress-notify-interval", "5s"},
		{"initial-cluster", c.InitialCluster()},
	}
	pod := componentPod(corev1.Container{
		Name:    "etcd",
		Image:   c.image("etcd"),
		Command: command("etcd", args),
		VolumeMounts: []corev1.VolumeMount{
			{Name: "etcd-data", MountPath: EtcdDataDir},
			{Name: "etcd-certs", MountPath: etcdPKI},
		},
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("100m"),
			corev1.ResourceMemory: resource.MustParse("100Mi"),
		}},
		LivenessProbe:  liveness(lo, "/livez", corev1.URISchemeHTTP),
		ReadinessProbe: readiness(lo, "/readyz", corev1.URISchemeHTTP),
		StartupProbe:   startup(lo, "/readyz", corev1.URISchemeHTTP),
		Ports:          probePort(etcdMetricsPort),
	}, []corev1.Volume{
		hostPath("etcd-data", EtcdDataDir, corev1.HostPathDirectoryOrCreate),
		hostPath("etcd-certs", etcdPKI, corev1.HostPathDirectoryOrCreate),
	}, map[string]string{"kubeadm.kubernetes.io/etcd.advertise-client-urls": clientURL(n)})
	return pod
}
