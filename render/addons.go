package render

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"maps"
	"slices"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	kubeproxyv1alpha1 "k8s.io/kube-proxy/config/v1alpha1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"
)

// AddonsFile holds the CoreDNS and kube-proxy objects, and ExtraAddonsDir
// the config's extra manifests, for the addons phase to apply.
const (
	AddonsFile     = AiradmStateDir + "/addons/kubeadm.yaml"
	ExtraAddonsDir = AiradmStateDir + "/addons/extra"
)

// addons renders kubeadm's CoreDNS and kube-proxy addons (phases/addons
// dns/manifests.go and proxy/manifests.go) as typed objects, one YAML
// document each.
func (c *Cluster) addons() ([]byte, error) {
	proxy, err := c.kubeProxy()
	if err != nil {
		return nil, err
	}
	objs := append(c.coreDNS(), proxy...)
	var buf bytes.Buffer
	for _, o := range objs {
		b, err := yaml.Marshal(o)
		if err != nil {
			return nil, fmt.Errorf("encoding addons: %w", err)
		}
		buf.WriteString("---\n")
		buf.Write(b)
	}
	return buf.Bytes(), nil
}

func typeMeta(apiVersion, kind string) metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: apiVersion, Kind: kind}
}

func system(name string, labels map[string]string) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: name, Namespace: metav1.NamespaceSystem, Labels: labels}
}

func (c *Cluster) coreDNS() []any {
	dnsLabels := map[string]string{"k8s-app": "kube-dns"}
	corefile := fmt.Sprintf(`.:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes %[1]s in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30 {
       disable success %[1]s
       disable denial %[1]s
    }
    loop
    reload
    loadbalance
}
`, c.DNSDomain)
	port := func(name string, p int32, proto corev1.Protocol) corev1.ContainerPort {
		return corev1.ContainerPort{Name: name, ContainerPort: p, Protocol: proto}
	}
	svcPort := func(name string, p int32, proto corev1.Protocol) corev1.ServicePort {
		return corev1.ServicePort{Name: name, Port: p, Protocol: proto, TargetPort: intstr.FromInt32(p)}
	}
	return []any{
		&corev1.ServiceAccount{TypeMeta: typeMeta("v1", "ServiceAccount"), ObjectMeta: system("coredns", nil)},
		&rbacv1.ClusterRole{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "ClusterRole"), ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
			Rules: []rbacv1.PolicyRule{
				{APIGroups: []string{""}, Resources: []string{"endpoints", "services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
				{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
			}},
		&rbacv1.ClusterRoleBinding{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:coredns"},
			Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: "coredns", Namespace: metav1.NamespaceSystem}}},
		&corev1.ConfigMap{TypeMeta: typeMeta("v1", "ConfigMap"), ObjectMeta: system("coredns", nil), Data: map[string]string{"Corefile": corefile}},
		&appsv1.Deployment{TypeMeta: typeMeta("apps/v1", "Deployment"), ObjectMeta: system("coredns", dnsLabels),
			Spec: appsv1.DeploymentSpec{
				Replicas: ptr.To[int32](2),
				Strategy: appsv1.DeploymentStrategy{Type: appsv1.RollingUpdateDeploymentStrategyType,
					RollingUpdate: &appsv1.RollingUpdateDeployment{MaxUnavailable: ptr.To(intstr.FromInt32(1))}},
				Selector: &metav1.LabelSelector{MatchLabels: dnsLabels},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: dnsLabels},
					Spec: corev1.PodSpec{
						PriorityClassName:  "system-cluster-critical",
						ServiceAccountName: "coredns",
						Affinity: &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
							PreferredDuringSchedulingIgnoredDuringExecution: []corev1.WeightedPodAffinityTerm{{Weight: 100,
								PodAffinityTerm: corev1.PodAffinityTerm{TopologyKey: "kubernetes.io/hostname",
									LabelSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
										{Key: "k8s-app", Operator: metav1.LabelSelectorOpIn, Values: []string{"kube-dns"}}}}}}}}},
						Tolerations: []corev1.Toleration{
							{Key: "CriticalAddonsOnly", Operator: corev1.TolerationOpExists},
							{Key: "node-role.kubernetes.io/control-plane", Effect: corev1.TaintEffectNoSchedule},
						},
						NodeSelector: map[string]string{"kubernetes.io/os": "linux"},
						Containers: []corev1.Container{{
							Name: "coredns", Image: c.image("coredns"), ImagePullPolicy: corev1.PullIfNotPresent,
							Resources: corev1.ResourceRequirements{
								Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("170Mi")},
								Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("70Mi")},
							},
							Args:         []string{"-conf", "/etc/coredns/Corefile"},
							VolumeMounts: []corev1.VolumeMount{{Name: "config-volume", MountPath: "/etc/coredns", ReadOnly: true}},
							Ports: []corev1.ContainerPort{
								port("dns", 53, corev1.ProtocolUDP), port("dns-tcp", 53, corev1.ProtocolTCP), port("metrics", 9153, corev1.ProtocolTCP),
								port("liveness-probe", 8080, corev1.ProtocolTCP), port("readiness-probe", 8181, corev1.ProtocolTCP),
							},
							LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/health", Port: intstr.FromString("liveness-probe"), Scheme: corev1.URISchemeHTTP}},
								InitialDelaySeconds: 60, TimeoutSeconds: 5, SuccessThreshold: 1, FailureThreshold: 5},
							ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("readiness-probe"), Scheme: corev1.URISchemeHTTP}}},
							SecurityContext: &corev1.SecurityContext{
								AllowPrivilegeEscalation: ptr.To(false),
								Capabilities:             &corev1.Capabilities{Add: []corev1.Capability{"NET_BIND_SERVICE"}, Drop: []corev1.Capability{"ALL"}},
								ReadOnlyRootFilesystem:   ptr.To(true),
							},
						}},
						DNSPolicy: corev1.DNSDefault,
						Volumes: []corev1.Volume{{Name: "config-volume", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
							LocalObjectReference: corev1.LocalObjectReference{Name: "coredns"},
							Items:                []corev1.KeyToPath{{Key: "Corefile", Path: "Corefile"}}}}}},
					},
				},
			}},
		&corev1.Service{TypeMeta: typeMeta("v1", "Service"),
			ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Namespace: metav1.NamespaceSystem,
				Labels:      map[string]string{"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true", "kubernetes.io/name": "CoreDNS"},
				Annotations: map[string]string{"prometheus.io/port": "9153", "prometheus.io/scrape": "true"}},
			Spec: corev1.ServiceSpec{
				ClusterIP: c.DNSServiceIP().String(),
				Ports:     []corev1.ServicePort{svcPort("dns", 53, corev1.ProtocolUDP), svcPort("dns-tcp", 53, corev1.ProtocolTCP), svcPort("metrics", 9153, corev1.ProtocolTCP)},
				Selector:  dnsLabels,
			}},
	}
}

// ComponentConfigHashAnnotation marks a component config ConfigMap as
// generated (not edited by a user); `kubeadm upgrade` checks it.
const ComponentConfigHashAnnotation = "kubeadm.kubernetes.io/component-config.hash"

// SignComponentConfig annotates cm with kubeadm's checksum
// (componentconfigs.ChecksumForConfigMap: sha256 over the Data values in
// key order, then BinaryData).
func SignComponentConfig(cm *corev1.ConfigMap) *corev1.ConfigMap {
	h := sha256.New()
	for _, k := range slices.Sorted(maps.Keys(cm.Data)) {
		h.Write([]byte(cm.Data[k]))
	}
	for _, k := range slices.Sorted(maps.Keys(cm.BinaryData)) {
		h.Write(cm.BinaryData[k])
	}
	if cm.Annotations == nil {
		cm.Annotations = map[string]string{}
	}
	cm.Annotations[ComponentConfigHashAnnotation] = fmt.Sprintf("sha256:%x", h.Sum(nil))
	return cm
}

// kubeProxyConfiguration is kubeadm's default KubeProxyConfiguration.
func (c *Cluster) kubeProxyConfiguration() ([]byte, error) {
	cfg := kubeproxyv1alpha1.KubeProxyConfiguration{
		TypeMeta:    typeMeta("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration"),
		BindAddress: "0.0.0.0",
		// kubeadm writes the mode out (TestOracleAddons caught its absence).
		Mode: "iptables",
	}
	if c.ServiceSubnet.Addr().Is6() {
		cfg.BindAddress = "::"
	}
	if c.PodSubnet.IsValid() {
		cfg.ClusterCIDR = c.PodSubnet.String()
	}
	cfg.ClientConnection.Kubeconfig = "/var/lib/kube-proxy/kubeconfig.conf"
	return yaml.Marshal(&cfg)
}

func (c *Cluster) kubeProxy() ([]any, error) {
	labels := map[string]string{"k8s-app": "kube-proxy"}
	proxyCfg, err := c.kubeProxyConfiguration()
	if err != nil {
		return nil, fmt.Errorf("encoding kube-proxy configuration: %w", err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["default"] = &clientcmdapi.Cluster{Server: "https://" + c.Endpoint(), CertificateAuthority: "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"}
	kc.Contexts["default"] = &clientcmdapi.Context{Cluster: "default", Namespace: "default", AuthInfo: "default"}
	kc.AuthInfos["default"] = &clientcmdapi.AuthInfo{TokenFile: "/var/run/secrets/kubernetes.io/serviceaccount/token"}
	kc.CurrentContext = "default"
	kubeconfig, err := clientcmd.Write(*kc)
	if err != nil {
		return nil, fmt.Errorf("encoding kube-proxy kubeconfig: %w", err)
	}
	hostPathType := corev1.HostPathFileOrCreate
	return []any{
		&corev1.ServiceAccount{TypeMeta: typeMeta("v1", "ServiceAccount"), ObjectMeta: system("kube-proxy", nil)},
		&rbacv1.ClusterRoleBinding{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), ObjectMeta: metav1.ObjectMeta{Name: "kubeadm:node-proxier"},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:node-proxier"},
			Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: "kube-proxy", Namespace: metav1.NamespaceSystem}}},
		&rbacv1.Role{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "Role"), ObjectMeta: system("kube-proxy", nil),
			Rules: []rbacv1.PolicyRule{{Verbs: []string{"get"}, APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{"kube-proxy"}}}},
		&rbacv1.RoleBinding{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "RoleBinding"), ObjectMeta: system("kube-proxy", nil),
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "kube-proxy"},
			Subjects: []rbacv1.Subject{{Kind: rbacv1.GroupKind, Name: "system:bootstrappers:kubeadm:default-node-token"}}},
		SignComponentConfig(&corev1.ConfigMap{TypeMeta: typeMeta("v1", "ConfigMap"), ObjectMeta: system("kube-proxy", map[string]string{"app": "kube-proxy"}),
			Data: map[string]string{"kubeconfig.conf": string(kubeconfig), "config.conf": string(proxyCfg)}}),
		&appsv1.DaemonSet{TypeMeta: typeMeta("apps/v1", "DaemonSet"), ObjectMeta: system("kube-proxy", labels),
			Spec: appsv1.DaemonSetSpec{
				Selector:       &metav1.LabelSelector{MatchLabels: labels},
				UpdateStrategy: appsv1.DaemonSetUpdateStrategy{Type: appsv1.RollingUpdateDaemonSetStrategyType},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels},
					Spec: corev1.PodSpec{
						PriorityClassName: "system-node-critical",
						Containers: []corev1.Container{{
							Name: "kube-proxy", Image: c.image("kube-proxy"), ImagePullPolicy: corev1.PullIfNotPresent,
							Command:         []string{"/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=$(NODE_NAME)"},
							SecurityContext: &corev1.SecurityContext{Privileged: ptr.To(true)},
							VolumeMounts: []corev1.VolumeMount{
								{MountPath: "/var/lib/kube-proxy", Name: "kube-proxy"},
								{MountPath: "/run/xtables.lock", Name: "xtables-lock"},
								{MountPath: "/lib/modules", Name: "lib-modules", ReadOnly: true},
							},
							Env: []corev1.EnvVar{{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}}},
						}},
						HostNetwork:        true,
						ServiceAccountName: "kube-proxy",
						Volumes: []corev1.Volume{
							{Name: "kube-proxy", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "kube-proxy"}}}},
							{Name: "xtables-lock", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/run/xtables.lock", Type: &hostPathType}}},
							{Name: "lib-modules", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/lib/modules"}}},
						},
						Tolerations:  []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
						NodeSelector: map[string]string{"kubernetes.io/os": "linux"},
					},
				},
			}},
	}, nil
}
