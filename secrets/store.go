// Package secrets keeps a cluster's secret state in the secrets/ directory
// beside cluster.toml: the three CAs, the service-account key, each
// control-plane node's issued leaves and each worker's bootstrap token.
// Material is created on first use and reused afterwards, so that repeated
// builds give the same bytes and a node added later is issued from the same
// CAs. CAs and the service-account key are never regenerated.
//
// Layout (modes in brackets):
//
//	secrets/                       [0700]
//	  .lock                        [0600] held with flock for the whole run
//	  pki/ca.{crt,key}             [0644, 0600]  and front-proxy-ca, etcd/ca
//	  pki/sa.key                   [0600]
//	  nodes/<node>/<leaf>.{crt,key}[0644, 0600]
//	  tokens/<node>.token          [0600] "id.secret"
package secrets

import (
	"crypto"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"
	bootstrapapi "k8s.io/cluster-bootstrap/token/api"
	bootstraputil "k8s.io/cluster-bootstrap/token/util"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/pki"
	"airadm.dev/airadm/render"
)

// Store is an open, locked secrets directory.
type Store struct {
	dir  string
	lock *os.File
	now  func() time.Time
	rand io.Reader
	// Log receives one line per piece of material created; nil discards.
	// Lines name files, never their content.
	Log func(string)
	// RenewAll reissues every leaf, whatever its expiry (build --renew).
	// CAs, the service-account key and tokens are kept.
	RenewAll bool
}

// ErrLocked means another airadm run holds the directory.
var ErrLocked = errors.New("another airadm run is using it")

// Open creates dir if needed (0700) and locks it against concurrent runs.
// now and rand are the clock and randomness every issued item uses.
func Open(dir string, now func() time.Time, random io.Reader) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("opening secrets %s: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("opening secrets %s: %w", dir, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("locking secrets %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("locking secrets %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("locking secrets %s: %w", dir, err)
	}
	return &Store{dir: dir, lock: f, now: now, rand: random}, nil
}

// Close releases the lock.
func (s *Store) Close() error { return s.lock.Close() }

func (s *Store) logf(format string, args ...any) {
	if s.Log != nil {
		s.Log(fmt.Sprintf(format, args...))
	}
}

// Ensure loads every secret the cluster needs, creating what is missing and
// reissuing a leaf whose subject or SANs no longer match the config (say,
// after extra_sans changed) or that has expired. Keys are generated in
// parallel, one per core, because RSA key generation dominates a build.
func (s *Store) Ensure(c *render.Cluster) (*render.Secrets, error) {
	out := &render.Secrets{
		CAs:    map[render.CA]pki.Pair{},
		Leaves: map[string]map[string]pki.Pair{},
		Tokens: map[string]render.Token{},
	}
	now := s.now()

	var cas []*issue
	for _, ca := range render.CAs() {
		job, err := s.caJob(c, string(ca.CA), ca.CommonName, now)
		if err != nil {
			return nil, err
		}
		cas = append(cas, job)
	}
	var sa crypto.Signer
	saJob, err := s.serviceAccountJob(c, &sa)
	if err != nil {
		return nil, err
	}
	if err := s.run(append(cas, saJob)); err != nil {
		return nil, err
	}
	for i, ca := range render.CAs() {
		out.CAs[ca.CA] = cas[i].pair
	}
	out.ServiceAccountKey = sa

	var leaves []*issue
	for _, n := range c.Nodes {
		if n.Role == render.Worker {
			t, err := s.ensureToken(n.Name)
			if err != nil {
				return nil, err
			}
			out.Tokens[n.Name] = t
			continue
		}
		for _, leaf := range c.Leaves(n) {
			job, err := s.leafJob(c, n, leaf, out.CAs[leaf.CA], now)
			if err != nil {
				return nil, err
			}
			leaves = append(leaves, job)
		}
	}
	if err := s.run(leaves); err != nil {
		return nil, err
	}
	for _, j := range leaves {
		if out.Leaves[j.node] == nil {
			out.Leaves[j.node] = map[string]pki.Pair{}
		}
		out.Leaves[j.node][j.name] = j.pair
	}
	return out, nil
}

// issue is one piece of key material: either loaded (make is nil) or to be
// made by make and written to disk, after which log says so.
type issue struct {
	node, name string
	pair       pki.Pair
	make       func() error
	log        string
}

// run makes the pending items concurrently and logs them in order.
func (s *Store) run(jobs []*issue) error {
	var g errgroup.Group
	g.SetLimit(runtime.GOMAXPROCS(0))
	for _, j := range jobs {
		if j != nil && j.make != nil {
			g.Go(j.make)
		}
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for _, j := range jobs {
		if j != nil && j.make != nil {
			s.logf("%s", j.log)
		}
	}
	return nil
}

func (s *Store) path(parts ...string) string {
	return filepath.Join(append([]string{s.dir}, parts...)...)
}

// loadPair reads base.crt and base.key; ok is false when neither exists.
func loadPair(base string) (p pki.Pair, ok bool, err error) {
	certPEM, cerr := os.ReadFile(base + ".crt")
	keyPEM, kerr := os.ReadFile(base + ".key")
	if errors.Is(cerr, fs.ErrNotExist) && errors.Is(kerr, fs.ErrNotExist) {
		return pki.Pair{}, false, nil
	}
	if cerr != nil {
		return pki.Pair{}, false, fmt.Errorf("reading %s.crt: %w", base, cerr)
	}
	if kerr != nil {
		return pki.Pair{}, false, fmt.Errorf("reading %s.key: %w", base, kerr)
	}
	cert, err := pki.ParseCert(certPEM)
	if err != nil {
		return pki.Pair{}, false, fmt.Errorf("reading %s.crt: %w", base, err)
	}
	key, err := pki.ParseKey(keyPEM)
	if err != nil {
		return pki.Pair{}, false, fmt.Errorf("reading %s.key: %w", base, err)
	}
	if !pki.KeyMatches(cert, key) {
		return pki.Pair{}, false, fmt.Errorf("reading %s.key: it is not the key of %s.crt", base, base)
	}
	return pki.Pair{Cert: cert, Key: key}, true, nil
}

func writePair(base string, p pki.Pair) error {
	if err := os.MkdirAll(filepath.Dir(base), 0o700); err != nil {
		return fmt.Errorf("writing %s: %w", base, err)
	}
	key, err := pki.EncodeKey(p.Key)
	if err != nil {
		return err
	}
	// Key first: a crash between the two leaves a key without a cert,
	// which loadPair reports rather than silently pairing mismatched halves.
	if err := atomicfile.Write(base+".key", key, 0o600); err != nil {
		return err
	}
	return atomicfile.Write(base+".crt", pki.EncodeCert(p.Cert), 0o644)
}

func (s *Store) caJob(c *render.Cluster, base, cn string, now time.Time) (*issue, error) {
	file := s.path("pki", base)
	p, ok, err := loadPair(file)
	if err != nil {
		return nil, err
	}
	if ok {
		if !p.Cert.IsCA {
			return nil, fmt.Errorf("reading %s.crt: not a CA certificate", file)
		}
		if got := pki.AlgorithmOf(p.Cert.PublicKey); got != c.Algorithm {
			return nil, fmt.Errorf("reading %s.crt: its key is %s but pki.algorithm is %s; CAs are never regenerated, so set pki.algorithm = %q or move %s away to start a new cluster", file, orUnknown(got), c.Algorithm, got, s.dir)
		}
		if !now.Add(c.RenewBefore).Before(p.Cert.NotAfter) {
			// Leaves renewed now outlive their CA; only a new cluster helps.
			s.logf("warning: %s.crt expires %s; airadm never regenerates a CA, and certificates it signs are worthless after that", file, p.Cert.NotAfter.UTC().Format(time.RFC3339))
		}
		return &issue{pair: p}, nil
	}
	serial, err := pki.NewSerial(s.rand)
	if err != nil {
		return nil, err
	}
	j := &issue{log: "created " + file + ".crt"}
	j.make = func() error {
		p, err := pki.NewCA(c.Algorithm, cn, now, c.CAValidity, serial)
		if err != nil {
			return err
		}
		j.pair = p
		return writePair(file, p)
	}
	return j, nil
}

func orUnknown(a pki.Algorithm) string {
	if a == "" {
		return "of an unsupported kind"
	}
	return string(a)
}

func (s *Store) serviceAccountJob(c *render.Cluster, key *crypto.Signer) (*issue, error) {
	file := s.path("pki", "sa.key")
	b, err := os.ReadFile(file)
	if err == nil {
		k, err := pki.ParseKey(b)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", file, err)
		}
		*key = k
		return nil, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("reading %s: %w", file, err)
	}
	return &issue{log: "created " + file, make: func() error {
		// kubeadm's CreateServiceAccountKeyAndPublicKeyFiles uses encryptionAlgorithm too.
		k, err := pki.GenerateKey(c.Algorithm)
		if err != nil {
			return err
		}
		pemKey, err := pki.EncodeKey(k)
		if err != nil {
			return err
		}
		*key = k
		return atomicfile.Write(file, pemKey, 0o600)
	}}, nil
}

func (s *Store) leafJob(c *render.Cluster, n render.Node, leaf render.Leaf, ca pki.Pair, now time.Time) (*issue, error) {
	file := s.path("nodes", n.Name, leaf.Name)
	p, ok, err := loadPair(file)
	if err != nil {
		return nil, err
	}
	reason := "created"
	if ok {
		if reason = Renewal(p, leaf.Spec, ca, c.Algorithm, now, c.RenewBefore, s.RenewAll); reason == "" {
			return &issue{node: n.Name, name: leaf.Name, pair: p}, nil
		}
	}
	notBefore := now.Add(-pki.Backdate)
	if leaf.FromCANotBefore {
		notBefore = ca.Cert.NotBefore
	}
	serial, err := pki.NewSerial(s.rand)
	if err != nil {
		return nil, err
	}
	j := &issue{node: n.Name, name: leaf.Name, log: reason + " " + file + ".crt"}
	j.make = func() error {
		p, err := pki.Sign(ca, c.Algorithm, leaf.Spec, notBefore, now.Add(c.CertValidity), serial)
		if err != nil {
			return err
		}
		j.pair = p
		return writePair(file, p)
	}
	return j, nil
}

// Renewal says why a stored leaf must be reissued, or "" if it stays. A
// leaf is reissued when its CA, names or algorithm no longer match the
// config, when it is within renewBefore of its expiry (or past it), or
// always when all is set (`airadm build --renew`). The decision depends only
// on its arguments, so a build at a given clock reading is reproducible.
func Renewal(p pki.Pair, spec pki.Spec, ca pki.Pair, alg pki.Algorithm, now time.Time, renewBefore time.Duration, all bool) string {
	switch {
	case p.Cert.CheckSignatureFrom(ca.Cert) != nil:
		return "reissued (the CA changed)"
	case !pki.Matches(p.Cert, spec):
		return "reissued (names in the config changed)"
	case pki.AlgorithmOf(p.Cert.PublicKey) != alg:
		return "reissued (pki.algorithm changed)"
	case !now.Before(p.Cert.NotAfter):
		return "reissued (expired " + p.Cert.NotAfter.UTC().Format(time.RFC3339) + ")"
	case !now.Add(renewBefore).Before(p.Cert.NotAfter):
		return fmt.Sprintf("renewed (expires %s, within pki.renew_before %s)", p.Cert.NotAfter.UTC().Format(time.RFC3339), renewBefore)
	case all:
		return "renewed (--renew)"
	}
	return ""
}

func (s *Store) ensureToken(node string) (render.Token, error) {
	file := s.path("tokens", node+".token")
	b, err := os.ReadFile(file)
	if err == nil {
		tok := strings.TrimSpace(string(b))
		if !bootstraputil.IsValidBootstrapToken(tok) {
			// The content is a secret, so the message leaves it out.
			return render.Token{}, fmt.Errorf("reading %s: not a bootstrap token of the form [a-z0-9]{6}.[a-z0-9]{16}", file)
		}
		id, secret, _ := strings.Cut(tok, ".")
		return render.Token{ID: id, Secret: secret}, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return render.Token{}, fmt.Errorf("reading %s: %w", file, err)
	}
	id, err := s.randomString(bootstrapapi.BootstrapTokenIDBytes)
	if err != nil {
		return render.Token{}, err
	}
	secret, err := s.randomString(bootstrapapi.BootstrapTokenSecretBytes)
	if err != nil {
		return render.Token{}, err
	}
	t := render.Token{ID: id, Secret: secret}
	if !bootstraputil.IsValidBootstrapToken(t.String()) {
		return render.Token{}, fmt.Errorf("generating bootstrap token: result does not match %s", bootstrapapi.BootstrapTokenPattern)
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return render.Token{}, fmt.Errorf("writing %s: %w", file, err)
	}
	if err := atomicfile.Write(file, []byte(t.String()+"\n"), 0o600); err != nil {
		return render.Token{}, err
	}
	s.logf("created %s", file)
	return t, nil
}

// tokenChars is the alphabet of bootstrap tokens (cluster-bootstrap keeps
// its copy private).
const tokenChars = "0123456789abcdefghijklmnopqrstuvwxyz"

func (s *Store) randomString(n int) (string, error) {
	b := make([]byte, n)
	limit := big.NewInt(int64(len(tokenChars)))
	for i := range b {
		v, err := rand.Int(s.rand, limit)
		if err != nil {
			return "", fmt.Errorf("generating bootstrap token: %w", err)
		}
		b[i] = tokenChars[v.Int64()]
	}
	return string(b), nil
}
