package phases

// This file holds the stacked etcd's membership: the etcd-join phase, which
// lets a control plane whose etcd data is gone rejoin the running cluster,
// and wait-etcd, which waits for quorum and says which members answer.
//
// Every member is known at build time, so a first start needs no member
// add: each etcd starts from the bundle's manifest with the static
// --initial-cluster, as rendered (and kubeadm-identical). A member that ran
// before and lost its data (a reset, a new disk) must not start that way:
// it would come back with the identity of a member the others remember, but
// without the log and votes it acknowledged. kubeadm's etcd join phase
// (cmd/kubeadm/app/phases/etcd/local.go) shows the safe way, done here from
// the other members with the bundle's etcd client certificate: remove the
// stale member, add it back as a learner, start it with
// --initial-cluster-state existing and the cluster's current members, and
// promote it once it has caught up.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"airadm.dev/airadm/atomicfile"
	"airadm.dev/airadm/hostfs"
	"airadm.dev/airadm/render"
)

const (
	etcdManifest = render.ManifestsDir + "/etcd.yaml"
	etcdCA       = render.PKIDir + "/etcd/ca.crt"
	// kubeadm's etcd client (util/etcd NewFromCluster) uses this pair.
	etcdClientCert = render.PKIDir + "/etcd/healthcheck-client.crt"
	etcdClientKey  = render.PKIDir + "/etcd/healthcheck-client.key"
)

// etcdMember is one entry of etcd's --initial-cluster.
type etcdMember struct{ Name, PeerURL string }

// clientURL is the member's client URL: its peer address on etcd's
// client port, as render lays the stacked members out.
func (m etcdMember) clientURL() string {
	u, err := url.Parse(m.PeerURL)
	if err != nil {
		return ""
	}
	return "https://" + net.JoinHostPort(u.Hostname(), "2379")
}

// etcdLayout is what the bundle's etcd manifest says about this member and
// the others.
type etcdLayout struct {
	pod       *corev1.Pod
	name      string
	peerURL   string
	clientURL string
	members   []etcdMember // the static --initial-cluster, in its order
}

// others are the members other than this one.
func (l *etcdLayout) others() []etcdMember {
	return slices.DeleteFunc(slices.Clone(l.members), func(m etcdMember) bool { return m.Name == l.name })
}

// etcdLayoutOf reads the bundle's etcd manifest; nil if it has none.
func etcdLayoutOf(files map[string][]byte) (*etcdLayout, error) {
	b, ok := files[etcdManifest]
	if !ok {
		return nil, nil
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(b, &pod); err != nil {
		return nil, fmt.Errorf("reading %s from the bundle: %w", etcdManifest, err)
	}
	if len(pod.Spec.Containers) != 1 {
		return nil, fmt.Errorf("reading %s from the bundle: want one container, found %d", etcdManifest, len(pod.Spec.Containers))
	}
	l := &etcdLayout{pod: &pod}
	for _, a := range pod.Spec.Containers[0].Command {
		k, v, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		switch k {
		case "name":
			l.name = v
		case "initial-advertise-peer-urls":
			l.peerURL = v
		case "advertise-client-urls":
			l.clientURL = v
		case "initial-cluster":
			for _, m := range strings.Split(v, ",") {
				name, peer, _ := strings.Cut(m, "=")
				l.members = append(l.members, etcdMember{name, peer})
			}
		}
	}
	if l.name == "" || l.peerURL == "" || l.clientURL == "" || len(l.members) == 0 {
		return nil, fmt.Errorf("reading %s from the bundle: it lacks --name, --initial-advertise-peer-urls, --advertise-client-urls or --initial-cluster", etcdManifest)
	}
	return l, nil
}

// etcdClient dials endpoints with the bundle's etcd client certificate.
func etcdClient(files map[string][]byte, endpoints []string) (*clientv3.Client, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(files[etcdCA]) {
		return nil, fmt.Errorf("the bundle has no etcd CA at %s", etcdCA)
	}
	cert, err := tls.X509KeyPair(files[etcdClientCert], files[etcdClientKey])
	if err != nil {
		return nil, fmt.Errorf("loading the etcd client certificate %s: %w", etcdClientCert, err)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 2 * time.Second,
		TLS:         &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("connecting to etcd at %s: %w", strings.Join(endpoints, ", "), err)
	}
	return cli, nil
}

// memberDataPresent reports whether this host holds etcd member data.
func (r *Run) memberDataPresent() bool {
	_, err := os.Stat(r.path(render.EtcdDataDir + "/member"))
	return err == nil
}

// bundleEtcd is the bundle's files and etcd layout for the etcd phases; a
// nil layout (the bundle has no etcd manifest) is said in the log, with
// what the phase then has nothing to do.
func (r *Run) bundleEtcd(nothingTo string) (map[string][]byte, *etcdLayout, error) {
	files, err := r.readFiles()
	if err != nil {
		return nil, nil, err
	}
	l, err := etcdLayoutOf(files)
	if err == nil && l == nil {
		r.logf("  the bundle has no etcd manifest: nothing to %s", nothingTo)
	}
	return files, l, err
}

func runEtcdJoin(ctx context.Context, r *Run) error {
	files, l, err := r.bundleEtcd("join")
	if err != nil || l == nil {
		return err
	}
	if len(l.members) == 1 {
		r.logf("  single etcd member %s: it starts from the bundle's manifest", l.name)
		return nil
	}
	if r.memberDataPresent() {
		r.logf("  %s holds member %s's data: etcd restarts with it", render.EtcdDataDir, l.name)
		return nil
	}
	var urls []string
	for _, m := range l.others() {
		urls = append(urls, m.clientURL())
	}
	if r.DryRun {
		r.logf("  would ask the other members (%s) whether %s ran before; if so, remove it, add it back as a learner and start it with --initial-cluster-state existing", strings.Join(urls, ", "), l.name)
		return nil
	}
	cli, err := etcdClient(files, urls)
	if err != nil {
		return err
	}
	defer cli.Close()
	// A short, local (serializable) look: in a first start the others are
	// starting too, and none may answer yet, or they may lack quorum.
	lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	list, err := cli.MemberList(lctx, clientv3.WithSerializable())
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		r.logf("  no other member answers yet: a first start, from the static --initial-cluster (%d members)", len(l.members))
		return nil
	}
	me := findMember(list.Members, l.peerURL)
	switch {
	case me == nil:
		r.logf("  the cluster has no member at %s: adding %s back", l.peerURL, l.name)
	case len(me.ClientURLs) == 0 && me.Name != "":
		// A static member that never started: a first start.
		r.logf("  member %s has not started before: a first start, from the static --initial-cluster", l.name)
		return nil
	case len(me.ClientURLs) == 0:
		r.logf("  member %s (%x) was added back and has not started yet", l.name, me.ID)
	default:
		r.logf("  member %s (%x) ran before and its data is gone: removing it and adding it back", l.name, me.ID)
		if err := r.removeMember(ctx, cli, me.ID); err != nil {
			return err
		}
	}
	members, err := r.addLearner(ctx, cli, l)
	if err != nil {
		return err
	}
	if err := r.writeRejoinManifest(l, members); err != nil {
		return err
	}
	r.logf("  %s rejoins as a learner: etcd starts with --initial-cluster-state existing and the cluster's %d members; wait-etcd promotes it", l.name, len(members))
	return nil
}

func findMember(ms []*etcdserverpb.Member, peerURL string) *etcdserverpb.Member {
	for _, m := range ms {
		if slices.Contains(m.PeerURLs, peerURL) {
			return m
		}
	}
	return nil
}

// removeMember removes member id, retrying while the cluster settles; a
// member already gone is fine.
func (r *Run) removeMember(ctx context.Context, cli *clientv3.Client, id uint64) error {
	return r.poll(ctx, time.Second, func(ctx context.Context) (bool, error) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err := cli.MemberRemove(cctx, id)
		if err == nil || errors.Is(err, rpctypes.ErrMemberNotFound) {
			return true, nil
		}
		return false, fmt.Errorf("removing etcd member %x: %w", id, err)
	})
}

// addLearner adds this member as a learner (or finds it added) and returns
// the cluster's members for its --initial-cluster.
func (r *Run) addLearner(ctx context.Context, cli *clientv3.Client, l *etcdLayout) ([]etcdMember, error) {
	var members []*etcdserverpb.Member
	err := r.poll(ctx, time.Second, func(ctx context.Context) (bool, error) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		list, err := cli.MemberList(cctx)
		if err != nil {
			return false, fmt.Errorf("listing etcd members: %w", err)
		}
		if findMember(list.Members, l.peerURL) != nil {
			members = list.Members
			return true, nil
		}
		resp, err := cli.MemberAddAsLearner(cctx, []string{l.peerURL})
		if err != nil {
			return false, fmt.Errorf("adding etcd member %s: %w", l.name, err)
		}
		members = resp.Members
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	var out []etcdMember
	for _, m := range members {
		switch {
		case slices.Contains(m.PeerURLs, l.peerURL):
			out = append(out, etcdMember{l.name, l.peerURL})
		case m.Name != "" && len(m.PeerURLs) > 0:
			out = append(out, etcdMember{m.Name, m.PeerURLs[0]})
		}
		// Another member added but never started has no name yet; like
		// kubeadm, leave it out: it is not needed to join.
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// writeRejoinManifest writes the bundle's etcd manifest with the
// cluster's current members and --initial-cluster-state existing, as
// kubeadm's join writes it; everything else stays as rendered.
func (r *Run) writeRejoinManifest(l *etcdLayout, members []etcdMember) error {
	pod := l.pod.DeepCopy()
	var cluster []string
	for _, m := range members {
		cluster = append(cluster, m.Name+"="+m.PeerURL)
	}
	var cmd []string
	for _, a := range pod.Spec.Containers[0].Command {
		switch {
		case strings.HasPrefix(a, "--initial-cluster-state="):
			continue
		case strings.HasPrefix(a, "--initial-cluster="):
			cmd = append(cmd, "--initial-cluster="+strings.Join(cluster, ","), "--initial-cluster-state=existing")
		default:
			cmd = append(cmd, a)
		}
	}
	pod.Spec.Containers[0].Command = cmd
	b, err := yaml.Marshal(pod)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(r.path(etcdManifest), b, 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", etcdManifest, err)
	}
	return nil
}

// memberStatus is one member's answer to a status call.
type memberStatus struct {
	m    etcdMember
	resp *clientv3.StatusResponse
	err  error
}

// etcdStatuses asks every member for its status at once, each briefly.
func etcdStatuses(ctx context.Context, cli *clientv3.Client, members []etcdMember) []memberStatus {
	out := make([]memberStatus, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			resp, err := cli.Status(sctx, m.clientURL())
			out[i] = memberStatus{m, resp, err}
		}()
	}
	wg.Wait()
	return out
}

// describe says which members answer and which leader they follow.
func describeStatuses(st []memberStatus) (answering []string, summary string) {
	var silent []string
	names := map[uint64]string{}
	var leader uint64
	for _, s := range st {
		if s.err != nil {
			silent = append(silent, s.m.Name)
			continue
		}
		answering = append(answering, s.m.Name)
		names[s.resp.Header.GetMemberId()] = s.m.Name
		if s.resp.Leader != 0 {
			leader = s.resp.Leader
		}
	}
	parts := []string{}
	switch len(answering) {
	case 0:
	case 1:
		parts = append(parts, answering[0]+" answers")
	default:
		parts = append(parts, strings.Join(answering, ", ")+" answer")
	}
	if leader != 0 {
		name := names[leader]
		if name == "" {
			name = fmt.Sprintf("%x", leader)
		}
		parts = append(parts, "leader "+name)
	}
	if len(silent) > 0 {
		parts = append(parts, strings.Join(silent, ", ")+" not (yet)")
	}
	return answering, strings.Join(parts, "; ")
}

func runWaitEtcd(ctx context.Context, r *Run) error {
	files, l, err := r.bundleEtcd("wait for")
	if err != nil || l == nil {
		return err
	}
	quorum := len(l.members)/2 + 1
	if r.DryRun {
		r.logf("  would wait up to %v for member %s to answer with a quorum (%d of %d members: %s)", r.Timeout, l.name, quorum, len(l.members), memberNames(l.members))
		return nil
	}
	var urls []string
	for _, m := range l.members {
		urls = append(urls, m.clientURL())
	}
	cli, err := etcdClient(files, urls)
	if err != nil {
		return err
	}
	defer cli.Close()
	local, err := etcdClient(files, []string{l.clientURL})
	if err != nil {
		return err
	}
	defer local.Close()
	start := time.Now()
	r.logf("  waiting for member %s and a quorum of %d of %d (%s)", l.name, quorum, len(l.members), memberNames(l.members))
	last, summary := "", ""
	promoted := false
	err = r.poll(ctx, 500*time.Millisecond, func(ctx context.Context) (bool, error) {
		st := etcdStatuses(ctx, cli, l.members)
		_, summary = describeStatuses(st)
		if summary != last && len(l.members) > 1 {
			r.logf("  etcd: %s", summary)
			last = summary
		}
		if r.Progress != nil {
			r.Progress("etcd: " + summary)
		}
		var mine memberStatus
		for _, s := range st {
			if s.m.Name == l.name {
				mine = s
			}
		}
		if mine.err != nil {
			return false, fmt.Errorf("member %s does not answer: %w", l.name, mine.err)
		}
		if mine.resp.IsLearner {
			// Promotion succeeds once the learner has caught up with the leader.
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			if _, err := cli.MemberPromote(pctx, mine.resp.Header.GetMemberId()); err != nil {
				return false, fmt.Errorf("promoting learner %s: %w", l.name, err)
			}
			promoted = true
			r.logf("  promoted %s from learner to voting member", l.name)
		}
		// A linearizable read through this member needs a quorum, as
		// etcdctl endpoint health does it.
		gctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err := local.Get(gctx, "health")
		if err != nil && !errors.Is(err, rpctypes.ErrPermissionDenied) {
			return false, fmt.Errorf("member %s has no quorum: %w", l.name, err)
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("waiting for etcd quorum (%d of %d members: %s): %s: %w; apply the other control planes' bundles, or see their etcd logs", quorum, len(l.members), memberNames(l.members), summary, err)
	}
	if promoted {
		r.logf("  %s rejoined", l.name)
	}
	r.logf("  etcd quorum after %v: %s", time.Since(start).Round(10*time.Millisecond), summary)
	return nil
}

func memberNames(ms []etcdMember) string {
	var names []string
	for _, m := range ms {
		names = append(names, m.Name)
	}
	return strings.Join(names, ", ")
}

// leaveEtcd removes this host's etcd member from the cluster, as kubeadm
// reset does (RemoveStackedEtcdMemberFromCluster), so that the others do
// not count a member that is gone. Best effort: the other members may be
// down too, and a member left behind is removed and re-added by the next
// apply's etcd-join anyway. It says what it did.
func leaveEtcd(ctx context.Context, root string, logf func(string, ...any)) {
	files := map[string][]byte{}
	for _, p := range []string{etcdManifest, etcdCA, etcdClientCert, etcdClientKey} {
		b, err := os.ReadFile(hostfs.Path(root, p))
		if err != nil {
			return // not a stacked etcd member, or already reset
		}
		files[p] = b
	}
	l, err := etcdLayoutOf(files)
	if err != nil || l == nil || len(l.members) == 1 {
		return
	}
	var urls []string
	for _, m := range l.others() {
		urls = append(urls, m.clientURL())
	}
	cli, err := etcdClient(files, urls)
	if err != nil {
		logf("left etcd member %s in the cluster: %v (the next apply replaces it)", l.name, err)
		return
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	list, err := cli.MemberList(ctx)
	if err == nil {
		me := findMember(list.Members, l.peerURL)
		if me == nil {
			logf("etcd member %s is no longer in the cluster", l.name)
			return
		}
		if _, err = cli.MemberRemove(ctx, me.ID); err == nil {
			logf("removed etcd member %s (%x) from the cluster", l.name, me.ID)
			return
		}
	}
	logf("left etcd member %s in the cluster: %v (the next apply replaces it)", l.name, err)
}
