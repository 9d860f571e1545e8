#!/usr/bin/env bash
# Runs one command inside the guest tools root (scripts/guest-tools-root.sh), with the host's
# directories it needs bind-mounted, in a private mount namespace that ends with it.
#
#   scripts/guest-tools-run.sh ROOT -- CMD [ARG...]
#
# Bind-mounted at the same paths: /dev, /proc, /sys, and the directory of every absolute path
# found in the arguments (alone or after `=`, `:` or `,`, as in `-drive file=/x/y.qcow2,...`),
# except system directories, which the root has its own of. Set GUEST_TOOLS_BIND to a
# colon-separated list of more directories. VIRTIO_WIN (a virtio-win ISO or directory) is bound
# at /run/hyper2kvm-virtio-win.{iso,d} in the root and VIRTIO_WIN set to that path.
#
# The environment passes through, with LIBGUESTFS_BACKEND=direct (no libvirtd in the root) and,
# when KVM is not usable, LIBGUESTFS_BACKEND_SETTINGS=force_tcg. "Usable" is tried, not assumed:
# /dev/kvm can exist and Debian 12's qemu still abort on it ("failed to set MSR 0x10a"). The
# answer is remembered in the root for the host's boot (ROOT/.kvm-<boot id>).
set -euo pipefail

[ $# -ge 3 ] && [ "$2" = "--" ] || { echo "usage: $0 ROOT -- CMD [ARG...]" >&2; exit 2; }
root=$(realpath "$1")
shift 2
[ -e "$root/.complete" ] || { echo "guest-tools-run: $root is not a finished guest tools root" >&2; exit 2; }

if [ -z "${GUEST_TOOLS_IN_NS:-}" ]; then
    export GUEST_TOOLS_IN_NS=1
    exec unshare --mount --propagation private "$0" "$root" -- "$@"
fi

bind() {
    local src=$1
    case "$src" in
        /|/usr|/usr/*|/lib|/lib/*|/lib64|/lib64/*|/bin|/bin/*|/sbin|/sbin/*|/etc|/etc/*|/boot|/boot/*|/var|/var/lib|/var/lib/dpkg*|/proc*|/sys*|/dev*) return 0 ;;
    esac
    [ -d "$src" ] || return 0
    mkdir -p "$root$src"
    mountpoint -q "$root$src" || mount --bind "$src" "$root$src"
}

for m in dev proc sys; do
    mountpoint -q "$root/$m" || mount --rbind "/$m" "$root/$m"
done
for arg in "$@"; do
    IFS=',=:' read -r -a parts <<<"$arg"
    for p in "${parts[@]}"; do
        case "$p" in
            /*) if [ -d "$p" ]; then bind "$p"; else bind "$(dirname "$p")"; fi ;;
        esac
    done
done
IFS=':' read -r -a extra <<<"${GUEST_TOOLS_BIND:-}"
for d in "${extra[@]}"; do [ -n "$d" ] && bind "$d"; done

# VIRTIO_WIN (virt-v2v's virtio-win ISO or directory) is read from the environment, not the
# arguments, and is often under /usr/share, which the root has its own of: it is bound at a
# fixed place in the root and VIRTIO_WIN pointed there.
if [ -n "${VIRTIO_WIN:-}" ]; then
    case "$VIRTIO_WIN" in
        /*) ;;
        *) echo "guest-tools-run: VIRTIO_WIN=$VIRTIO_WIN is not an absolute path" >&2; exit 2 ;;
    esac
    if [ -d "$VIRTIO_WIN" ]; then
        inside=/run/hyper2kvm-virtio-win.d
        mkdir -p "$root$inside"
    elif [ -f "$VIRTIO_WIN" ]; then
        inside=/run/hyper2kvm-virtio-win.iso
        mkdir -p "$root/run"
        [ -f "$root$inside" ] || : >"$root$inside"
    else
        echo "guest-tools-run: VIRTIO_WIN=$VIRTIO_WIN is neither a file nor a directory" >&2; exit 2
    fi
    mountpoint -q "$root$inside" || mount --bind "$VIRTIO_WIN" "$root$inside"
    export VIRTIO_WIN=$inside
fi

export LIBGUESTFS_BACKEND=${LIBGUESTFS_BACKEND:-direct}
if [ -z "${LIBGUESTFS_BACKEND_SETTINGS:-}" ]; then
    boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
    answer=$root/.kvm-$boot_id
    if [ ! -e "$answer" ]; then
        verdict=no
        if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
            # Still running after 3 s: the vCPU started. An abort or error ends it sooner.
            rc=0
            timeout 3 chroot "$root" qemu-system-x86_64 -accel kvm -machine q35 -cpu host -m 64 \
                -display none -nodefaults -no-user-config >/dev/null 2>&1 || rc=$?
            [ "$rc" = 124 ] && verdict=yes
        fi
        echo "$verdict" >"$answer"
    fi
    [ "$(cat "$answer")" = yes ] || export LIBGUESTFS_BACKEND_SETTINGS=force_tcg
fi
cd /
exec chroot "$root" "$@"
