#!/usr/bin/env bash
# Builds (once) a real Debian 12 guest set up as a VMware guest is, exported as an OVA, and
# prints the OVA's path.
#
#   scripts/guest-fixture.sh            print the cached OVA, building it if needed
#
# The guest: a 2 GiB disk with an msdos label and one ext4 root partition; Debian 12 (minbase +
# linux-image-amd64, grub-pc, systemd-sysv, open-vm-tools, initramfs-tools, zstd (Debian's initramfs
# compression), ifupdown; no
# recommends); systemd-networkd asking DHCP on en* NICs (and ifupdown's ens192 stanza, as
# Debian's installer writes it on VMware); an initramfs built with MODULES=list holding only the drivers a VMware VM boots
# from (ahci, ata_piix, sd_mod, mptspi, vmw_pvscsi, ext4) and NO virtio; fstab and the GRUB
# kernel command line naming /dev/sda1; a serial console on ttyS0 (its `login:` prompt is the
# boot check's signal). So on SATA it boots, and on the virtio disk hyper2kvm's domain gives it,
# it stops at "ALERT! /dev/sda1 does not exist" until it is fixed.
#
# The disk is exported with the host's qemu-img as a streamOptimized VMDK (adapter lsilogic)
# inside an OVA with an OVF, as ovftool writes them. Needs root, debootstrap, losetup -P and
# the Debian mirror. Cached keyed by this script's content: GUEST_FIXTURE_CACHE (default
# /var/cache/hyper2kvm-guestfixture).
set -euo pipefail

SUITE=bookworm
MIRROR=${GUEST_FIXTURE_MIRROR:-http://deb.debian.org/debian}
CACHE=${GUEST_FIXTURE_CACHE:-/var/cache/hyper2kvm-guestfixture}
PACKAGES=linux-image-amd64,grub-pc,systemd-sysv,open-vm-tools,initramfs-tools,zstd,ifupdown,udev,kmod,e2fsprogs
NAME=debian12-vmware
SIZE_MIB=2048

key=$(cat "$0" | sha256sum | cut -c1-12)
dir=$CACHE/$SUITE-$key
ova=$dir/$NAME.ova
if [ -e "$dir/.complete" ]; then
    echo "$ova"
    exit 0
fi

log() { echo "guest-fixture: $*" >&2; }
# The build mounts in a mount namespace of its own: a namespace another process creates
# meanwhile (scripts/guest-tools-run.sh runs every guest tool in one) would otherwise copy the
# guest's mounted root and keep it mounted after our umount, its journal not checkpointed,
# and the exported disk could miss files GRUB needs ("/dev/loopNp1 is in use" from e2fsck).
if [ -z "${GUEST_FIXTURE_IN_NS:-}" ]; then
    export GUEST_FIXTURE_IN_NS=1
    exec unshare --mount --propagation private "$0" "$@"
fi
mkdir -p "$CACHE"
work=$dir.tmp
rm -rf "$work"
mkdir -p "$work/mnt"
raw=$work/disk.raw
loop=
# The root file system is unmounted cleanly (not lazily) before the disk is exported: GRUB
# does not replay the ext4 journal, so a file still only in the journal (grub.cfg, written
# last) is missing at boot and GRUB stops at its `grub>` prompt.
cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$work/mnt/$m" 2>/dev/null && umount "$work/mnt/$m"
    done
    if mountpoint -q "$work/mnt" 2>/dev/null; then
        sync
        umount "$work/mnt"
    fi
    [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null
    true
}
trap cleanup EXIT

log "building $ova (debootstrap $SUITE into a loop device; a few minutes, once)"
truncate -s ${SIZE_MIB}M "$raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$raw" >&2
loop=$(losetup -P --show -f "$raw")
part=${loop}p1
# losetup -P does not always scan the table here (a container without udev): ask again with
# partx, and make the node from sysfs if devtmpfs did not.
for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ -b "$part" ] && break
    partx -a "$loop" 2>/dev/null || true
    sysdev=/sys/block/${loop#/dev/}/${part#/dev/}/dev
    if [ ! -e "$part" ] && [ -r "$sysdev" ]; then
        mknod "$part" b "$(cut -d: -f1 "$sysdev")" "$(cut -d: -f2 "$sysdev")"
    fi
    sleep 1
done
[ -b "$part" ] || { log "no partition device $part for $loop"; exit 1; }
mkfs.ext4 -q -L root "$part"
mount "$part" "$work/mnt"
r=$work/mnt
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$r" "$MIRROR" >&2

# Set up as a VMware guest is: /dev/sda names, SCSI/SATA drivers only in the initramfs.
cat >"$r/etc/fstab" <<'FSTAB'
/dev/sda1  /  ext4  errors=remount-ro  0  1
FSTAB
echo "$NAME" >"$r/etc/hostname"
# The network as a VMware template may have it: Debian's installer writes an ifupdown stanza
# for the VMware NIC name (ens192), which never matches on KVM (enp1s0: docs/GUEST.md, "not
# fixed"), and the template also has systemd-networkd asking DHCP on any en* NIC, which does.
# The boot check's network signal (the guest's first DHCP request) needs the network up.
printf 'auto lo\niface lo inet loopback\n\nallow-hotplug ens192\niface ens192 inet dhcp\n' \
    >"$r/etc/network/interfaces"
mkdir -p "$r/etc/systemd/network"
printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' >"$r/etc/systemd/network/50-dhcp.network"
chroot "$r" systemctl enable systemd-networkd >&2
sed -i 's/^MODULES=.*/MODULES=list/' "$r/etc/initramfs-tools/initramfs.conf"
printf '%s\n' ahci ata_piix sd_mod mptspi vmw_pvscsi ext4 >>"$r/etc/initramfs-tools/modules"
cat >"$r/etc/default/grub" <<'GRUB'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"
GRUB_DISABLE_LINUX_UUID=true
GRUB_DISABLE_OS_PROBER=true
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB
echo 'root:hyper2kvm' | chroot "$r" chpasswd

for m in dev dev/pts proc sys; do mount --bind /$m "$r/$m"; done
chroot "$r" update-initramfs -u -k all >&2
chroot "$r" grub-install --target=i386-pc --boot-directory=/boot --modules="part_msdos ext2" "$loop" >&2
chroot "$r" grub-mkconfig -o /boot/grub/grub.cfg >&2
# In the chroot the root is a loop partition; on the VMware VM it is /dev/sda1.
sed -i "s#root=$part#root=/dev/sda1#g" "$r/boot/grub/grub.cfg"
grep -q 'root=/dev/sda1' "$r/boot/grub/grub.cfg" || { log "grub.cfg does not name /dev/sda1"; exit 1; }
initrd=$(ls "$r"/boot/initrd.img-* | head -n1)
chroot "$r" lsinitramfs "${initrd#"$r"}" >"$work/initramfs.list"
if grep -E '/(virtio_blk|virtio_scsi|virtio_pci)\.ko' "$work/initramfs.list"; then
    log "the initramfs holds virtio drivers: the fixture would not show the need to fix"
    exit 1
fi
grep -q '/ahci\.ko' "$work/initramfs.list" || { log "ahci missing from the initramfs"; exit 1; }
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*_Packages
for m in dev/pts dev proc sys; do umount "$r/$m"; done
sync
umount "$r"
# A cleanly unmounted file system has an empty journal: check it, as GRUB will read it.
e2fsck -fn "$part" >&2 || { log "the root file system is not clean after unmounting"; exit 1; }
# Still mounted elsewhere means not cleanly unmounted, whatever e2fsck -n says.
if grep -q "^$part " /proc/mounts; then log "$part is still mounted"; exit 1; fi
cleanup
loop=
trap - EXIT

log "exporting streamOptimized VMDK"
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic \
    "$raw" "$work/$NAME-disk1.vmdk"
rm -f "$raw"
vmdk_size=$(stat -c %s "$work/$NAME-disk1.vmdk")
cat >"$work/$NAME.ovf" <<OVF
<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="$NAME-disk1.vmdk" ovf:id="file1" ovf:size="$vmdk_size"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="$SIZE_MIB" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="$NAME">
    <Info>A virtual machine</Info>
    <Name>$NAME</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian GNU/Linux 12 (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>$NAME</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>1 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>1024MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
OVF
(cd "$work" && sha256sum "$NAME.ovf" "$NAME-disk1.vmdk" |
    awk '{ printf "SHA256(%s)= %s\n", $2, $1 }' >"$NAME.mf")
tar -C "$work" --format=ustar -cf "$work/$NAME.ova" "$NAME.ovf" "$NAME.mf" "$NAME-disk1.vmdk"
rm -f "$work/$NAME.ovf" "$work/$NAME.mf" "$work/$NAME-disk1.vmdk"
rmdir "$work/mnt"
touch "$work/.complete"
rm -rf "$dir"
mv "$work" "$dir"
log "ready: $ova"
echo "$ova"
