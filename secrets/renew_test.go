package secrets_test

import (
	"crypto/x509"
	"math/big"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"airadm.dev/airadm/internal/clustertest"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
	"airadm.dev/airadm/secrets"
)

// TestRenewal pins the renewal decision at the edges of pki.renew_before
// with a fixed clock.
func TestRenewal(t *testing.T) {
	issued := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ca, err := pki.NewCA(pki.ECDSAP256, "kubernetes", issued, 10*365*24*time.Hour, big.NewInt(1))
	if err != nil {
		t.Fatal(err)
	}
	other, err := pki.NewCA(pki.ECDSAP256, "kubernetes", issued, 10*365*24*time.Hour, big.NewInt(2))
	if err != nil {
		t.Fatal(err)
	}
	spec := pki.Spec{CommonName: "kube-apiserver", DNSNames: []string{"cp1"}, Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	notAfter := issued.Add(365 * 24 * time.Hour)
	leaf, err := pki.Sign(ca, pki.ECDSAP256, spec, issued, notAfter, big.NewInt(3))
	if err != nil {
		t.Fatal(err)
	}
	window := 720 * time.Hour
	moreNames := spec
	moreNames.DNSNames = []string{"cp1", "api.example"}
	for _, tc := range []struct {
		name string
		now  time.Time
		spec pki.Spec
		ca   pki.Pair
		alg  pki.Algorithm
		all  bool
		want string
	}{
		{name: "fresh", now: issued.Add(time.Hour), want: ""},
		{name: "a second before the window", now: notAfter.Add(-window - time.Second), want: ""},
		{name: "at the window's start", now: notAfter.Add(-window), want: "renewed (expires 2027-01-01T00:00:00Z, within pki.renew_before 720h0m0s)"},
		{name: "a second before expiry", now: notAfter.Add(-time.Second), want: "renewed (expires 2027-01-01T00:00:00Z, within pki.renew_before 720h0m0s)"},
		{name: "at expiry", now: notAfter, want: "reissued (expired 2027-01-01T00:00:00Z)"},
		{name: "long expired", now: notAfter.Add(1000 * time.Hour), want: "reissued (expired 2027-01-01T00:00:00Z)"},
		{name: "--renew", now: issued.Add(time.Hour), all: true, want: "renewed (--renew)"},
		{name: "new names", now: issued.Add(time.Hour), spec: moreNames, want: "reissued (names in the config changed)"},
		{name: "another CA", now: issued.Add(time.Hour), ca: other, want: "reissued (the CA changed)"},
		{name: "another algorithm", now: issued.Add(time.Hour), alg: pki.RSA2048, want: "reissued (pki.algorithm changed)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.spec.CommonName == "" {
				tc.spec = spec
			}
			if tc.ca.Cert == nil {
				tc.ca = ca
			}
			if tc.alg == "" {
				tc.alg = pki.ECDSAP256
			}
			if got := secrets.Renewal(leaf, tc.spec, tc.ca, tc.alg, tc.now, window, tc.all); got != tc.want {
				t.Errorf("Renewal = %q, want %q", got, tc.want)
			}
		})
	}
}

func ensureRenew(t *testing.T, dir, config string, now time.Time, all bool) (*render.Secrets, []string) {
	t.Helper()
	c, err := render.Parse("cluster.toml", []byte(config))
	if err != nil {
		t.Fatal(err)
	}
	st, err := secrets.Open(filepath.Join(dir, "secrets"), func() time.Time { return now }, clustertest.Seed(t, 9))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.RenewAll = all
	var log []string
	st.Log = func(l string) { log = append(log, strings.ReplaceAll(l, dir+"/", "")) }
	s, err := st.Ensure(c)
	if err != nil {
		t.Fatal(err)
	}
	return s, log
}

// TestEnsureRenewsEveryLeafInTheWindow: a build inside the window reissues
// every leaf and kubeconfig certificate from the same CAs, keeps the CAs,
// the service-account key and the tokens, and a build right after it
// changes nothing; --renew reissues them all whatever their expiry.
func TestEnsureRenewsEveryLeafInTheWindow(t *testing.T) {
	dir := t.TempDir()
	first, _ := ensureRenew(t, dir, base, clustertest.Now, false)
	oldAfter := first.Leaves["cp1"]["apiserver"].Cert.NotAfter

	// One second before the 30-day window: nothing is renewed.
	early := oldAfter.Add(-720*time.Hour - time.Second)
	if _, log := ensureRenew(t, dir, base, early, false); len(log) != 0 {
		t.Errorf("a build before the window logged %q", log)
	}
	before := snapshot(t, dir)

	now := oldAfter.Add(-720 * time.Hour)
	second, log := ensureRenew(t, dir, base, now, false)
	if len(log) != 12 {
		t.Fatalf("a build in the window logged %d lines, want the 12 leaves: %q", len(log), log)
	}
	for _, l := range log {
		if !strings.HasPrefix(l, "renewed (expires ") || !strings.Contains(l, "within pki.renew_before 720h0m0s) secrets/nodes/cp1/") {
			t.Errorf("unexpected line %q", l)
		}
	}
	after := snapshot(t, dir)
	for path, was := range before {
		if strings.HasPrefix(path, "secrets/nodes/") != (after[path] != was) {
			t.Errorf("%s: changed %v", path, after[path] != was)
		}
	}
	if second.Tokens["w1"] != first.Tokens["w1"] {
		t.Error("the worker's token changed")
	}
	for name, p := range second.Leaves["cp1"] {
		old := first.Leaves["cp1"][name]
		if p.Cert.SerialNumber.Cmp(old.Cert.SerialNumber) == 0 || pki.KeyMatches(p.Cert, old.Key) {
			t.Errorf("%s: same serial or key after renewal", name)
		}
		if want := now.Add(8760 * time.Hour); !p.Cert.NotAfter.Equal(want) {
			t.Errorf("%s: NotAfter %v, want %v", name, p.Cert.NotAfter, want)
		}
		if !pki.Matches(p.Cert, specOf(old.Cert)) {
			t.Errorf("%s: subject or names changed", name)
		}
	}
	if _, log := ensureRenew(t, dir, base, now.Add(time.Minute), false); len(log) != 0 {
		t.Errorf("a build right after renewal logged %q", log)
	}

	third, log := ensureRenew(t, dir, base, now.Add(time.Hour), true)
	if len(log) != 12 || !strings.HasPrefix(log[0], "renewed (--renew) secrets/nodes/cp1/") {
		t.Errorf("--renew logged %q", log)
	}
	if third.CAs[render.ClusterCA].Cert.SerialNumber.Cmp(first.CAs[render.ClusterCA].Cert.SerialNumber) != 0 || third.Tokens["w1"] != first.Tokens["w1"] {
		t.Error("--renew replaced a CA or a token")
	}
}

func specOf(c *x509.Certificate) pki.Spec {
	return pki.Spec{CommonName: c.Subject.CommonName, Organization: c.Subject.Organization, DNSNames: c.DNSNames, IPs: c.IPAddresses, Usages: c.ExtKeyUsage}
}
