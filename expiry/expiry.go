// Package expiry reports when a node's certificates expire, as `kubeadm
// certs check-expiration` does: every certificate under /etc/kubernetes/pki
// and the client certificate of every kubeconfig in /etc/kubernetes,
// whether embedded or named by path (kubelet.conf names the kubelet's
// rotated kubelet-client-current.pem). It reads certificates only, never
// keys or tokens.
package expiry

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
)

// Cert is one certificate and where it was found.
type Cert struct {
	// Path is the host path of the certificate file; for a kubeconfig's
	// client certificate, the kubeconfig's.
	Path string `json:"path"`
	// File is the certificate file a kubeconfig names (kubelet.conf's
	// kubelet-client-current.pem), empty when the certificate is embedded
	// or is a file itself.
	File     string    `json:"file,omitempty"`
	Subject  string    `json:"subject"`
	Serial   string    `json:"serial"`
	IsCA     bool      `json:"isCA"`
	NotAfter time.Time `json:"notAfter"`
	// Authority is the CA under /etc/kubernetes/pki that signed it
	// ("ca", "front-proxy-ca", "etcd/ca"), empty if none of them did.
	Authority string `json:"authority,omitempty"`
	// Residual is NotAfter less the time of the reading; negative once
	// expired. ResidualSeconds is the same, for JSON readers.
	Residual        time.Duration `json:"-"`
	ResidualSeconds int64         `json:"residualSeconds"`
}

// Host reads the certificates of the node under root at time now.
func Host(root string, now time.Time) ([]Cert, error) {
	pkiDir := hostfs.Path(root, render.PKIDir)
	var files []string
	err := filepath.WalkDir(pkiDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".crt") {
			files = append(files, p)
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("reading %s: %w", render.PKIDir, err)
	}
	cas := map[string]*x509.Certificate{}
	for _, ca := range render.CAs() {
		b, err := os.ReadFile(hostfs.Path(root, render.PKIDir+"/"+string(ca.CA)+".crt"))
		if err != nil {
			continue
		}
		if c, err := pki.ParseCert(b); err == nil {
			cas[string(ca.CA)] = c
		}
	}
	var out []Cert
	add := func(hostPath, file string, c *x509.Certificate) {
		e := Cert{Path: hostPath, File: file, Subject: c.Subject.String(), Serial: c.SerialNumber.Text(16), IsCA: c.IsCA, NotAfter: c.NotAfter.UTC(), Residual: c.NotAfter.Sub(now)}
		e.ResidualSeconds = int64(e.Residual / time.Second)
		for _, name := range slices.Sorted(maps.Keys(cas)) {
			if ca := cas[name]; c.CheckSignatureFrom(ca) == nil && !c.Equal(ca) {
				e.Authority = name
			}
		}
		out = append(out, e)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", f, err)
		}
		c, err := pki.ParseCert(b)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", f, err)
		}
		rel, _ := filepath.Rel(pkiDir, f)
		add(path.Join(render.PKIDir, filepath.ToSlash(rel)), "", c)
	}
	confs, _ := filepath.Glob(hostfs.Path(root, render.KubernetesDir+"/*.conf"))
	slices.Sort(confs)
	for _, f := range confs {
		hostPath := path.Join(render.KubernetesDir, filepath.Base(f))
		c, file, err := kubeconfigCert(root, f)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", hostPath, err)
		}
		if c != nil {
			add(hostPath, file, c)
		}
	}
	return out, nil
}

// kubeconfigCert is the client certificate of the kubeconfig at f (nil for
// one that authenticates otherwise, with a token say) and the host path of
// the file it names, if it names one.
func kubeconfigCert(root, f string) (*x509.Certificate, string, error) {
	cfg, err := clientcmd.LoadFromFile(f)
	if err != nil {
		return nil, "", err
	}
	ctx, ok := cfg.Contexts[cfg.CurrentContext]
	if !ok {
		return nil, "", nil
	}
	user, ok := cfg.AuthInfos[ctx.AuthInfo]
	if !ok {
		return nil, "", nil
	}
	data, file := user.ClientCertificateData, ""
	if len(data) == 0 && user.ClientCertificate != "" {
		file = user.ClientCertificate
		if data, err = os.ReadFile(hostfs.Path(root, file)); err != nil {
			return nil, "", err
		}
	}
	if len(data) == 0 {
		return nil, "", nil
	}
	c, err := pki.ParseCert(data)
	return c, file, err
}
