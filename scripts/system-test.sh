#!/usr/bin/env bash
# The system test: hyper2kvm's Debian package on a real systemd, with a real libvirtd.
#
#   scripts/system-test.sh          (make system-test)
#
# It boots a Debian root (scripts/system-test-root.sh, cached) with `systemd-nspawn --boot`,
# installs target/debian/hyper2kvm_*.deb with dpkg -i inside it, and checks what an operator
# does: on the fresh libvirtd (no storage pool), an instance with its queue under /srv and the
# default LIBVIRT_POOL creates the pool 'default' and registers two VMs there; systemctl start
# hyper2kvm@vsphere, a manifest dropped into its queue becomes a qcow2 and
# a libvirt domain in qemu:///system, journalctl shows the job's fields, systemctl stop during a
# conversion leaves no partial file, hyper2kvm.target starts every enabled instance, and
# systemd-analyze verify is clean; libguestfs' appliance (guest fixing) launches under the
# unit's own sandbox. This machine does not run systemd as PID 1, so commands run
# inside the container with `nsenter -t <container PID 1> -a`.
#
# Where the machine cannot do this (not root, no systemd-nspawn or debootstrap and no apt-get to
# install them, no network for the first debootstrap) it prints why and exits 0 when
# SYSTEST_OPTIONAL=1 (as `make test` runs it), 1 otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)
OPTIONAL=${SYSTEST_OPTIONAL:-0}
BOOT_SECONDS=120
JOB_SECONDS=180

say() { printf '\n==> system-test: %s\n' "$*"; }
fail() {
    printf '\nsystem-test: FAILED: %s\n' "$*" >&2
    diagnostics >&2 || true
    exit 1
}
skip() {
    printf 'system-test: skipped: %s\n' "$*" >&2
    [ "$OPTIONAL" = 1 ] && exit 0
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---- can this machine do it? ----
[ "$(id -u)" -eq 0 ] || skip "needs root (systemd-nspawn, mounts, namespaces); run: sudo make system-test"
missing=()
have systemd-nspawn || missing+=(systemd-container)
have debootstrap || missing+=(debootstrap)
have nsenter || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
    have apt-get || skip "needs ${missing[*]} and apt-get is not available to install them"
    say "installing ${missing[*]}"
    # A fresh container or CI image has empty package lists: install alone would find nothing.
    apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null || skip "apt-get update failed (no network to the mirror?)"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends \
        "${missing[@]}" >/dev/null || skip "could not install ${missing[*]}"
fi
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
grep -qw overlay /proc/filesystems || skip "the kernel has no overlay file system for the container's scratch root"

# ---- the root file system and the package ----
say "preparing the Debian root (cached in ${SYSTEST_CACHE:-/var/cache/hyper2kvm-systest})"
base=$(scripts/system-test-root.sh) || skip "could not build the Debian root (no network to the Debian mirror?)"
say "building the package (make deb)"
make --no-print-directory deb >/dev/null
deb=$(ls -t target/debian/hyper2kvm_*.deb | head -n 1)
[ -f "$deb" ] || fail "make deb produced no target/debian/hyper2kvm_*.deb"

# A scratch root per run: the cached root is the read-only lower layer of an overlay.
run=$(mktemp -d /var/tmp/hyper2kvm-systest.XXXXXX)
ct=$run/merged
mkdir -p "$run/upper" "$run/work" "$ct"
mount -t overlay overlay -o "lowerdir=$base,upperdir=$run/upper,workdir=$run/work" "$ct"
nspawn_pid=
cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    umount "$ct" 2>/dev/null || umount -l "$ct" 2>/dev/null || true
    rm -rf "$run"
}
trap cleanup EXIT

# ---- boot ----
cp "$deb" "$ct/root/"
# No /dev/kvm inside, whatever the host has, so that every machine runs the same path: libvirt
# offers only emulation and the daemon must define the domain as type 'qemu' (docs/LIBVIRT.md).
say "booting the container"
systemd-nspawn --boot --register=no --keep-unit --quiet -D "$ct" -M hyper2kvm-systest \
    >"$run/console.log" 2>&1 </dev/null &
nspawn_pid=$!

# The container's PID 1: the descendant of systemd-nspawn whose pid in its own namespace is 1.
container_pid() {
    local todo=("$nspawn_pid") pid child
    while [ "${#todo[@]}" -gt 0 ]; do
        pid=${todo[0]}
        todo=("${todo[@]:1}")
        if [ "$pid" != "$nspawn_pid" ] && awk '/^NSpid:/ { exit !($NF == 1 && NF > 2) }' "/proc/$pid/status" 2>/dev/null; then
            echo "$pid"
            return 0
        fi
        for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do todo+=("$child"); done
    done
    return 1
}
pid1=
for _ in $(seq 1 $((BOOT_SECONDS * 2))); do
    kill -0 "$nspawn_pid" 2>/dev/null || { cat "$run/console.log" >&2; fail "systemd-nspawn exited during boot"; }
    pid1=$(container_pid) && break
    sleep 0.5
done
[ -n "$pid1" ] || fail "no container PID 1 after ${BOOT_SECONDS}s"

# Runs a command inside the container (every namespace of its PID 1, its root and its PATH).
in_ct() { nsenter -t "$pid1" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

diagnostics() {
    [ -n "$pid1" ] || return 0
    echo "---- systemctl --failed"
    in_ct systemctl --no-pager --failed || true
    echo "---- journalctl -u 'hyper2kvm*' (last 80)"
    in_ct journalctl --no-pager -n 80 -u 'hyper2kvm*' || true
    echo "---- journalctl -u libvirtd (last 30)"
    in_ct journalctl --no-pager -n 30 -u libvirtd || true
}

state=
for _ in $(seq 1 $((BOOT_SECONDS * 2))); do
    state=$(in_ct systemctl is-system-running 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    sleep 0.5
done
case $state in running | degraded) ;; *) fail "the container's systemd did not finish booting (state: ${state:-none})" ;; esac
say "container up (PID 1 is $pid1 here; systemd says $state)"

checks=0
check() { checks=$((checks + 1)); printf '  ok %d - %s\n' "$checks" "$*"; }

# wait_for <seconds> <description> <command…>: polls the command until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq 1 $((seconds * 2))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    fail "timed out after ${seconds}s waiting for $what"
}

# ---- install ----
say "dpkg -i $(basename "$deb")"
in_ct dpkg -i "/root/$(basename "$deb")" >"$run/dpkg.log" 2>&1 || { cat "$run/dpkg.log" >&2; fail "dpkg -i failed"; }
in_ct test -x /usr/bin/hyper2kvm || fail "the package did not install /usr/bin/hyper2kvm"
in_ct getent passwd hyper2kvm >/dev/null || fail "the package did not create the hyper2kvm user"
for unit in hyper2kvm.service hyper2kvm@.service hyper2kvm.target; do
    in_ct systemctl cat "$unit" >/dev/null || fail "systemd does not know $unit"
done
check "the package installs the binary, the user and the units"
recommends=$(in_ct dpkg-query -W -f='${Recommends}' hyper2kvm)
for pkg in virt-v2v nbdkit libguestfs-tools qemu-system-x86 ovmf initramfs-tools-core zstd; do
    grep -Eq "(^|, )$pkg(,|$| )" <<<"$recommends" || fail "the package does not recommend $pkg (guest fixing): $recommends"
done
check "the package recommends what guest fixing needs ($recommends)"

verify=$(in_ct systemd-analyze verify hyper2kvm.service hyper2kvm@vsphere.service hyper2kvm.target 2>&1 || true)
[ -z "$verify" ] || fail "systemd-analyze verify is not clean:
$verify"
check "systemd-analyze verify of every unit is clean"
score=$(in_ct systemd-analyze security --no-pager hyper2kvm@vsphere.service 2>/dev/null | tail -n 1 || true)
echo "  systemd-analyze security: ${score:-n/a}"

# ---- guest fixing under the unit's own sandbox ----
# libguestfs' appliance, as guest fixing starts it (supermin builds it from the container's
# kernel and modules, qemu boots it under TCG), run by the shipped hyper2kvm@.service itself:
# the drop-in only replaces what it runs and how long it may take, so every sandbox, device
# and resource setting is the unit file's own. TCG is forced as hyper2kvm forces it where
# KVM is not usable (the container has no /dev/kvm).
say "libguestfs' appliance under hyper2kvm@.service's sandbox (libguestfs-test-tool, TCG)"
mkdir -p "$ct/etc/systemd/system/hyper2kvm@guestfs.service.d"
printf '%s\n' '[Service]' 'Type=oneshot' 'ExecStart=' 'ExecStart=/usr/bin/libguestfs-test-tool' 'Restart=no' \
    'WatchdogSec=0' 'TimeoutStartSec=600' 'Environment=LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg' \
    >"$ct/etc/systemd/system/hyper2kvm@guestfs.service.d/override.conf"
in_ct systemctl daemon-reload
guestfs_started=$(date +%s)
in_ct systemctl start hyper2kvm@guestfs.service 2>/dev/null || true
guestfs_seconds=$(($(date +%s) - guestfs_started))
guestfs_log=$(in_ct journalctl -u hyper2kvm@guestfs.service --no-pager -o cat)
result=$(in_ct systemctl show -P Result hyper2kvm@guestfs.service)
if [ "$result" != success ] || ! grep -q '===== TEST FINISHED OK =====' <<<"$guestfs_log"; then
    printf '%s\n' "$guestfs_log" | tail -n 60 >&2
    fail "libguestfs' appliance did not run under hyper2kvm@.service's sandbox (result: $result)"
fi
# libguestfs reports its qemu's peak resident memory: what MemoryMax must hold per appliance.
maxrss=$(sed -n 's/^libguestfs: qemu maxrss \([0-9]*\)K$/\1/p' <<<"$guestfs_log" | tail -n 1)
check "libguestfs' appliance ran under hyper2kvm@.service's sandbox in ${guestfs_seconds}s (TCG), its qemu at most $((${maxrss:-0} >> 10)) MiB resident"
in_ct test -d "/var/cache/hyper2kvm/.guestfs-$(in_ct id -u hyper2kvm)" ||
    fail "the appliance was not cached in /var/cache/hyper2kvm (LIBGUESTFS_CACHEDIR)"
cache_mib=$(in_ct du -sm /var/cache/hyper2kvm | cut -f1)
check "the appliance is cached in /var/cache/hyper2kvm (${cache_mib} MiB), kept across restarts"

# /dev/kvm reaches the private /dev through the unit's own lines for it. The container has no
# /dev/kvm, so those lines are tried on a device it has, /dev/net/tun, and must be what opens it.
if in_ct test -c /dev/net/tun; then
    kvm_lines=$(grep -E '^[A-Za-z]+=.*/dev/kvm' "$ct/lib/systemd/system/hyper2kvm@.service" | sed 's|/dev/kvm|/dev/net/tun|g')
    [ -n "$kvm_lines" ] || fail "hyper2kvm@.service has no lines for /dev/kvm"
    for variant in with without; do
        mkdir -p "$ct/etc/systemd/system/hyper2kvm@dev$variant.service.d"
        {
            printf '%s\n' '[Service]' 'Type=oneshot' 'ExecStart=' 'Restart=no' 'WatchdogSec=0'
            echo "ExecStart=/bin/sh -c ': <>/dev/net/tun'"
            [ "$variant" = without ] || printf '%s\n' "$kvm_lines"
        } >"$ct/etc/systemd/system/hyper2kvm@dev$variant.service.d/override.conf"
    done
    in_ct systemctl daemon-reload
    in_ct systemctl start hyper2kvm@devwith.service || fail "the unit's /dev/kvm lines do not open the device in its private /dev"
    ! in_ct systemctl start hyper2kvm@devwithout.service 2>/dev/null || fail "a device opened without the unit's lines for it"
    check "the unit's /dev/kvm lines (tried on /dev/net/tun) open that device, and nothing else does"
else
    echo "  (no /dev/net/tun in the container: the unit's /dev/kvm lines were not tried)"
fi

# ---- an instance, configured the way an operator does ----
exports=/var/lib/hyper2kvm/vsphere/exports
in_ct mkdir -p "$exports/web01"
cat >"$ct/etc/hyper2kvm/hyper2kvm-vsphere.conf" <<'EOF'
# written by the system test
LIBVIRT_INTEGRATION=true
LIBVIRT_URI=qemu:///system
LIBVIRT_POOL=vsphere
LIBVIRT_AUTOSTART=true
POLL_INTERVAL=1
SETTLE_SECONDS=1
LOG_LEVEL=info
EOF

# A VMware disk, made here with qemu-img: 64 MiB of a pattern in a 1 GiB streamOptimized VMDK.
scratch=$run/scratch
mkdir -p "$scratch"
python3 - "$scratch/web01.raw" <<'EOF'
import sys
with open(sys.argv[1], "wb") as f:
    f.truncate(1 << 30)
    block = bytes(range(256)) * 4096
    for i in range(64):
        f.seek(i * (16 << 20))
        f.write(block)
EOF
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized "$scratch/web01.raw" "$ct$exports/web01/web01-disk1.vmdk"
chmod 0644 "$ct$exports/web01/web01-disk1.vmdk"

write_manifest() { # <vm name> <vm id> <disk path> <firmware> <file>
    cat >"$5" <<EOF
{
  "manifest_version": "1.0",
  "source": { "provider": "vsphere", "vm_id": "$2", "vm_name": "$1", "export_method": "hypersdk-govc" },
  "vm": { "cpu": 2, "mem_gb": 1, "firmware": "$4", "os_version": "ubuntu64Guest" },
  "disks": [ { "id": "disk-0", "source_format": "vmdk", "local_path": "$3", "disk_type": "boot" } ],
  "nics": [ { "id": "nic-0", "mac": "00:50:56:aa:bb:01", "network": "VM Network" } ]
}
EOF
}

# ---- a fresh host: no storage pool, the default LIBVIRT_POOL, a queue under /srv ----
# What docs/OPERATIONS.md tells an operator: the directories owned by hyper2kvm, a drop-in
# with ReadWritePaths=, write access to /var/lib/libvirt/images, LIBVIRT_POOL left unset. Two
# VMs at once, so that both jobs meet the missing pool at about the same time.
say "a fresh libvirtd without pools, the default LIBVIRT_POOL, a queue under /srv"
pools=$(in_ct virsh -q -c qemu:///system pool-list --all --name | sed '/^$/d')
[ -z "$pools" ] || fail "the fresh libvirtd already has storage pools: $pools"
srv=/srv/hypersdk
in_ct install -d -o hyper2kvm -g hyper2kvm "$srv/queue" "$srv/output" "$srv/exports"
in_ct setfacl -m u:hyper2kvm:rwx /var/lib/libvirt/images
cp "$ct$exports/web01/web01-disk1.vmdk" "$ct$srv/exports/web-disk1.vmdk"
mkdir -p "$ct/etc/systemd/system/hyper2kvm@srv.service.d"
printf '%s\n' '[Unit]' "RequiresMountsFor=$srv" '[Service]' "ReadWritePaths=$srv" \
    >"$ct/etc/systemd/system/hyper2kvm@srv.service.d/override.conf"
printf '%s\n' '# written by the system test' "WATCH_DIR=$srv/queue" "OUTPUT_DIR=$srv/output" \
    "SOURCE_ROOTS=$srv" LIBVIRT_INTEGRATION=true LIBVIRT_URI=qemu:///system POLL_INTERVAL=1 \
    SETTLE_SECONDS=1 >"$ct/etc/hyper2kvm/hyper2kvm-srv.conf"
in_ct systemctl daemon-reload
in_ct systemctl start hyper2kvm@srv.service || fail "systemctl start hyper2kvm@srv failed"
for n in 02 03; do
    write_manifest "Web $n" "vm-1$n" "$srv/exports/web-disk1.vmdk" bios "$scratch/web$n.json"
done
# Both at once: settled together, claimed in one scan (MAX_CONCURRENT is 2).
cp "$scratch/web02.json" "$scratch/web03.json" "$ct$srv/queue/"
for n in 02 03; do
    wait_for "$JOB_SECONDS" "Web $n.qcow2 or Web $n.error" \
        test -e "$ct$srv/output/Web $n.qcow2" -o -e "$ct$srv/output/Web $n.error"
    [ -e "$ct$srv/output/Web $n.qcow2" ] || fail "the job failed on a fresh host: $(cat "$ct$srv/output/Web $n.error")"
done
check "two jobs at once on a host without pools published $srv/output/Web 02.qcow2 and Web 03.qcow2"
pool=$(in_ct virsh -c qemu:///system pool-info default) || fail "no storage pool 'default' after the jobs"
grep -Eq '^State: +running' <<<"$pool" && grep -Eq '^Autostart: +yes' <<<"$pool" ||
    fail "the pool 'default' is not running and autostarted: $pool"
# Into variables, not piped to grep -q: under pipefail, virsh killed by SIGPIPE fails the check.
pool_xml=$(in_ct virsh -c qemu:///system pool-dumpxml default)
grep -q "<path>/var/lib/libvirt/images</path>" <<<"$pool_xml" ||
    fail "the pool 'default' is not at /var/lib/libvirt/images: $pool_xml"
created=$(grep -l '"libvirt_pool_created": *true' "$ct$srv/output/Web 02.json" "$ct$srv/output/Web 03.json" | wc -l)
[ "$created" = 1 ] || fail "exactly one V.json must say it created the pool; $created do"
srv_journal=$(in_ct journalctl -u hyper2kvm@srv.service --no-pager)
grep -q "created libvirt storage pool 'default'" <<<"$srv_journal" || fail "the journal does not say that the pool was created"
# Whether the second job met the pool missing too depends on timing: said, not required.
if grep -q "was defined by another job or host meanwhile" <<<"$srv_journal"; then
    echo "  (both jobs found no pool: the second one's define was refused and it used the first one's)"
fi
check "the pool 'default' was created once, at /var/lib/libvirt/images, running and autostarted; V.json and the journal say so"
vols=$(in_ct virsh -q -c qemu:///system vol-list default)
domains=$(in_ct virsh -q -c qemu:///system list --all --name)
for n in 02 03; do
    grep -qx "web-$n" <<<"$domains" || fail "domain web-$n is not in virsh list --all: $domains"
    grep -q "/var/lib/libvirt/images/Web $n.qcow2" <<<"$vols" || fail "virsh vol-list default does not list Web $n.qcow2: $vols"
    xml=$(in_ct virsh -c qemu:///system dumpxml --inactive "web-$n")
    grep -q "<source file='/var/lib/libvirt/images/Web $n.qcow2'" <<<"$xml" || fail "domain web-$n does not use its disk in the pool: $xml"
done
in_ct qemu-img check -q "/var/lib/libvirt/images/Web 02.qcow2" || fail "qemu-img check of the disk in the pool"
check "web-02 and web-03 are in virsh list --all, their disks in virsh vol-list default"
in_ct systemctl stop hyper2kvm@srv.service

say "systemctl start hyper2kvm@vsphere"
in_ct systemctl start hyper2kvm@vsphere.service || fail "systemctl start hyper2kvm@vsphere failed"
[ "$(in_ct systemctl is-active hyper2kvm@vsphere.service)" = active ] || fail "hyper2kvm@vsphere is not active"
status_text=$(in_ct systemctl show -P StatusText hyper2kvm@vsphere.service)
[ -n "$status_text" ] || fail "hyper2kvm@vsphere has no STATUS= line"
check "hyper2kvm@vsphere is active with the status line \"$status_text\""
queue=/var/lib/hyper2kvm/vsphere/queue
output=/var/lib/hyper2kvm/vsphere/output
in_ct test -d "$queue" || fail "the instance did not create its default queue $queue"

# The daemon runs as the hyper2kvm user, which may not write into libvirt's own directories:
# the pool operators give it is its OUTPUT_DIR (docs/LIBVIRT.md).
in_ct virsh -q -c qemu:///system pool-define-as vsphere dir --target "$output" >/dev/null
in_ct virsh -q -c qemu:///system pool-start vsphere >/dev/null
check "libvirtd answers on qemu:///system (pool 'vsphere' on OUTPUT_DIR defined and started)"

say "dropping a manifest as HyperSDK does"
write_manifest "Web 01" "vm-101" "$exports/web01/web01-disk1.vmdk" uefi "$scratch/web01.json"
cp "$scratch/web01.json" "$ct$queue/artifact-manifest.json"
wait_for "$JOB_SECONDS" "Web 01.qcow2 or Web 01.error" test -e "$ct$output/Web 01.qcow2" -o -e "$ct$output/Web 01.error"
[ -e "$ct$output/Web 01.qcow2" ] || fail "the job failed: $(cat "$ct$output/Web 01.error")"
check "the manifest became $output/Web 01.qcow2"
in_ct qemu-img check -q "$output/Web 01.qcow2" || fail "qemu-img check of the published qcow2"
qemu-img compare -q -f raw "$scratch/web01.raw" "$ct$output/Web 01.qcow2" || fail "the qcow2 differs from the source"
check "qemu-img check and compare pass on it"

domain=web-01
grep -qx "$domain" <<<"$(in_ct virsh -q -c qemu:///system list --all --name)" ||
    fail "domain $domain not in virsh list --all: $(in_ct virsh -c qemu:///system list --all)"
check "the domain $domain is in virsh -c qemu:///system list --all"
dominfo=$(in_ct virsh -c qemu:///system dominfo "$domain")
grep -Eq '^Max memory: +1048576 KiB' <<<"$dominfo" || fail "memory is not 1 GiB: $dominfo"
grep -Eq '^CPU\(s\): +2$' <<<"$dominfo" || fail "vCPUs are not 2: $dominfo"
grep -Eq '^Autostart: +enable' <<<"$dominfo" || fail "autostart is not set: $dominfo"
xml=$(in_ct virsh -c qemu:///system dumpxml --inactive "$domain")
grep -q "00:50:56:aa:bb:01" <<<"$xml" || fail "the exported MAC is not in the domain: $xml"
grep -Eq "<loader[^>]*type=.pflash" <<<"$xml" || grep -q "firmware='efi'" <<<"$xml" || fail "the domain does not boot UEFI: $xml"
grep -q "<source file='[^']*Web 01.qcow2'" <<<"$xml" || fail "the domain does not use the converted disk: $xml"
check "dominfo/dumpxml show 1 GiB, 2 vCPUs, autostart, UEFI, the disk and the MAC"
grep -q "<domain type='qemu'" <<<"$xml" || fail "without KVM the domain must be defined for emulation: $xml"
grep -q "no KVM for x86_64 guests" "$ct$output/Web 01.json" || fail "V.json does not warn that the domain is emulated"
check "without /dev/kvm the domain is defined as type 'qemu', and V.json says so"
grep -q "Web 01.qcow2" <<<"$(in_ct virsh -q -c qemu:///system vol-list vsphere)" ||
    fail "the pool does not list the disk: $(in_ct virsh -c qemu:///system vol-list vsphere)"
check "virsh vol-list vsphere shows the disk"

journal=$(in_ct journalctl -u hyper2kvm@vsphere.service -o json --no-pager)
grep -q '"JOB_ID":"' <<<"$journal" || fail "journalctl -o json carries no JOB_ID field"
grep -q '"VM_NAME":"Web 01"' <<<"$journal" || fail "journalctl -o json carries no VM_NAME field"
grep -q '"INSTANCE":"vsphere"' <<<"$journal" || fail "journalctl -o json carries no INSTANCE field"
grep -q '"STAGE":"' <<<"$journal" || fail "journalctl -o json carries no STAGE field"
grep -q '"SYSLOG_IDENTIFIER":"hyper2kvm@vsphere"' <<<"$journal" || fail "the journal's SYSLOG_IDENTIFIER is not hyper2kvm@vsphere"
check "journalctl -u hyper2kvm@vsphere -o json carries JOB_ID, VM_NAME, INSTANCE, STAGE and SYSLOG_IDENTIFIER"

# ---- stop during a long conversion: no partial file, the job is released ----
say "systemctl stop during a conversion"
cat >"$ct/etc/hyper2kvm/hyper2kvm-aws.conf" <<'EOF'
LIBVIRT_INTEGRATION=false
QEMU_CONVERT_OPTIONS=-O qcow2 -c
DRAIN_SECONDS=2
POLL_INTERVAL=1
SETTLE_SECONDS=1
EOF
in_ct mkdir -p /var/lib/hyper2kvm/aws/exports
head -c $((768 << 20)) /dev/urandom >"$ct/var/lib/hyper2kvm/aws/exports/big.raw"
chmod 0644 "$ct/var/lib/hyper2kvm/aws/exports/big.raw"
cat >"$scratch/big.json" <<'EOF'
{ "manifest_version": "1.0",
  "source": { "provider": "aws", "vm_id": "i-0big", "vm_name": "big" },
  "disks": [ { "id": "disk-0", "source_format": "raw", "local_path": "/var/lib/hyper2kvm/aws/exports/big.raw" } ] }
EOF
in_ct systemctl start hyper2kvm@aws.service || fail "systemctl start hyper2kvm@aws failed"
cp "$scratch/big.json" "$ct/var/lib/hyper2kvm/aws/queue/artifact-manifest.json"
claimed() { in_ct sh -c 'ls /var/lib/hyper2kvm/aws/queue/.hyper2kvm/claimed/*.json' >/dev/null 2>&1; }
wait_for 60 "hyper2kvm@aws to claim the big manifest" claimed
sleep 2
in_ct systemctl stop hyper2kvm@aws.service || fail "systemctl stop hyper2kvm@aws failed"
[ "$(in_ct systemctl is-active hyper2kvm@aws.service || true)" = inactive ] || fail "hyper2kvm@aws did not stop cleanly"
aws_out=$ct/var/lib/hyper2kvm/aws/output
if [ -e "$aws_out/big.qcow2" ]; then
    in_ct qemu-img check -q /var/lib/hyper2kvm/aws/output/big.qcow2 || fail "the drained job published a bad qcow2"
    check "systemctl stop waited for the running conversion to finish"
else
    leftovers=$(find "$aws_out" -type f ! -path '*/.hyper2kvm-superseded/*' | head)
    [ -z "$leftovers" ] || fail "files left in OUTPUT_DIR after the stop: $leftovers"
    ls "$ct/var/lib/hyper2kvm/aws/queue/"*.requeued-*.json >/dev/null 2>&1 ||
        fail "the running job was neither finished nor released back to the queue"
    check "systemctl stop released the running job back to the queue and left no partial file"
fi

# ---- the target starts every enabled instance ----
say "systemctl start hyper2kvm.target"
in_ct systemctl stop hyper2kvm@vsphere.service
in_ct systemctl enable hyper2kvm@vsphere.service hyper2kvm@aws.service >/dev/null 2>&1 ||
    fail "systemctl enable of the instances failed"
in_ct systemctl start hyper2kvm.target || fail "systemctl start hyper2kvm.target failed"
for instance in vsphere aws; do
    wait_for 30 "hyper2kvm@$instance to be active" in_ct systemctl is-active --quiet "hyper2kvm@$instance.service"
done
check "systemctl start hyper2kvm.target started hyper2kvm@vsphere and hyper2kvm@aws"
listed=$(in_ct hyper2kvm status --json)
grep -q 'hyper2kvm@aws' <<<"$listed" && grep -q 'hyper2kvm@vsphere' <<<"$listed" ||
    fail "hyper2kvm status does not list the systemd instances: $listed"
grep -q '"unit": *"hyper2kvm.service"' <<<"$listed" || fail "hyper2kvm status does not list the installed hyper2kvm.service: $listed"
grep -Eq '"uptime_seconds": *[0-9]+' <<<"$listed" || fail "hyper2kvm status gives no uptime for the running instances: $listed"
text=$(in_ct hyper2kvm status)
grep -Eq '^  hyper2kvm@vsphere.service  active \(running\), enabled, pid [0-9]+, up [0-9]+[dhms]' <<<"$text" ||
    fail "hyper2kvm status does not show hyper2kvm@vsphere's pid and uptime: $text"
check "hyper2kvm status lists the instances systemd knows and hyper2kvm.service, with pid and uptime"
# Nothing is lost: the job released at the stop is retaken and finished.
wait_for "$JOB_SECONDS" "big.qcow2 from the released job" test -e "$aws_out/big.qcow2" -o -e "$aws_out/big.error"
[ -e "$aws_out/big.qcow2" ] || fail "the released job failed when retaken: $(cat "$aws_out/big.error")"
in_ct qemu-img check -q /var/lib/hyper2kvm/aws/output/big.qcow2 || fail "qemu-img check of big.qcow2"
check "the released job was retaken after the restart and published big.qcow2"
in_ct systemctl stop hyper2kvm.target

say "passed: $checks checks"
