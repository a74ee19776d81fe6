// Package render turns a validated cluster and its secrets into the files
// each node needs, at their kubeadm host paths. It is pure: it reads no
// files, keeps no state and draws no randomness; the secrets package issues
// keys and certificates beforehand.
package render

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/pki"
)

// File is one file of a node, at its absolute host path.
type File struct {
	Path string
	Mode fs.FileMode
	Data []byte
}

// Files of airadm's own, read by the on-host phases.
const (
	KubeadmConfigFile = AiradmStateDir + "/kubeadm-config.yaml"
	JoinFile          = AiradmStateDir + "/join.json"
)

// DirMode is the mode a directory on the host gets: the manifests and
// airadm's own state are private, as kubeadm keeps /etc/kubernetes/manifests.
func DirMode(dir string) fs.FileMode {
	switch dir {
	case ManifestsDir, AiradmStateDir, KubeletDir:
		return 0o700
	}
	return 0o755
}

// Join is what a control plane needs to let its workers in: each worker's
// bootstrap token and how long the tokens live once the control plane is up.
type Join struct {
	TokenTTL string      `json:"tokenTTL"`
	Tokens   []JoinToken `json:"tokens"`
}

type JoinToken struct {
	Node   string `json:"node"`
	ID     string `json:"id"`
	Secret string `json:"secret"`
}

// NodeFiles renders the file set of node name, sorted by path.
func NodeFiles(c *Cluster, s *Secrets, name string) ([]File, error) {
	n, ok := c.Node(name)
	if !ok {
		return nil, fmt.Errorf("rendering node %s: no such node in the config", name)
	}
	var files []File
	var err error
	if n.Role == ControlPlane {
		files, err = c.controlPlaneFiles(s, n)
	} else {
		files, err = c.workerFiles(s, n)
	}
	if err != nil {
		return nil, fmt.Errorf("rendering node %s: %w", name, err)
	}
	kc, err := c.KubeletConfiguration(n)
	if err != nil {
		return nil, err
	}
	kubelet, err := yaml.Marshal(kc)
	if err != nil {
		return nil, fmt.Errorf("encoding kubelet configuration: %w", err)
	}
	files = append(files,
		File{KubeletConfigFile, 0o644, kubelet},
		File{KubeletInstanceConfigFile, 0o644, kubeletInstanceConfig(kc)},
		File{KubeletFlagsFile, 0o644, kubeletFlags(n)},
		File{KubeletUnitFile, 0o644, []byte(kubeletUnit)},
		File{KubeletDropInFile, 0o644, []byte(kubeletDropIn)},
	)
	rt, err := c.runtimeFiles(n)
	if err != nil {
		return nil, fmt.Errorf("rendering node %s: %w", name, err)
	}
	files = append(files, rt...)
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	return files, nil
}

func (c *Cluster) workerFiles(s *Secrets, n Node) ([]File, error) {
	ca, ok := s.CAs[ClusterCA]
	if !ok {
		return nil, fmt.Errorf("no cluster CA")
	}
	tok, ok := s.Tokens[n.Name]
	if !ok {
		return nil, fmt.Errorf("no bootstrap token issued")
	}
	boot, err := c.BootstrapKubeconfig(ca, tok)
	if err != nil {
		return nil, err
	}
	return []File{
		{pkiPath("ca.crt"), 0o644, pki.EncodeCert(ca.Cert)},
		{BootstrapKubeconfig, 0o600, boot},
	}, nil
}

func (c *Cluster) controlPlaneFiles(s *Secrets, n Node) ([]File, error) {
	var files []File
	addPair := func(base string, p pki.Pair) error {
		key, err := pki.EncodeKey(p.Key)
		if err != nil {
			return err
		}
		files = append(files, File{pkiPath(base + ".crt"), 0o644, pki.EncodeCert(p.Cert)}, File{pkiPath(base + ".key"), 0o600, key})
		return nil
	}
	for _, ca := range CAs() {
		p, ok := s.CAs[ca.CA]
		if !ok {
			return nil, fmt.Errorf("no %s", ca.CA)
		}
		if err := addPair(string(ca.CA), p); err != nil {
			return nil, err
		}
	}
	if s.ServiceAccountKey == nil {
		return nil, fmt.Errorf("no service-account key")
	}
	saKey, err := pki.EncodeKey(s.ServiceAccountKey)
	if err != nil {
		return nil, err
	}
	saPub, err := pki.EncodePublicKey(s.ServiceAccountKey.Public())
	if err != nil {
		return nil, err
	}
	files = append(files, File{pkiPath("sa.key"), 0o600, saKey}, File{pkiPath("sa.pub"), 0o600, saPub})

	for _, leaf := range c.Leaves(n) {
		p, err := s.leaf(n.Name, leaf.Name)
		if err != nil {
			return nil, err
		}
		if file, ok := strings.CutPrefix(leaf.Name, "kubeconfig/"); ok {
			b, err := c.certKubeconfig(file, n, s.CAs[leaf.CA], p)
			if err != nil {
				return nil, err
			}
			files = append(files, File{path.Join(KubernetesDir, file), 0o600, b})
			continue
		}
		if err := addPair(leaf.Name, p); err != nil {
			return nil, err
		}
	}

	// The manifests come after every file their components read, so
	// that they can carry a digest of them.
	inputs := map[string][]byte{}
	for _, f := range files {
		inputs[f.Path] = f.Data
	}
	for _, pod := range []*corev1.Pod{c.etcdPod(n), c.apiServerPod(n), c.controllerManagerPod(), c.schedulerPod()} {
		stampInputs(pod, inputs)
		b, err := yaml.Marshal(pod)
		if err != nil {
			return nil, fmt.Errorf("encoding %s manifest: %w", pod.Name, err)
		}
		files = append(files, File{path.Join(ManifestsDir, pod.Name+".yaml"), 0o600, b})
	}

	for _, m := range c.StaticPods {
		files = append(files, File{path.Join(ManifestsDir, m.Name), 0o600, m.Data})
	}

	kc, err := c.kubeadmConfigYAML()
	if err != nil {
		return nil, err
	}
	files = append(files, File{KubeadmConfigFile, 0o644, kc})
	clusterKubelet, err := c.clusterKubeletConfigYAML()
	if err != nil {
		return nil, err
	}
	files = append(files, File{ClusterKubeletConfigFile, 0o644, clusterKubelet})
	addons, err := c.addons()
	if err != nil {
		return nil, err
	}
	files = append(files, File{AddonsFile, 0o644, addons})
	for _, m := range c.AddonManifests {
		files = append(files, File{path.Join(ExtraAddonsDir, m.Name), 0o644, m.Data})
	}

	join := Join{TokenTTL: c.TokenTTL.String(), Tokens: []JoinToken{}}
	for _, w := range c.Workers() {
		t, ok := s.Tokens[w.Name]
		if !ok {
			return nil, fmt.Errorf("no bootstrap token issued for worker %s", w.Name)
		}
		join.Tokens = append(join.Tokens, JoinToken{Node: w.Name, ID: t.ID, Secret: t.Secret})
	}
	jb, err := json.MarshalIndent(join, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encoding join tokens: %w", err)
	}
	files = append(files, File{JoinFile, 0o600, append(jb, '\n')})
	return files, nil
}

// InputsAnnotation carries, on each static pod, a sha256 over the node's
// files that its component reads (PodInputs: certificates, keys,
// kubeconfigs). kubelet restarts a static pod only when its manifest
// changes, and components read these files only when they start; so a
// renewed certificate or a new SAN changes the manifest of exactly the
// components that use it, and applying the bundle restarts exactly those.
// The digest names no secret: it is one-way, over whole files.
const InputsAnnotation = "airadm.dev/inputs.sha256"

func stampInputs(pod *corev1.Pod, files map[string][]byte) {
	h := sha256.New()
	for _, p := range PodInputs(pod) {
		if data, ok := files[p]; ok {
			fmt.Fprintf(h, "%s %x\n", p, sha256.Sum256(data))
		}
	}
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	pod.Annotations[InputsAnnotation] = hex.EncodeToString(h.Sum(nil))
}

// PodInputs lists the absolute paths a static pod's command names in its
// flags (--tls-cert-file=/etc/kubernetes/pki/apiserver.crt, comma-separated
// lists included), sorted and unique: the files the component reads at
// start.
func PodInputs(pod *corev1.Pod) []string {
	var out []string
	for _, ctr := range pod.Spec.Containers {
		for _, arg := range append(slices.Clone(ctr.Command), ctr.Args...) {
			_, value, ok := strings.Cut(arg, "=")
			if !ok {
				continue
			}
			for _, v := range strings.Split(value, ",") {
				if path.IsAbs(v) && path.Clean(v) == v && !slices.Contains(out, v) {
					out = append(out, v)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}
