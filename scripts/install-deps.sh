#!/usr/bin/env bash
# Installs what building, testing and demonstrating hyper2kvm needs on Debian/Ubuntu, and only
# what is missing: running it again on a ready machine changes nothing and needs no network.
#
#   qemu-img, qemu-io     qemu-utils      (an installed qemu-img, e.g. a newer backport, is kept)
#   virt-xml-validate     libvirt-clients (validates the libvirt domain XML we write)
#   xmllint               libxml2-utils
#   unshare               util-linux      (private mount namespaces in tests)
#   mke2fs, filefrag      e2fsprogs       (small scratch file systems in tests; shared extents)
#   mkfs.xfs              xfsprogs        (a reflinking XFS, loop-mounted, in tests/reflink.rs)
#   mount, umount         mount
#   sfdisk                fdisk           (the real guest fixture's partition table, scripts/guest-fixture.sh)
#   debootstrap           debootstrap     (the guest tools root and the guest fixture)
#   python3               python3         (test fixtures, demo manifest)
#   libvirt.h, pkg-config libvirt-dev     (the virt crate links libvirt)
#   cargo fmt, clippy     rustup components rustfmt and clippy
#
# As root it installs with apt-get; otherwise it prints the exact command to run and exits 1.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

have() { command -v "$1" >/dev/null 2>&1; }

# mke2fs lives in /sbin, which is not on every user's PATH.
have_sbin() { have "$1" || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

packages=()
need() { packages+=("$1"); }

# qemu-utils: never reinstall or downgrade an existing qemu-img (the machine may carry a newer
# backport that apt's package lists do not know about).
if ! have qemu-img; then
    need qemu-utils
elif ! have qemu-io; then
    echo "install-deps: warning: qemu-img is installed but qemu-io is not; leaving qemu-utils alone" >&2
fi
have virt-xml-validate || need libvirt-clients
have xmllint || need libxml2-utils
have unshare || need util-linux
{ have_sbin mke2fs && have_sbin filefrag; } || need e2fsprogs
have_sbin mkfs.xfs || need xfsprogs
have mount || need mount
have_sbin sfdisk || need fdisk
have_sbin debootstrap || need debootstrap
have python3 || need python3
[ -e /usr/include/libvirt/libvirt.h ] || need libvirt-dev
have pkg-config || need pkg-config
# VMware-shaped streamOptimized VMDKs for the reader's tests (Debian's python3 module).
[ -e /usr/lib/python3/dist-packages/VMDKstream.py ] || need python3-vmdkstream

if [ "${#packages[@]}" -gt 0 ]; then
    install_cmd="apt-get install -y --no-install-recommends ${packages[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing packages: ${packages[*]}" >&2
        echo "install-deps: run as root:" >&2
        echo "    apt-get update && DEBIAN_FRONTEND=noninteractive $install_cmd" >&2
        exit 1
    fi
    if ! have apt-get; then
        echo "install-deps: missing packages: ${packages[*]}, and apt-get is not available;" >&2
        echo "install-deps: install the equivalents with your distribution's package manager." >&2
        exit 1
    fi
    echo "install-deps: installing ${packages[*]}"
    # Wait for a dpkg lock held by another apt run instead of failing at once.
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${packages[@]}"
fi

# Rust components used by `make test` (fmt check and clippy).
components=()
cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
if [ "${#components[@]}" -gt 0 ]; then
    if ! have rustup; then
        echo "install-deps: cargo components missing (${components[*]}) and rustup is not available" >&2
        exit 1
    fi
    echo "install-deps: adding Rust components ${components[*]}"
    rustup component add "${components[@]}"
fi

echo "install-deps: all dependencies present"
