// Package vmimage builds and caches the Debian guest that the VM end-to-end
// test boots: a minimal bookworm from Debian's own packages (mmdebstrap),
// its root filesystem written into an ext4 image by mkfs.ext4 -d (nothing
// is mounted), and its kernel and initrd set beside it for QEMU's direct
// kernel boot. The image holds no containerd, no kubelet and no airadm:
// the node's bundle brings those.
//
// An image lives in $AIRADM_CACHE (default airadm/ under the user cache
// directory), under vm/<key>, where key is a digest of the Config: a
// change to the package list or the hooks builds a new image beside the
// old one instead of reusing it.
package vmimage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Config says what goes into the image.
type Config struct {
	// Suite is the Debian release, Mirror the archive to fetch it from.
	Suite  string
	Mirror string
	// Packages are installed on top of mmdebstrap's minbase variant
	// (essential packages and apt).
	Packages []string
	// Hooks are mmdebstrap --customize-hook commands, run with the root
	// directory as "$1" once the packages are in.
	Hooks []string
	// SizeMiB is the root filesystem's size: the bundle is unpacked
	// into it (containerd's content, images, binaries).
	SizeMiB int
}

// Default is the guest of the VM end-to-end test: a Debian 12 host as an
// operator would provision it, with nothing of Kubernetes on it.
//
//   - systemd-sysv, udev, kmod: real systemd as PID 1, device names and
//     module loading (airadm's runtime phase loads overlay and
//     br_netfilter with modprobe).
//   - linux-image-cloud-amd64: Debian's kernel for virtual machines, with
//     virtio, iso9660 and the netfilter modules kubelet's networking uses.
//   - cloud-init: runs the seed. iproute2: its network renderer and ip.
//   - mount: mount and umount, which the seed's user-data and kubelet call.
//   - libseccomp2: Debian's runc, which the bundle carries, links it.
//
// The hooks enable systemd-networkd (Debian ships it disabled; cloud-init
// writes its static address as a networkd file) and give the guest an
// empty /etc/resolv.conf, which kubelet reads for every pod's DNS config,
// and the /etc/hosts every installed Debian has.
func Default() Config {
	return Config{
		Suite:  "bookworm",
		Mirror: "http://deb.debian.org/debian",
		Packages: []string{
			"systemd-sysv", "udev", "kmod", "linux-image-cloud-amd64", "cloud-init", "iproute2",
			"mount", "libseccomp2",
		},
		Hooks: []string{
			`chroot "$1" systemctl enable systemd-networkd`,
			`rm -f "$1/etc/resolv.conf" && printf '# no name servers: the node needs none\n' >"$1/etc/resolv.conf"`,
			// What the Debian installer writes; minbase has none, and
			// containerd copies it into every pod sandbox.
			`printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' >"$1/etc/hosts"`,
		},
		SizeMiB: 4096,
	}
}

// Key is the digest of everything that shapes the image except the
// mirror, which serves the same packages from anywhere.
func (c Config) Key() string {
	pkgs := append([]string(nil), c.Packages...)
	sort.Strings(pkgs)
	var b strings.Builder
	fmt.Fprintf(&b, "format 1\nsuite %s\nvariant minbase\nsize %d\n", c.Suite, c.SizeMiB)
	for _, p := range pkgs {
		fmt.Fprintf(&b, "package %s\n", p)
	}
	for _, h := range c.Hooks {
		fmt.Fprintf(&b, "hook %q\n", h)
	}
	sum := sha256.Sum256([]byte(b.String()))
	return c.Suite + "-" + hex.EncodeToString(sum[:8])
}

// Image is a built guest.
type Image struct {
	Dir    string
	Kernel string // vmlinuz, for qemu -kernel
	Initrd string // initrd.img, for qemu -initrd
	Root   string // root.img: ext4, the whole disk (root=/dev/vda)
}

func imageIn(dir string) Image {
	return Image{Dir: dir, Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Root: filepath.Join(dir, "root.img")}
}

// Base is the directory images are cached under: $AIRADM_CACHE, or airadm/
// under the user cache directory, then vm/.
func Base() (string, error) {
	base := os.Getenv("AIRADM_CACHE")
	if base == "" {
		c, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("locating cache: %w", err)
		}
		base = filepath.Join(c, "airadm")
	}
	return filepath.Join(base, "vm"), nil
}

// Tools are the programs a build runs, with the Debian packages that have
// them.
var Tools = []struct{ Name, Package string }{
	{"mmdebstrap", "mmdebstrap"},
	{"mkfs.ext4", "e2fsprogs"},
}

// Ensure returns the cached image for c, building it first if it is
// missing (about 80 s with a fast mirror; much longer on a loaded
// machine). log gets mmdebstrap's output. A build runs in a hidden
// directory beside the cache entry and is renamed into place only when
// complete, so an interrupted build leaves no image behind.
func Ensure(ctx context.Context, c Config, log io.Writer) (Image, error) {
	base, err := Base()
	if err != nil {
		return Image{}, err
	}
	img := imageIn(filepath.Join(base, c.Key()))
	if complete(img) {
		return img, nil
	}
	if os.Geteuid() != 0 {
		return Image{}, errors.New("building the VM image: mmdebstrap and mkfs.ext4 -d must run as root, to give the guest's files their owners")
	}
	for _, t := range Tools {
		if _, err := exec.LookPath(t.Name); err != nil {
			return Image{}, fmt.Errorf("building the VM image: %s is missing: apt-get install %s (./hack/test installs it)", t.Name, t.Package)
		}
	}
	if err := os.MkdirAll(base, 0o755); err != nil {
		return Image{}, fmt.Errorf("creating %s: %w", base, err)
	}
	tmp, err := os.MkdirTemp(base, ".build-")
	if err != nil {
		return Image{}, fmt.Errorf("building the VM image: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := build(ctx, c, tmp, log); err != nil {
		return Image{}, fmt.Errorf("building the VM image %s: %w", c.Key(), err)
	}
	if err := os.Rename(tmp, img.Dir); err != nil {
		if complete(img) { // another build finished first
			return img, nil
		}
		return Image{}, fmt.Errorf("installing the VM image: %w", err)
	}
	return img, nil
}

func complete(img Image) bool {
	for _, p := range []string{img.Kernel, img.Initrd, img.Root} {
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			return false
		}
	}
	return true
}

func build(ctx context.Context, c Config, dir string, log io.Writer) error {
	root := filepath.Join(dir, "rootfs")
	args := []string{"--variant=minbase", "--include=" + strings.Join(c.Packages, ",")}
	for _, h := range c.Hooks {
		args = append(args, "--customize-hook="+h)
	}
	args = append(args, c.Suite, root, c.Mirror)
	fmt.Fprintf(log, "vmimage: mmdebstrap %s\n", strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mmdebstrap: %w", err)
	}
	img := imageIn(dir)
	for _, f := range []struct{ glob, to string }{{"vmlinuz-*", img.Kernel}, {"initrd.img-*", img.Initrd}} {
		found, _ := filepath.Glob(filepath.Join(root, "boot", f.glob))
		if len(found) != 1 {
			return fmt.Errorf("finding the guest's /boot/%s: found %d, want 1", f.glob, len(found))
		}
		if err := copyFile(found[0], f.to); err != nil {
			return err
		}
	}
	fmt.Fprintf(log, "vmimage: mkfs.ext4 -d %s %s (%d MiB)\n", root, img.Root, c.SizeMiB)
	mkfs := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "root", "-d", root, img.Root, fmt.Sprintf("%dM", c.SizeMiB))
	mkfs.Stdout, mkfs.Stderr = log, log
	if err := mkfs.Run(); err != nil {
		return fmt.Errorf("mkfs.ext4 -d: %w", err)
	}
	if err := os.RemoveAll(root); err != nil {
		return fmt.Errorf("removing the guest's tree: %w", err)
	}
	return os.WriteFile(filepath.Join(dir, "config"), []byte(fmt.Sprintf("%+v\n", c)), 0o644)
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return fmt.Errorf("copying %s: %w", from, err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("copying %s: %w", from, err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copying %s: %w", from, err)
	}
	return out.Close()
}
