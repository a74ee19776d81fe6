package render

import (
	"encoding/json"
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"
)

// Kubelet file locations of kubeadm and its distribution packages. The unit
// goes under /etc/systemd/system because airadm, not a package, owns it.
const (
	KubeletConfigFile = KubeletDir + "/config.yaml"
	KubeletFlagsFile  = KubeletDir + "/kubeadm-flags.env"
	// KubeletInstanceConfigFile is the node's own part of the kubelet
	// config, which kubeadm init and join write and kubeadm upgrade reads
	// back (and merges over the kubelet-config ConfigMap).
	KubeletInstanceConfigFile = KubeletDir + "/instance-config.yaml"
	KubeletUnitFile           = "/etc/systemd/system/kubelet.service"
	KubeletDropInFile         = "/etc/systemd/system/kubelet.service.d/10-kubeadm.conf"
	KubeletKubeconfig         = KubernetesDir + "/kubelet.conf"
	BootstrapKubeconfig       = KubernetesDir + "/bootstrap-kubelet.conf"
	KubeletBinary             = "/usr/bin/kubelet"
	// KubeletBinaryDropInFile points the kubelet unit at the bundle's
	// kubelet when the bundle carries it elsewhere than KubeletBinary,
	// where the packaged unit and drop-in look for it.
	KubeletBinaryDropInFile = "/etc/systemd/system/kubelet.service.d/20-airadm-kubelet-binary.conf"
)

// KubeletBinaries are the paths where a bundle's kubelet may lie: the
// packages' /usr/bin, or /usr/local/bin as upstream's instructions for
// installing without a package manager put it.
func KubeletBinaries() []string { return []string{KubeletBinary, "/usr/local/bin/kubelet"} }

// KubeletBinaryDropIn is the drop-in that starts bin instead of
// /usr/bin/kubelet, with the packaged drop-in's command line. It sorts
// after 10-kubeadm.conf, so its empty ExecStart= clears that one's.
func KubeletBinaryDropIn(bin string) []byte {
	return fmt.Appendf(nil, `# Written by airadm apply: the bundle carries kubelet at %s.
[Service]
ExecStart=
ExecStart=%s $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
`, bin, bin)
}

// KubeletConfiguration is kubeadmKubeletConfiguration with [kubelet.config]
// and then the node's kubelet_config merged over it. The merge goes through
// JSON and decodes strictly, so a misspelt field is an error, not a
// silently ignored setting.
func (c *Cluster) KubeletConfiguration(n Node) (*kubeletv1beta1.KubeletConfiguration, error) {
	base := c.kubeadmKubeletConfiguration()
	if len(c.KubeletOverrides) == 0 && len(n.KubeletOverrides) == 0 {
		return base, nil
	}
	b, err := json.Marshal(base)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	mergeInto(m, c.KubeletOverrides)
	mergeInto(m, n.KubeletOverrides)
	merged, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	var out kubeletv1beta1.KubeletConfiguration
	if err := yaml.UnmarshalStrict(merged, &out); err != nil {
		return nil, fmt.Errorf("not a valid KubeletConfiguration: %v", err)
	}
	return &out, nil
}

// mergeInto overlays src onto dst, table by table.
func mergeInto(dst, src map[string]any) {
	for k, v := range src {
		if sv, ok := v.(map[string]any); ok {
			if dv, ok := dst[k].(map[string]any); ok {
				mergeInto(dv, sv)
				continue
			}
		}
		dst[k] = v
	}
}

// kubeadmKubeletConfiguration is the kubelet config kubeadm's componentconfigs
// package writes for this cluster, with the node's CRI socket merged in as
// kubeadm merges instance-config.yaml.
func (c *Cluster) kubeadmKubeletConfiguration() *kubeletv1beta1.KubeletConfiguration {
	zero := metav1.Duration{Duration: 0}
	return &kubeletv1beta1.KubeletConfiguration{
		TypeMeta: metav1.TypeMeta{APIVersion: "kubelet.config.k8s.io/v1beta1", Kind: "KubeletConfiguration"},
		Authentication: kubeletv1beta1.KubeletAuthentication{
			Anonymous: kubeletv1beta1.KubeletAnonymousAuthentication{Enabled: ptr.To(false)},
			Webhook:   kubeletv1beta1.KubeletWebhookAuthentication{Enabled: ptr.To(true), CacheTTL: zero},
			X509:      kubeletv1beta1.KubeletX509Authentication{ClientCAFile: pkiPath("ca.crt")},
		},
		Authorization: kubeletv1beta1.KubeletAuthorization{
			Mode:    kubeletv1beta1.KubeletAuthorizationModeWebhook,
			Webhook: kubeletv1beta1.KubeletWebhookAuthorization{CacheAuthorizedTTL: zero, CacheUnauthorizedTTL: zero},
		},
		CgroupDriver:                     c.CgroupDriver,
		ClusterDNS:                       []string{c.DNSServiceIP().String()},
		ClusterDomain:                    c.DNSDomain,
		ContainerRuntimeEndpoint:         c.CRISocket,
		CPUManagerReconcilePeriod:        zero,
		CrashLoopBackOff:                 kubeletv1beta1.CrashLoopBackOffConfig{},
		EvictionPressureTransitionPeriod: zero,
		FileCheckFrequency:               zero,
		HealthzBindAddress:               "127.0.0.1",
		HealthzPort:                      ptr.To[int32](10248),
		HTTPCheckFrequency:               zero,
		ImageMaximumGCAge:                zero,
		ImageMinimumGCAge:                zero,
		MemorySwap:                       kubeletv1beta1.MemorySwapConfiguration{},
		NodeStatusReportFrequency:        zero,
		NodeStatusUpdateFrequency:        zero,
		RotateCertificates:               true,
		RuntimeRequestTimeout:            zero,
		ShutdownGracePeriod:              zero,
		ShutdownGracePeriodCriticalPods:  zero,
		StaticPodPath:                    ManifestsDir,
		StreamingConnectionIdleTimeout:   zero,
		SyncFrequency:                    zero,
		VolumeStatsAggPeriod:             zero,
	}
}

// ClusterKubeletConfigFile is the cluster-wide kubelet config that
// upload-config stores in the kubelet-config ConfigMap, for `kubeadm join`
// and `kubeadm upgrade`: [kubelet.config] without any node's
// kubelet_config, and without the instance's runtime endpoint, as kubeadm
// keeps that in each node's instance-config.yaml.
const ClusterKubeletConfigFile = AiradmStateDir + "/kubelet-config.yaml"

func (c *Cluster) clusterKubeletConfigYAML() ([]byte, error) {
	kc, err := c.KubeletConfiguration(Node{})
	if err != nil {
		return nil, err
	}
	kc.ContainerRuntimeEndpoint = ""
	b, err := yaml.Marshal(kc)
	if err != nil {
		return nil, fmt.Errorf("encoding kubelet configuration: %w", err)
	}
	return b, nil
}

// kubeletInstanceConfig is instance-config.yaml byte for byte as kubeadm's
// WriteInstanceConfigToDisk writes it: only the runtime endpoint, which is
// also merged into config.yaml.
func kubeletInstanceConfig(kc *kubeletv1beta1.KubeletConfiguration) []byte {
	return fmt.Appendf(nil, "containerRuntimeEndpoint: %q\n", kc.ContainerRuntimeEndpoint)
}

// kubeletFlags is kubeadm-flags.env. kubeadm sets --hostname-override only
// when the node name differs from the host name it sees; airadm renders away
// from the host, so it always pins the name (and the address, so that the
// kubelet registers the configured InternalIP on multi-homed hosts).
func kubeletFlags(n Node) []byte {
	args := command("", []arg{
		{"hostname-override", n.Name},
		{"node-ip", n.Address.String()},
	})[1:]
	return fmt.Appendf(nil, "KUBELET_KUBEADM_ARGS=%q\n", strings.Join(args, " "))
}

// The kubelet unit and drop-in as the Kubernetes packages ship them
// (kubernetes/release: cmd/krel/templates/latest/kubelet and kubeadm).
const kubeletUnit = `[Unit]
Description=kubelet: The Kubernetes Node Agent
Documentation=https://kubernetes.io/docs/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
`

const kubeletDropIn = `# Note: This dropin only works with kubeadm and kubelet v1.11+
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
# This is a file that "kubeadm init" and "kubeadm join" generates at runtime, populating the KUBELET_KUBEADM_ARGS variable dynamically
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
# This is a file that the user can use for overrides of the kubelet args as a last resort. Preferably, the user should use
# the .NodeRegistration.KubeletExtraArgs object in the configuration files instead. KUBELET_EXTRA_ARGS should be sourced from this file.
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
`
