package pki

import (
	"crypto/rand"
	"crypto/x509"
	"net"
	"testing"
	"time"
)

func TestSignMatchesAndDedupes(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	serial, _ := NewSerial(rand.Reader)
	ca, err := NewCA(ECDSAP256, "kubernetes", now, time.Hour, serial)
	if err != nil {
		t.Fatal(err)
	}
	spec := Spec{
		CommonName: "kube-apiserver",
		DNSNames:   []string{"cp1", "kubernetes", "cp1"},
		IPs:        []net.IP{net.ParseIP("10.0.0.11"), net.ParseIP("10.0.0.11").To4()},
		Usages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	serial, _ = NewSerial(rand.Reader)
	leaf, err := Sign(ca, ECDSAP256, spec, now.Add(-Backdate), now.Add(time.Hour), serial)
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.Cert.DNSNames) != 2 || len(leaf.Cert.IPAddresses) != 1 {
		t.Errorf("SANs not deduplicated: %v %v", leaf.Cert.DNSNames, leaf.Cert.IPAddresses)
	}
	if !Matches(leaf.Cert, spec) {
		t.Error("a certificate does not match the spec it was issued for")
	}
	changed := spec
	changed.DNSNames = append([]string{"api.example"}, spec.DNSNames...)
	if Matches(leaf.Cert, changed) {
		t.Error("a certificate matches a spec with another SAN")
	}
	if !KeyMatches(leaf.Cert, leaf.Key) || KeyMatches(leaf.Cert, ca.Key) {
		t.Error("KeyMatches is wrong")
	}
	if serial.Sign() <= 0 || serial.BitLen() > 129 {
		t.Errorf("serial %v is not a positive 128-bit number", serial)
	}
	if _, err := Sign(ca, ECDSAP256, Spec{CommonName: "x"}, now, now, serial); err == nil {
		t.Error("signed a certificate without extended key usage")
	}
}
