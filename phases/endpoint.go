package phases

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"time"

	"k8s.io/client-go/tools/clientcmd"

	"airadm.dev/airadm/render"
)

// checkEndpoint, on a control plane: the control-plane endpoint (the
// operator's load balancer, a VIP, or the first control plane) must
// resolve, since every kubeconfig and the workers use it. That it does not
// answer yet is only a warning: while the first control planes come up,
// nothing behind it listens, and a VIP may be served by a static pod this
// very apply starts.
func checkEndpoint(r *Run, files map[string][]byte) ([]string, error) {
	if r.Manifest.Role != string(render.ControlPlane) {
		return nil, skipped("workers reach the endpoint in the kubelet phase")
	}
	if r.DryRun {
		return nil, skipped("dry run")
	}
	server, err := endpointOf(files)
	if err != nil {
		return nil, err
	}
	host, port, err := net.SplitHostPort(server)
	if err != nil {
		return nil, fmt.Errorf("control-plane endpoint %q: %w", server, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := netip.ParseAddr(host); err != nil {
		addrs, err := net.DefaultResolver.LookupHost(ctx, host)
		if err != nil {
			return nil, fmt.Errorf("control-plane endpoint %s does not resolve (%v): add it to DNS or /etc/hosts", host, err)
		}
		host = addrs[0]
	}
	d := net.Dialer{Timeout: time.Second}
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, port))
	if err != nil {
		return []string{fmt.Sprintf("control-plane endpoint %s does not answer yet (%v); expected until the first control plane's apiserver is up behind it", server, err)}, nil
	}
	c.Close()
	return nil, nil
}

// endpointOf is the host:port of the control-plane endpoint, as the
// bundle's admin.conf names it.
func endpointOf(files map[string][]byte) (string, error) {
	admin, err := clientcmd.Load(files[render.KubernetesDir+"/admin.conf"])
	if err != nil {
		return "", fmt.Errorf("reading admin.conf from the bundle: %w", err)
	}
	for _, c := range admin.Clusters {
		u, err := url.Parse(c.Server)
		if err != nil {
			return "", fmt.Errorf("reading admin.conf from the bundle: server %q: %w", c.Server, err)
		}
		return u.Host, nil
	}
	return "", fmt.Errorf("admin.conf in the bundle names no cluster")
}
