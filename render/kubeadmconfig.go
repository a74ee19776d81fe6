package render

import (
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// ClusterConfiguration is the subset of kubeadm.k8s.io/v1beta4
// ClusterConfiguration that airadm fills in. airadm must not import
// k8s.io/kubernetes, so the type is declared here with kubeadm's field
// names; the oracle test has the real kubeadm accept what it marshals.
type ClusterConfiguration struct {
	metav1.TypeMeta             `json:",inline"`
	Etcd                        KubeadmEtcd       `json:"etcd"`
	Networking                  KubeadmNetworking `json:"networking"`
	KubernetesVersion           string            `json:"kubernetesVersion"`
	ControlPlaneEndpoint        string            `json:"controlPlaneEndpoint,omitempty"`
	APIServer                   KubeadmAPIServer  `json:"apiServer"`
	ControllerManager           struct{}          `json:"controllerManager"`
	Scheduler                   struct{}          `json:"scheduler"`
	DNS                         struct{}          `json:"dns"`
	Proxy                       struct{}          `json:"proxy"`
	CertificatesDir             string            `json:"certificatesDir"`
	ImageRepository             string            `json:"imageRepository"`
	ClusterName                 string            `json:"clusterName"`
	EncryptionAlgorithm         string            `json:"encryptionAlgorithm"`
	CertificateValidityPeriod   *metav1.Duration  `json:"certificateValidityPeriod,omitempty"`
	CACertificateValidityPeriod *metav1.Duration  `json:"caCertificateValidityPeriod,omitempty"`
}

type KubeadmEtcd struct {
	Local *KubeadmLocalEtcd `json:"local,omitempty"`
}

type KubeadmLocalEtcd struct {
	DataDir string `json:"dataDir"`
}

type KubeadmNetworking struct {
	ServiceSubnet string `json:"serviceSubnet,omitempty"`
	PodSubnet     string `json:"podSubnet,omitempty"`
	DNSDomain     string `json:"dnsDomain,omitempty"`
}

type KubeadmAPIServer struct {
	CertSANs []string `json:"certSANs,omitempty"`
}

// KubeadmClusterConfiguration is what upload-config stores in the
// kubeadm-config ConfigMap, so that `kubeadm upgrade` and `kubeadm join`
// later see the cluster as if kubeadm had made it.
func (c *Cluster) KubeadmClusterConfiguration() *ClusterConfiguration {
	cc := &ClusterConfiguration{
		TypeMeta:                    metav1.TypeMeta{APIVersion: "kubeadm.k8s.io/v1beta4", Kind: "ClusterConfiguration"},
		Etcd:                        KubeadmEtcd{Local: &KubeadmLocalEtcd{DataDir: EtcdDataDir}},
		Networking:                  KubeadmNetworking{ServiceSubnet: c.ServiceSubnet.String(), DNSDomain: c.DNSDomain},
		KubernetesVersion:           c.KubernetesVersion,
		ControlPlaneEndpoint:        c.Endpoint(),
		APIServer:                   KubeadmAPIServer{CertSANs: c.ExtraSANs},
		CertificatesDir:             PKIDir,
		ImageRepository:             c.Repository,
		ClusterName:                 c.Name,
		EncryptionAlgorithm:         string(c.Algorithm),
		CertificateValidityPeriod:   &metav1.Duration{Duration: c.CertValidity},
		CACertificateValidityPeriod: &metav1.Duration{Duration: c.CAValidity},
	}
	if c.PodSubnet.IsValid() {
		cc.Networking.PodSubnet = c.PodSubnet.String()
	}
	return cc
}

func (c *Cluster) kubeadmConfigYAML() ([]byte, error) {
	b, err := yaml.Marshal(c.KubeadmClusterConfiguration())
	if err != nil {
		return nil, fmt.Errorf("encoding kubeadm ClusterConfiguration: %w", err)
	}
	return b, nil
}
