// Package pki issues the X.509 material of a kubeadm-style cluster: keys of
// the configured algorithm, self-signed CAs and leaf certificates built from
// explicit templates. It reads no files and keeps no state: the caller passes
// the clock's reading and a random source for serial numbers.
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"slices"
	"time"

	certutil "k8s.io/client-go/util/cert"
	"k8s.io/client-go/util/keyutil"
)

// Algorithm names a key type as kubeadm's ClusterConfiguration.encryptionAlgorithm spells it.
type Algorithm string

const (
	RSA2048   Algorithm = "RSA-2048"
	RSA3072   Algorithm = "RSA-3072"
	RSA4096   Algorithm = "RSA-4096"
	ECDSAP256 Algorithm = "ECDSA-P256"
	ECDSAP384 Algorithm = "ECDSA-P384"
)

// Algorithms lists every supported algorithm, kubeadm's default first.
func Algorithms() []Algorithm {
	return []Algorithm{RSA2048, RSA3072, RSA4096, ECDSAP256, ECDSAP384}
}

// Valid reports whether a is one of Algorithms.
func (a Algorithm) Valid() bool { return slices.Contains(Algorithms(), a) }

// Backdate is how far kubeadm moves NotBefore into the past so that hosts
// whose clocks lag a little still accept fresh certificates.
const Backdate = 5 * time.Minute

// GenerateKey makes a private key of algorithm a.
//
// Since Go 1.26 the crypto packages draw key material from the system source
// whatever reader is passed; tests make it deterministic with
// testing/cryptotest.SetGlobalRandom.
func GenerateKey(a Algorithm) (crypto.Signer, error) {
	switch a {
	case ECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case ECDSAP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case RSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case RSA3072:
		return rsa.GenerateKey(rand.Reader, 3072)
	case RSA4096:
		return rsa.GenerateKey(rand.Reader, 4096)
	}
	return nil, fmt.Errorf("generating key: unknown algorithm %q", a)
}

// Spec is what a certificate says about its subject: the fields kubeadm's
// certificate list sets. Validity and the issuer are supplied when signing.
type Spec struct {
	CommonName   string
	Organization []string
	DNSNames     []string
	IPs          []net.IP
	Usages       []x509.ExtKeyUsage
}

// Pair is a certificate with its private key.
type Pair struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// NewCA makes a self-signed CA the way kubeadm does: the CommonName doubles
// as a DNS SAN, and the key usages include KeyEncipherment even for ECDSA,
// which is harmless and keeps the certificates identical in shape.
// serial comes from NewSerial; callers draw serials in a fixed order so that
// a seeded source gives the same certificates even when keys are made in
// parallel.
func NewCA(a Algorithm, commonName string, now time.Time, validity time.Duration, serial *big.Int) (Pair, error) {
	key, err := GenerateKey(a)
	if err != nil {
		return Pair{}, err
	}
	// kubeadm backdates CA certificates too (certlist.go sets NotBefore for every entry).
	notBefore := now.UTC().Add(-Backdate)
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName},
		DNSNames:              []string{commonName},
		NotBefore:             notBefore,
		NotAfter:              now.UTC().Add(validity),
		KeyUsage:              x509.KeyUsageKeyEncipherment | x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return Pair{}, fmt.Errorf("signing CA %q: %w", commonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return Pair{}, fmt.Errorf("parsing CA %q: %w", commonName, err)
	}
	return Pair{Cert: cert, Key: key}, nil
}

// Sign issues a leaf certificate for spec from ca with a fresh key of algorithm a.
func Sign(ca Pair, a Algorithm, spec Spec, notBefore, notAfter time.Time, serial *big.Int) (Pair, error) {
	if spec.CommonName == "" {
		return Pair{}, fmt.Errorf("signing certificate: empty common name")
	}
	if len(spec.Usages) == 0 {
		return Pair{}, fmt.Errorf("signing %q: no extended key usage", spec.CommonName)
	}
	key, err := GenerateKey(a)
	if err != nil {
		return Pair{}, err
	}
	// kubeadm's RemoveDuplicateAltNames: the endpoint is often also the
	// node address, and a SAN need not be listed twice.
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: spec.CommonName, Organization: spec.Organization},
		DNSNames:     dedupe(spec.DNSNames),
		IPAddresses:  dedupeIPs(spec.IPs),
		NotBefore:    notBefore.UTC(),
		NotAfter:     notAfter.UTC(),
		// KeyEncipherment matches kubeadm's NewSignedCert for every key type.
		KeyUsage:              x509.KeyUsageKeyEncipherment | x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           spec.Usages,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return Pair{}, fmt.Errorf("signing %q: %w", spec.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return Pair{}, fmt.Errorf("parsing %q: %w", spec.CommonName, err)
	}
	return Pair{Cert: cert, Key: key}, nil
}

// NewSerial returns a random positive 128-bit serial, as RFC 5280 allows and
// mkcert does; kubeadm's 63-bit serials are a subset of these.
func NewSerial(r io.Reader) (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	n, err := rand.Int(r, limit)
	if err != nil {
		return nil, fmt.Errorf("drawing serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

// Matches reports whether cert was issued for spec: same subject, SANs and
// extended key usages. Order of SANs does not matter.
func Matches(cert *x509.Certificate, spec Spec) bool {
	if cert.Subject.CommonName != spec.CommonName || !sameStrings(cert.Subject.Organization, spec.Organization) {
		return false
	}
	if !sameStrings(dedupe(cert.DNSNames), dedupe(spec.DNSNames)) {
		return false
	}
	var got, want []string
	for _, ip := range cert.IPAddresses {
		got = append(got, ip.String())
	}
	for _, ip := range spec.IPs {
		want = append(want, ip.String())
	}
	if !sameStrings(dedupe(got), dedupe(want)) {
		return false
	}
	return slices.Equal(cert.ExtKeyUsage, spec.Usages)
}

func dedupeIPs(ips []net.IP) []net.IP {
	var out []net.IP
	for _, ip := range ips {
		if !slices.ContainsFunc(out, ip.Equal) {
			out = append(out, ip)
		}
	}
	return out
}

func sameStrings(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

func dedupe(s []string) []string {
	var out []string
	for _, v := range s {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

// EncodeCert returns cert as a PEM block.
func EncodeCert(cert *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: certutil.CertificateBlockType, Bytes: cert.Raw})
}

// EncodeKey returns key in the PEM form kubeadm writes (PKCS#1 for RSA, SEC 1 for ECDSA).
func EncodeKey(key crypto.Signer) ([]byte, error) {
	b, err := keyutil.MarshalPrivateKeyToPEM(key)
	if err != nil {
		return nil, fmt.Errorf("encoding private key: %w", err)
	}
	return b, nil
}

// EncodePublicKey returns the PKIX PEM form kubeadm uses for sa.pub.
func EncodePublicKey(key crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding public key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// ParseCert reads the first certificate of a PEM file.
func ParseCert(pemBytes []byte) (*x509.Certificate, error) {
	certs, err := certutil.ParseCertsPEM(pemBytes)
	if err != nil {
		return nil, fmt.Errorf("parsing certificate: %w", err)
	}
	return certs[0], nil
}

// ParseKey reads an RSA or ECDSA private key from PEM.
func ParseKey(pemBytes []byte) (crypto.Signer, error) {
	k, err := keyutil.ParsePrivateKeyPEM(pemBytes)
	if err != nil {
		return nil, fmt.Errorf("parsing private key: %w", err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("parsing private key: %T cannot sign", k)
	}
	return s, nil
}

// KeyMatches reports whether key is the private half of cert's public key.
func KeyMatches(cert *x509.Certificate, key crypto.Signer) bool {
	pub, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return false
	}
	certPub, err := x509.MarshalPKIXPublicKey(cert.PublicKey)
	return err == nil && bytes.Equal(pub, certPub)
}

// AlgorithmOf reports the algorithm of key, or "" if it is not one of ours.
func AlgorithmOf(key crypto.PublicKey) Algorithm {
	switch k := key.(type) {
	case *rsa.PublicKey:
		switch k.N.BitLen() {
		case 2048:
			return RSA2048
		case 3072:
			return RSA3072
		case 4096:
			return RSA4096
		}
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return ECDSAP256
		case elliptic.P384():
			return ECDSAP384
		}
	}
	return ""
}
