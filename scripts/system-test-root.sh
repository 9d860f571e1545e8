#!/usr/bin/env bash
# Builds (once) the Debian root the system test boots with systemd-nspawn, and prints its path.
#
#   scripts/system-test-root.sh            print the cached root, building it if needed
#
# The root is Debian bookworm with systemd, dbus, libvirt-daemon-system, libvirt-clients,
# qemu-system-x86 (libvirt probes it before it defines a qemu domain), ovmf (UEFI firmware
# auto-selection), qemu-utils and acl (setfacl on /var/lib/libvirt/images, as docs/OPERATIONS.md
# tells operators). For guest fixing (docs/GUEST.md) it also holds libguestfs-tools and the
# kernel supermin builds libguestfs' appliance from (linux-image-amd64), so that the test can
# launch the appliance under the shipped unit's sandbox. It is cached outside the repository,
# keyed by the package lists, so later runs reuse it: SYSTEST_CACHE (default
# /var/cache/hyper2kvm-systest).
#
# debootstrap resolves dependencies naively: it does not know that libpam-systemd provides
# logind, which polkitd (wanted by libvirt-daemon-system) needs, so libpam-systemd is named.
# Nor does it resolve virtual packages (perl-openssl-abi-3, wanted by libguestfs-tools' perl
# dependencies): GUEST_PACKAGES are installed by apt inside the root afterwards.
set -euo pipefail

SUITE=bookworm
MIRROR=${SYSTEST_MIRROR:-http://deb.debian.org/debian}
CACHE=${SYSTEST_CACHE:-/var/cache/hyper2kvm-systest}
PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,libvirt-daemon-system,libvirt-clients,qemu-system-x86,ovmf,qemu-utils,iproute2,acl
GUEST_PACKAGES="libguestfs-tools linux-image-amd64"

key=$(printf '%s\n' "$SUITE" "$PACKAGES" "$GUEST_PACKAGES" | sha256sum | cut -c1-12)
root=$CACHE/$SUITE-$key
if [ -x "$root/usr/bin/virsh" ] && [ -e "$root/.complete" ]; then
    echo "$root"
    exit 0
fi

log() { echo "system-test-root: $*" >&2; }
mkdir -p "$CACHE"
work=$root.tmp
rm -rf "$work"
log "building $root (debootstrap $SUITE; about a minute, once)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work" "$MIRROR" >&2
unshare --mount --propagation private sh -c '
    set -e
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    mount --rbind /sys "$1/sys"
    cp /etc/resolv.conf "$1/etc/resolv.conf" 2>/dev/null || true
    chroot "$1" apt-get -q update
    DEBIAN_FRONTEND=noninteractive chroot "$1" apt-get -q install -y --no-install-recommends $2
    chroot "$1" apt-get clean
' sh "$work" "$GUEST_PACKAGES" >&2
[ -x "$work/usr/bin/libguestfs-test-tool" ] || { log "libguestfs-test-tool missing from the root"; exit 1; }

# A container's console: no gettys to wait for, and a known root password is never needed
# because the test enters with nsenter.
chroot "$work" systemctl mask console-getty.service getty@tty1.service systemd-networkd-wait-online.service >&2 || true
echo "hyper2kvm-systest" >"$work/etc/hostname"
touch "$work/.complete"
rm -rf "$root"
mv "$work" "$root"
log "ready: $root"
echo "$root"
