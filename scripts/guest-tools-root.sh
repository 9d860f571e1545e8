#!/usr/bin/env bash
# Builds (once) the Debian 12 root that holds the guest tools, and prints its path.
#
#   scripts/guest-tools-root.sh            print the cached root, building it if needed
#
# Debian 12's qemu-system-x86, libguestfs-tools, virt-v2v (2.2, which ships virt-v2v-in-place)
# and ovmf cannot be installed beside a host's qemu-utils 10 (their dependencies conflict), so
# hyper2kvm's tests and the one-shot commands run them in this root through
# scripts/guest-tools-run.sh. The root also holds:
#   - nbdkit: virt-v2v-in-place needs it and Debian's virt-v2v package does not pull it in;
#   - linux-image-amd64: supermin builds libguestfs' appliance from the root's own kernel and
#     modules, so the root needs one (the host's kernel is not looked at);
#   - lvm2, e2fsprogs, xfsprogs, dosfstools, ntfs-3g: the appliance copies what the root has, and
#     inspection of a root on LVM, XFS, FAT or NTFS needs those tools;
#   - initramfs-tools and zstd: lsinitramfs lists a guest's (zstd-compressed) initramfs.
# It is cached outside the repository keyed by this script's content (so the package list),
# GUEST_TOOLS_CACHE (default /var/cache/hyper2kvm-guesttools).
set -euo pipefail

SUITE=bookworm
MIRROR=${GUEST_TOOLS_MIRROR:-http://deb.debian.org/debian}
CACHE=${GUEST_TOOLS_CACHE:-/var/cache/hyper2kvm-guesttools}
PACKAGES=qemu-system-x86,qemu-utils,libguestfs-tools,virt-v2v,nbdkit,ovmf,linux-image-amd64,lvm2,e2fsprogs,xfsprogs,dosfstools,ntfs-3g,initramfs-tools,zstd,procps

key=$(cat "$0" | sha256sum | cut -c1-12)
root=$CACHE/$SUITE-$key
if [ -e "$root/.complete" ]; then
    echo "$root"
    exit 0
fi

log() { echo "guest-tools-root: $*" >&2; }
mkdir -p "$CACHE"
work=$root.tmp
rm -rf "$work"
log "building $root (debootstrap $SUITE; a few minutes, once)"
# debootstrap alone cannot install these: it does not resolve virtual packages
# (perl-openssl-abi-3), so libguestfs' perl dependencies stay unconfigured. It lays down a
# minimal system; apt installs the rest inside it.
debootstrap --variant=minbase "$SUITE" "$work" "$MIRROR" >&2
unshare --mount --propagation private sh -c '
    set -e
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    mount --rbind /sys "$1/sys"
    cp /etc/resolv.conf "$1/etc/resolv.conf" 2>/dev/null || true
    chroot "$1" apt-get -q update
    DEBIAN_FRONTEND=noninteractive chroot "$1" apt-get -q install -y --no-install-recommends $2
    chroot "$1" apt-get clean
' sh "$work" "$(echo "$PACKAGES" | tr , ' ')" >&2
# supermin reads the kernel to build libguestfs' appliance; Debian installs it 0600.
chmod 0644 "$work"/boot/vmlinuz-*
for tool in virt-inspector virt-v2v-in-place virt-cat qemu-system-x86_64 nbdkit supermin; do
    [ -x "$work/usr/bin/$tool" ] || { log "$tool missing from the root"; exit 1; }
done
touch "$work/.complete"
rm -rf "$root"
mv "$work" "$root"
log "ready: $root"
echo "$root"
