package media

import (
	"fmt"
	"net/netip"
	"strings"

	"airadm.dev/airadm/render"
)

// SeedLabel is the volume label cloud-init's NoCloud datasource looks for.
const SeedLabel = "CIDATA"

// SeedFiles are the three files of a NoCloud seed.
type SeedFiles struct {
	MetaData      []byte
	NetworkConfig []byte
	UserData      []byte
}

// Seed writes node's NoCloud files. The instance-id is derived from the
// bundle's manifest digest: cloud-init runs runcmd once per instance, so a
// new bundle runs airadm again and a reboot with the same one does not.
func Seed(c *render.Cluster, n render.Node, manifestDigest string) SeedFiles {
	meta := fmt.Sprintf("instance-id: %s\nlocal-hostname: %s\n", InstanceID(n, manifestDigest), n.Name)
	return SeedFiles{
		MetaData:      []byte(meta),
		NetworkConfig: networkConfig(c, n),
		UserData:      userData(c, n, manifestDigest),
	}
}

// InstanceID is the cloud-init instance-id of n's seed for the bundle
// whose manifest digest is manifestDigest.
func InstanceID(n render.Node, manifestDigest string) string {
	hexPart := strings.TrimPrefix(manifestDigest, "sha256:")
	if len(hexPart) > 16 {
		hexPart = hexPart[:16]
	}
	return "airadm-" + n.Name + "-" + hexPart
}

// networkConfig is network-config version 2 (netplan's format) with the
// node's static address. cloud-init 22.4's own renderers (networkd, eni)
// name the interface after the ethernets key and ignore match.name, so the
// key is the interface: its name, or a glob ("e*" by default: eth0, ens3,
// enp1s0, the first ethernet of a machine with one), or "*" with a MAC
// match. systemd-networkd and netplan take globs; ifupdown (eni) needs a
// plain name in the node's interface key. The IPv4 default route is
// written as 0.0.0.0/0: cloud-init 22.4 rejects "to: default".
func networkConfig(c *render.Cluster, n render.Node) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by airadm media cidata: node %s of cluster %s.\n", n.Name, c.Name)
	b.WriteString("version: 2\nethernets:\n")
	switch {
	case n.Interface == "":
		b.WriteString("  \"e*\":\n    match:\n      name: \"e*\"\n")
	case strings.Count(n.Interface, ":") == 5:
		fmt.Fprintf(&b, "  \"*\":\n    match:\n      macaddress: %q\n", n.Interface)
	default:
		fmt.Fprintf(&b, "  %q:\n    match:\n      name: %q\n", n.Interface, n.Interface)
	}
	b.WriteString("    dhcp4: false\n    dhcp6: false\n")
	fmt.Fprintf(&b, "    addresses:\n      - %q\n", netip.PrefixFrom(n.Address, n.Prefix).String())
	switch {
	case n.Gateway.Is4():
		fmt.Fprintf(&b, "    routes:\n      - to: \"0.0.0.0/0\"\n        via: %q\n", n.Gateway.String())
	case n.Gateway.Is6():
		// cloud-init 22.4 turns a route to ::/0 into one to ::/64 (a
		// zero prefix reads as unset), so IPv6 uses gateway6.
		fmt.Fprintf(&b, "    gateway6: %q\n", n.Gateway.String())
	}
	if len(n.Nameservers) > 0 {
		b.WriteString("    nameservers:\n      addresses:\n")
		for _, ns := range n.Nameservers {
			fmt.Fprintf(&b, "        - %q\n", ns.String())
		}
	}
	return []byte(b.String())
}

// userData mounts the seed by its label, installs the runner, and runs
// airadm verify and then airadm apply with the manifest digest pinned, so
// the seed's own SHA256SUMS is not what vouches for the bundle. Everything
// goes to /var/log/airadm-install.log and the console; runcmd's exit status
// is apply's, which cloud-init reports in `cloud-init status`.
func userData(c *render.Cluster, n render.Node, digest string) []byte {
	script := fmt.Sprintf(`set -u
seed=/run/airadm/seed
bundle="$seed/%s/%s.bundle"
digest=%s
log=/var/log/airadm-install.log
mkdir -p "$seed"
{
  (
    set -ex
    grep -qs " $seed " /proc/mounts || mount -o ro LABEL=%s "$seed"
    install -m 0755 "$seed/%s" /usr/local/bin/airadm
    airadm=/usr/local/bin/airadm
    "$airadm" verify --manifest-digest "$digest" "$bundle"
    "$airadm" apply --manifest-digest "$digest" "$bundle"
  )
  echo $? >/run/airadm/install.status
} 2>&1 | tee -a "$log" /dev/console
status=$(cat /run/airadm/install.status)
umount "$seed" 2>/dev/null || true
echo "airadm-install: node %s finished with exit status $status" | tee -a "$log" /dev/console
exit "$status"
`, BundleDir, n.Name, digest, SeedLabel, RunnerPath, n.Name)
	var b strings.Builder
	b.WriteString("#cloud-config\n")
	fmt.Fprintf(&b, "# Written by airadm media cidata: node %s (%s) of cluster %s,\n", n.Name, n.Role, c.Name)
	fmt.Fprintf(&b, "# bundle manifest %s.\n", digest)
	b.WriteString("runcmd:\n  - - sh\n    - -c\n    - |\n")
	for _, l := range strings.Split(strings.TrimSuffix(script, "\n"), "\n") {
		b.WriteString("      " + l + "\n")
	}
	return []byte(b.String())
}
