package pki

import "testing"

// BenchmarkGenerateKey is the cost that dominates PKI generation.
func BenchmarkGenerateKey(b *testing.B) {
	for _, a := range []Algorithm{RSA2048, ECDSAP256, ECDSAP384} {
		b.Run(string(a), func(b *testing.B) {
			for b.Loop() {
				if _, err := GenerateKey(a); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
