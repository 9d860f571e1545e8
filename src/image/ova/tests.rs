//! Tests over real files: OVAs written by Python's `tarfile` (ustar, GNU, pax) holding
//! streamOptimized VMDKs made by `qemu-img`, real OVF/OVA files from the `cot` project, a
//! vSphere-style and a VirtualBox-style descriptor, and hand-crafted hostile archives.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::ovf::{parse_byte_units, OvfNic};
use super::*;
use crate::manifest::Firmware;
use crate::test_support::qemu_img_output as qemu_img;

// ---------------------------------------------------------------------------------------------
// Helpers.

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ova")
}

fn limits() -> Limits {
    Limits::default()
}

/// Disk `n` of the samples: must match `raw_image` in tests/data/ova/make_samples.py.
fn raw_image(n: u8, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let head = format!("hyper2kvm OVA test disk {n}\n");
    data[..head.len()].copy_from_slice(head.as_bytes());
    let mid = size / 2;
    for j in 0..65536usize {
        data[mid + j] = ((j * 7 + n as usize) & 0xff) as u8;
    }
    data
}

fn expect_corrupt<T: std::fmt::Debug>(r: Result<T, ImageError>, needle: &str) -> String {
    match r {
        Err(ImageError::Corrupt(m)) if m.contains(needle) => m,
        other => panic!("expected Corrupt containing {needle:?}, got {other:?}"),
    }
}

fn expect_unsupported<T: std::fmt::Debug>(r: Result<T, ImageError>, needle: &str) -> String {
    match r {
        Err(ImageError::Unsupported(m)) if m.contains(needle) => m,
        other => panic!("expected Unsupported containing {needle:?}, got {other:?}"),
    }
}

fn expect_limit<T: std::fmt::Debug>(r: Result<T, ImageError>, needle: &str) -> String {
    match r {
        Err(ImageError::Limit(m)) if m.contains(needle) => m,
        other => panic!("expected Limit containing {needle:?}, got {other:?}"),
    }
}

/// A tar archive built by hand, for headers no tool writes on purpose.
#[derive(Default)]
struct TarWriter {
    buf: Vec<u8>,
}

fn octal(n: u64) -> [u8; 12] {
    let mut f = [0u8; 12];
    f[..11].copy_from_slice(format!("{n:011o}").as_bytes());
    f
}

fn base256(n: u64) -> [u8; 12] {
    let mut f = [0u8; 12];
    f[0] = 0x80;
    f[4..].copy_from_slice(&n.to_be_bytes());
    f
}

fn header(name: &str, size: [u8; 12], typeflag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(&size);
    h[136..148].copy_from_slice(b"14540643000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

impl TarWriter {
    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    fn pad(&mut self) -> &mut Self {
        let rem = self.buf.len() % 512;
        if rem != 0 {
            self.buf.resize(self.buf.len() + 512 - rem, 0);
        }
        self
    }

    fn entry(&mut self, name: &str, typeflag: u8, data: &[u8]) -> &mut Self {
        self.raw(&header(name, octal(data.len() as u64), typeflag)).raw(data).pad()
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name, b'0', data)
    }

    fn pax(&mut self, records: &[(&str, &str)]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = format!(" {k}={v}\n");
            let mut len = body.len() + 1;
            while format!("{len}{body}").len() != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len}{body}").as_bytes());
        }
        self.entry("././@PaxHeader", b'x', &data)
    }

    fn finish(&mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0u8; 1024]);
        std::mem::take(&mut self.buf)
    }
}

fn write_temp(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.ova");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// A small OVF with one disk in file `href`; `file_attrs` are added to its `File`.
fn one_disk_ovf(href: &str, file_attrs: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
          xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:href="{href}" ovf:id="file1" {file_attrs}/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A VM</Info>
    <VirtualHardwareSection><Info>hw</Info>
      <Item><rasd:ElementName>Hard disk 1</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#
    )
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

// ---------------------------------------------------------------------------------------------
// A vSphere 7 export (ovftool --exportFlags=mac,extraconfig): Windows, two disks listed in
// the DiskSection in the opposite order of the hard disk Items, EFI + secure boot, two NICs.

const VSPHERE_OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by VMware ovftool 4.4.3 (build-18663434), UTC time: 2024-02-06T10:41:07.339843Z-->
<Envelope vmw:buildId="build-18663434" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="win2019-app01-disk1.vmdk" ovf:id="file1" ovf:size="9437871616"/>
    <File ovf:href="win2019-app01-disk2.vmdk" ovf:id="file2" ovf:size="1059803136"/>
    <File ovf:href="win2019-app01-file1.nvram" ovf:id="file3" ovf:size="270840"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="200" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="2147483648"/>
    <Disk ovf:capacity="90" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="23622320128"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VLAN-120-App">
      <Description>The VLAN-120-App network</Description>
    </Network>
    <Network ovf:name="VLAN-300-Backup">
      <Description>The VLAN-300-Backup network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="win2019-app01">
    <Info>A virtual machine</Info>
    <Name>win2019-app01</Name>
    <OperatingSystemSection ovf:id="112" vmw:osType="windows2019srv_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Microsoft Windows Server 2019 (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>win2019-app01</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>4 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">2</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>8192MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>8192</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogicsas</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="slotInfo.pciSlotNumber" vmw:value="160"/>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>SATA controller 0</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="slotInfo.pciSlotNumber" vmw:value="33"/>
      </Item>
      <Item ovf:required="false">
        <rasd:Address>0</rasd:Address>
        <rasd:Description>USB Controller (XHCI)</rasd:Description>
        <rasd:ElementName>USB xHCI controller</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.usb.xhci</rasd:ResourceSubType>
        <rasd:ResourceType>23</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
      </Item>
      <Item ovf:required="false">
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>CD/DVD drive 1</rasd:ElementName>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceSubType>vmware.cdrom.remotepassthrough</rasd:ResourceSubType>
        <rasd:ResourceType>15</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.exclusive" vmw:value="false"/>
      </Item>
      <Item>
        <rasd:Address>00:50:56:9A:3C:01</rasd:Address>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VLAN-120-App</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on &quot;VLAN-120-App&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="slotInfo.pciSlotNumber" vmw:value="192"/>
        <vmw:Config ovf:required="false" vmw:key="wakeOnLanEnabled" vmw:value="true"/>
        <vmw:Config ovf:required="false" vmw:key="connectable.allowGuestControl" vmw:value="true"/>
      </Item>
      <Item>
        <rasd:Address>00:50:56:9a:3c:02</rasd:Address>
        <rasd:AddressOnParent>8</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VLAN-300-Backup</rasd:Connection>
        <rasd:Description>E1000e ethernet adapter on &quot;VLAN-300-Backup&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 2</rasd:ElementName>
        <rasd:InstanceID>10</rasd:InstanceID>
        <rasd:ResourceSubType>E1000e</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="slotInfo.pciSlotNumber" vmw:value="224"/>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>Video card</rasd:ElementName>
        <rasd:InstanceID>11</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="videoRamSizeInKB" vmw:value="8192"/>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="cpuHotAddEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="cpuHotRemoveEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
      <vmw:Config ovf:required="false" vmw:key="bootOptions.efiSecureBootEnabled" vmw:value="true"/>
      <vmw:Config ovf:required="false" vmw:key="virtualICH7MPresent" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="virtualSMCPresent" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="memoryHotAddEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="nestedHVEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="powerOpInfo.powerOffType" vmw:value="soft"/>
      <vmw:Config ovf:required="false" vmw:key="tools.syncTimeWithHost" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="tools.toolsUpgradePolicy" vmw:value="manual"/>
      <vmw:ExtraConfig ovf:required="false" vmw:key="nvram" vmw:value="win2019-app01-file1.nvram"/>
      <vmw:ExtraConfig ovf:required="false" vmw:key="svga.autodetect" vmw:value="TRUE"/>
    </VirtualHardwareSection>
    <AnnotationSection ovf:required="false">
      <Info>A human-readable annotation</Info>
      <Annotation>App server &lt;prod&gt; — owner: team-apps</Annotation>
    </AnnotationSection>
  </VirtualSystem>
</Envelope>
"#;

#[test]
fn vsphere_export_ovf_parses() {
    let ovf = parse_ovf(VSPHERE_OVF.as_bytes(), &limits()).unwrap();
    assert_eq!(ovf.references.len(), 3);
    assert_eq!(ovf.references[0].size, Some(9437871616));
    // Boot order follows the hard disk Items, not the DiskSection.
    let ids: Vec<&str> = ovf.disks.iter().map(|d| d.disk_id.as_str()).collect();
    assert_eq!(ids, ["vmdisk1", "vmdisk2"]);
    assert_eq!(ovf.disks[0].capacity_bytes, 90 << 30);
    assert_eq!(ovf.disks[1].capacity_bytes, 200 << 30);
    assert_eq!(ovf.file_of(&ovf.disks[0]).unwrap().href, "win2019-app01-disk1.vmdk");
    assert!(ovf.disks[0].format.as_deref().unwrap().ends_with("#streamOptimized"));
    assert!(ovf.warnings.is_empty(), "{:?}", ovf.warnings);

    let hw = &ovf.hardware;
    assert_eq!(hw.name.as_deref(), Some("win2019-app01"));
    assert_eq!(hw.cpu, Some(4));
    assert_eq!(hw.memory_mib, Some(8192));
    assert_eq!(hw.firmware, Some(Firmware::Uefi));
    assert!(hw.secure_boot);
    assert_eq!(hw.os_type.as_deref(), Some("windows2019srv_64Guest"));
    assert_eq!(hw.os_description.as_deref(), Some("Microsoft Windows Server 2019 (64-bit)"));
    assert_eq!(
        hw.nics,
        vec![
            OvfNic {
                network: Some("VLAN-120-App".into()),
                mac: Some("00:50:56:9a:3c:01".parse().unwrap()),
                model: Some("VmxNet3".into()),
                name: Some("Network adapter 1".into()),
            },
            OvfNic {
                network: Some("VLAN-300-Backup".into()),
                mac: Some("00:50:56:9a:3c:02".parse().unwrap()),
                model: Some("E1000e".into()),
                name: Some("Network adapter 2".into()),
            },
        ]
    );

    let m = hw.to_manifest_hardware();
    assert_eq!(m.cpu, Some(4));
    assert_eq!(m.mem_gb, Some(8.0));
    assert_eq!(m.firmware, Some(Firmware::Uefi));
    assert!(m.secureboot);
    assert_eq!(m.os_version.as_deref(), Some("windows2019srv_64Guest"));
    assert_eq!(m.os_hint.as_deref(), Some("Microsoft Windows Server 2019 (64-bit)"));
    let nics = hw.to_nics();
    assert_eq!(nics.len(), 2);
    assert_eq!(nics[1].mac.map(|m| m.to_string()).as_deref(), Some("00:50:56:9a:3c:02"));
    assert_eq!(nics[1].network.as_deref(), Some("VLAN-300-Backup"));
    assert_eq!(nics[0].id.as_deref(), Some("Network adapter 1"));
}

#[test]
fn prefixes_do_not_matter_only_namespaces() {
    // The same descriptor with other prefixes (and ovf as the only default) reads the same.
    let renamed = VSPHERE_OVF
        .replace("xmlns:rasd=", "xmlns:cimrasd=")
        .replace("rasd:", "cimrasd:")
        .replace("xmlns:vmw=", "xmlns:vmware=")
        .replace("vmw:", "vmware:");
    let a = parse_ovf(VSPHERE_OVF.as_bytes(), &limits()).unwrap();
    let b = parse_ovf(renamed.as_bytes(), &limits()).unwrap();
    assert_eq!(a, b);
    // A vmw:Config in another namespace is not VMware's and does not set the firmware.
    let foreign = VSPHERE_OVF.replace("xmlns:vmw=\"http://www.vmware.com/schema/ovf\"", "xmlns:vmw=\"urn:other\"");
    let c = parse_ovf(foreign.as_bytes(), &limits()).unwrap();
    assert_eq!(c.hardware.firmware, None);
    assert!(!c.hardware.secure_boot);
}

const VIRTUALBOX_OVF: &str = r#"<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="debian12-disk001.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="21474836480" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="7d0b8a5e-1c51-4d8f-9c4e-1f6f3f0b2a11"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="debian12">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>debian12</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>2 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>4096 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>4096 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>4096</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.19-linux" uuid="{4f3b4a55-8f6e-4d2b-a0c6-2b5d8d1e9f00}" name="debian12" OSType="Debian_64" snapshotFolder="Snapshots" lastStateChange="2024-01-05T08:00:00Z">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware>
        <CPU count="2">
          <PAE enabled="false"/>
          <LongMode enabled="true"/>
        </CPU>
        <Memory RAMSize="4096"/>
        <Firmware type="EFI"/>
        <Boot>
          <Order position="1" device="HardDisk"/>
          <Order position="2" device="None"/>
        </Boot>
        <Network>
          <Adapter slot="0" enabled="true" MACAddress="080027D1E2F3" type="82540EM">
            <NAT localhost-reachable="true"/>
          </Adapter>
          <Adapter slot="1" enabled="false" MACAddress="0800271A2B3C" type="82540EM"/>
        </Network>
      </Hardware>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
"#;

#[test]
fn virtualbox_ovf_parses() {
    let ovf = parse_ovf(VIRTUALBOX_OVF.as_bytes(), &limits()).unwrap();
    assert_eq!(ovf.version.as_deref(), Some("1.0"));
    assert_eq!(ovf.disks.len(), 1);
    assert_eq!(ovf.disks[0].capacity_bytes, 20 << 30);
    let hw = &ovf.hardware;
    assert_eq!(hw.name.as_deref(), Some("debian12"));
    assert_eq!(hw.cpu, Some(2));
    assert_eq!(hw.memory_mib, Some(4096));
    assert_eq!(hw.firmware, Some(Firmware::Uefi));
    assert!(!hw.secure_boot);
    assert_eq!(hw.os_type.as_deref(), Some("Debian_64"));
    assert_eq!(hw.nics.len(), 1);
    assert_eq!(hw.nics[0].network.as_deref(), Some("NAT"));
    // The MAC is only in vbox:Machine, for the one enabled adapter.
    assert_eq!(hw.nics[0].mac.map(|m| m.to_string()).as_deref(), Some("08:00:27:d1:e2:f3"));
    assert_eq!(hw.to_manifest_hardware().mem_gb, Some(4.0));
}

// ---------------------------------------------------------------------------------------------
// Real descriptors from cot (tests/data/ova/cot, MIT).

fn cot(name: &str) -> Vec<u8> {
    std::fs::read(data_dir().join("cot").join(name)).unwrap()
}

#[test]
fn cot_ovfs_parse() {
    // OVF 1.0 with deployment options: the default 4CPU-4GB-3NIC profile applies.
    let input = parse_ovf(&cot("input.ovf"), &limits()).unwrap();
    assert_eq!(input.hardware.cpu, Some(4));
    assert_eq!(input.hardware.memory_mib, Some(4096));
    assert_eq!(input.hardware.nics.len(), 3);
    assert_eq!(input.hardware.os_type.as_deref(), Some("other26xLinux64Guest"));
    assert_eq!(input.hardware.name.as_deref(), Some("test"));
    assert_eq!(input.disks.len(), 1);
    assert_eq!(input.disks[0].capacity_bytes, 1 << 30);
    assert_eq!(input.file_of(&input.disks[0]).unwrap().href, "input.vmdk");
    assert_eq!(input.references.len(), 3);

    // A real ovftool export: BIOS, 2 CPUs, 1536 MiB, four E1000 NICs.
    let vmware = parse_ovf(&cot("vmware.ovf"), &limits()).unwrap();
    let hw = &vmware.hardware;
    assert_eq!((hw.cpu, hw.memory_mib, hw.firmware), (Some(2), Some(1536), Some(Firmware::Bios)));
    assert_eq!(hw.os_type.as_deref(), Some("rhel6_64Guest"));
    assert_eq!(hw.name.as_deref(), Some("vmw"));
    assert_eq!(hw.nics.len(), 4);
    assert!(hw
        .nics
        .iter()
        .all(|n| n.network.as_deref() == Some("lanethernet0") && n.model.as_deref() == Some("E1000")));
    assert_eq!(vmware.disks[0].capacity_bytes, 1 << 30);

    // OVF 0.9: <Section xsi:type=...>, <Content>, InstanceId, MegaBytes.
    let v09 = parse_ovf(&cot("v0.9.ovf"), &limits()).unwrap();
    assert_eq!(v09.version.as_deref(), Some("0.9"));
    assert_eq!((v09.hardware.cpu, v09.hardware.memory_mib), (Some(1), Some(8192)));
    assert_eq!(v09.disks.len(), 1);
    assert_eq!(v09.disks[0].capacity_bytes, 1073741824);
    assert_eq!(v09.hardware.nics[0].network.as_deref(), Some("bridged"));
    assert_eq!(v09.hardware.nics[0].model.as_deref(), Some("PCNet32"));
    assert_eq!(v09.hardware.os_type.as_deref(), Some("other26xLinux64Guest"));

    // Profiles listed as "4CPU-4GB 4CPU-8GB"; default 1CPU-4GB.
    let csr = parse_ovf(&cot("csr1000v.ovf"), &limits()).unwrap();
    assert_eq!((csr.hardware.cpu, csr.hardware.memory_mib), (Some(1), Some(4096)));
    assert_eq!(csr.hardware.nics.len(), 3);

    // Two disks, the second with no file (to be created empty); 2 NICs in the default profile.
    let iosv = parse_ovf(&cot("iosv.ovf"), &limits()).unwrap();
    assert_eq!((iosv.hardware.cpu, iosv.hardware.memory_mib), (Some(1), Some(384)));
    assert_eq!(iosv.hardware.nics.len(), 2);
    let ids: Vec<&str> = iosv.disks.iter().map(|d| d.disk_id.as_str()).collect();
    assert_eq!(ids, ["vios-adventerprisek9-m_vmdk", "flash2"]);
    assert_eq!(iosv.disks[0].ovf_disk_id, "vios-adventerprisek9-m.vmdk");
    assert_eq!(iosv.disks[1].file_ref, None);
    assert_eq!(iosv.disks[1].capacity_bytes, 128 << 20);

    // The real OVF 2.0 VirtualBox export: StorageItem / EthernetPortItem, /disk/ paths.
    let ubuntu = parse_ovf(&cot("ubuntu.2.0.ovf"), &limits()).unwrap();
    assert_eq!(ubuntu.disks.len(), 1);
    assert_eq!(ubuntu.disks[0].capacity_bytes, 8 << 30);
    assert_eq!((ubuntu.hardware.cpu, ubuntu.hardware.memory_mib), (Some(1), Some(512)));
    assert_eq!(ubuntu.hardware.nics.len(), 1);
    assert_eq!(ubuntu.hardware.nics[0].network.as_deref(), Some("NAT"));
    assert_eq!(ubuntu.hardware.nics[0].mac.map(|m| m.to_string()).as_deref(), Some("08:00:27:2a:fb:4e"));
    assert_eq!(ubuntu.hardware.os_type.as_deref(), Some("Ubuntu_64"));
    assert_eq!(ubuntu.hardware.firmware, None);

    // Minimal: nothing but valid.
    let minimal = parse_ovf(&cot("minimal.ovf"), &limits()).unwrap();
    assert!(minimal.disks.is_empty());
    assert_eq!(minimal.hardware.name.as_deref(), Some("x"));

    // cot's deliberately invalid descriptor: a disk whose fileRef names no File.
    expect_corrupt(parse_ovf(&cot("invalid.ovf"), &limits()), "flash2");
}

#[test]
fn standalone_ovf_resolves_its_disk_next_to_it() {
    let dir = data_dir().join("cot");
    let ovf = parse_ovf(&cot("ubuntu.2.0.ovf"), &limits()).unwrap();
    let file = ovf.file_of(&ovf.disks[0]).unwrap();
    let href = check_href(&file.href).unwrap();
    let disk = std::fs::read(dir.join(href)).unwrap();
    assert_eq!(&disk[..4], b"KDMV");
}

// ---------------------------------------------------------------------------------------------
// OVF details.

fn two_disk_ovf(items: &str) -> String {
    format!(
        r#"<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <ovf:References><ovf:File ovf:href="a.vmdk" ovf:id="fa"/><ovf:File ovf:href="b.vmdk" ovf:id="fb"/></ovf:References>
  <ovf:DiskSection>
    <ovf:Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="a" ovf:fileRef="fa"/>
    <ovf:Disk ovf:capacity="2" ovf:capacityAllocationUnits="GigaBytes" ovf:diskId="b" ovf:fileRef="fb"/>
  </ovf:DiskSection>
  <ovf:VirtualSystem ovf:id="vm"><ovf:VirtualHardwareSection>{items}</ovf:VirtualHardwareSection></ovf:VirtualSystem>
</ovf:Envelope>"#
    )
}

fn disk_item(id: &str, host: &str) -> String {
    format!("<ovf:Item><rasd:InstanceID>{id}</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:HostResource>{host}</rasd:HostResource></ovf:Item>")
}

fn disk_order(xml: &str) -> Vec<String> {
    parse_ovf(xml.as_bytes(), &limits()).unwrap().disks.into_iter().map(|d| d.disk_id).collect()
}

#[test]
fn disk_order_follows_the_disk_items() {
    let items = disk_item("1", "ovf:/disk/b") + &disk_item("2", "ovf:/disk/a");
    assert_eq!(disk_order(&two_disk_ovf(&items)), ["b", "a"]);
    // No Item references a disk: DiskSection order.
    assert_eq!(disk_order(&two_disk_ovf("")), ["a", "b"]);
    // Only one referenced: it comes first, the other follows with a warning.
    let ovf = parse_ovf(two_disk_ovf(&disk_item("1", "/disk/b")).as_bytes(), &limits()).unwrap();
    assert_eq!(ovf.disks.iter().map(|d| d.disk_id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
    assert_eq!(ovf.warnings.len(), 1);
    assert_eq!(ovf.disks[0].capacity_bytes, 2 << 30);
    // An Item naming no disk, a file-backed disk, the same disk twice.
    expect_corrupt(parse_ovf(two_disk_ovf(&disk_item("1", "ovf:/disk/zz")).as_bytes(), &limits()), "zz");
    expect_unsupported(parse_ovf(two_disk_ovf(&disk_item("1", "ovf:/file/fa")).as_bytes(), &limits()), "file");
    let twice = disk_item("1", "ovf:/disk/a") + &disk_item("2", "ovf:/disk/a");
    expect_corrupt(parse_ovf(two_disk_ovf(&twice).as_bytes(), &limits()), "same disk");
}

#[test]
fn units_capacity_and_overflow() {
    assert_eq!(parse_byte_units("byte"), Some(1));
    assert_eq!(parse_byte_units("byte * 2^30"), Some(1 << 30));
    assert_eq!(parse_byte_units("byte*2^20"), Some(1 << 20));
    assert_eq!(parse_byte_units("byte * 1024"), Some(1024));
    assert_eq!(parse_byte_units("byte * 10^9"), Some(1_000_000_000));
    assert_eq!(parse_byte_units("MegaBytes"), Some(1 << 20));
    assert_eq!(parse_byte_units("KiloBytes"), Some(1 << 10));
    assert_eq!(parse_byte_units("GB"), Some(1 << 30));
    assert_eq!(parse_byte_units("byte * 2^64"), None);
    assert_eq!(parse_byte_units("hertz * 10^6"), None);
    assert_eq!(parse_byte_units("furlongs"), None);

    let with_capacity = |cap: &str, units: &str| {
        VSPHERE_OVF.replacen(
            r#"ovf:capacity="90" ovf:capacityAllocationUnits="byte * 2^30""#,
            &format!(r#"ovf:capacity="{cap}" ovf:capacityAllocationUnits="{units}""#),
            1,
        )
    };
    let ok = parse_ovf(with_capacity("3", "MegaBytes").as_bytes(), &limits()).unwrap();
    assert_eq!(ok.disks[0].capacity_bytes, 3 << 20);
    expect_corrupt(parse_ovf(with_capacity("18446744073709551615", "byte * 2^30").as_bytes(), &limits()), "overflow");
    expect_corrupt(parse_ovf(with_capacity("99999999999999999999999", "byte").as_bytes(), &limits()), "overflow");
    expect_corrupt(parse_ovf(with_capacity("-1", "byte").as_bytes(), &limits()), "not a number");
    expect_unsupported(parse_ovf(with_capacity("5", "parsecs").as_bytes(), &limits()), "parsecs");
    expect_unsupported(parse_ovf(with_capacity("${disk.size}", "byte").as_bytes(), &limits()), "property");

    // Memory that overflows is refused, not wrapped.
    let huge_mem = VSPHERE_OVF.replace(
        "<rasd:VirtualQuantity>8192</rasd:VirtualQuantity>",
        "<rasd:VirtualQuantity>18446744073709551615</rasd:VirtualQuantity>",
    );
    expect_corrupt(parse_ovf(huge_mem.as_bytes(), &limits()), "overflow");
    // Memory in GiB.
    let gib = VSPHERE_OVF
        .replace(
            "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
            "<rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits>",
        )
        .replace(
            "<rasd:VirtualQuantity>8192</rasd:VirtualQuantity>",
            "<rasd:VirtualQuantity>16</rasd:VirtualQuantity>",
        );
    assert_eq!(parse_ovf(gib.as_bytes(), &limits()).unwrap().hardware.memory_mib, Some(16384));
}

#[test]
fn disk_ids_are_sanitised_and_unique() {
    assert_eq!(sanitize_disk_id("vmdisk1", 1), "vmdisk1");
    assert_eq!(sanitize_disk_id("disk.vmdk", 1), "disk_vmdk");
    assert_eq!(sanitize_disk_id("../../etc/passwd", 1), "______etc_passwd");
    assert_eq!(sanitize_disk_id("dïsk 1", 1), "d_sk_1");
    assert_eq!(sanitize_disk_id("", 3), "disk3");
    assert_eq!(sanitize_disk_id(&"x".repeat(100), 1).len(), 64);

    let xml = two_disk_ovf("")
        .replace(r#"ovf:diskId="a""#, r#"ovf:diskId="d.1""#)
        .replace(r#"ovf:diskId="b""#, r#"ovf:diskId="d_1""#);
    let ovf = parse_ovf(xml.as_bytes(), &limits()).unwrap();
    let ids: Vec<&str> = ovf.disks.iter().map(|d| d.disk_id.as_str()).collect();
    assert_eq!(ids, ["d_1", "d_1_2"]);
    assert_eq!(ovf.disks[0].ovf_disk_id, "d.1");
    let dup = two_disk_ovf("").replace(r#"ovf:diskId="b""#, r#"ovf:diskId="a""#);
    expect_corrupt(parse_ovf(dup.as_bytes(), &limits()), "twice");
}

#[test]
fn hrefs_are_checked() {
    assert_eq!(check_href("disk.vmdk").unwrap(), "disk.vmdk");
    assert_eq!(check_href("./sub//disk.vmdk").unwrap(), "sub/disk.vmdk");
    for bad in
        ["../disk.vmdk", "a/../../b", "/etc/passwd", "C:\\disk.vmdk", "c:/x", "a\\..\\b", "", "  ", "x\0y", ".", "./"]
    {
        expect_corrupt(check_href(bad), "");
    }
    for url in ["http://example.com/disk.vmdk", "https://x/y", "file:///etc/passwd", "FILE:disk"] {
        expect_unsupported(check_href(url), "URL");
    }
    // An unsafe href anywhere in References refuses the descriptor.
    let bad = one_disk_ovf("../../etc/shadow", "");
    expect_corrupt(parse_ovf(bad.as_bytes(), &limits()), "..");
}

#[test]
fn compressed_and_chunked_disks_are_refused_with_advice() {
    let gz = one_disk_ovf("disk.vmdk.gz", r#"ovf:compression="gzip""#);
    let m = expect_unsupported(parse_ovf(gz.as_bytes(), &limits()), "gzip");
    assert!(m.contains("re-export the OVA without compression"), "{m}");
    let chunked = one_disk_ovf("disk.vmdk", r#"ovf:chunkSize="2147483648""#);
    let m = expect_unsupported(parse_ovf(chunked.as_bytes(), &limits()), "chunk");
    assert!(m.contains("re-export"), "{m}");
    // "identity" is no compression.
    assert!(parse_ovf(one_disk_ovf("disk.vmdk", r#"ovf:compression="identity""#).as_bytes(), &limits()).is_ok());
}

#[test]
fn mac_addresses_are_normalised_or_dropped() {
    // The OVF reader uses the manifest's parser (crate::mac); these are the spellings OVFs use.
    let normalize_mac = |text: &str| text.parse::<crate::mac::MacAddress>().ok().map(|m| m.to_string());
    assert_eq!(normalize_mac("00:50:56:AA:bb:01").as_deref(), Some("00:50:56:aa:bb:01"));
    assert_eq!(normalize_mac("00-50-56-AA-BB-01").as_deref(), Some("00:50:56:aa:bb:01"));
    assert_eq!(normalize_mac("080027D1E2F3").as_deref(), Some("08:00:27:d1:e2:f3"));
    for bad in ["0", "00:50:56:aa:bb", "00:50:56:aa:bb:gg", "00:50:56:aa:bb:01:02", "0050:56aa:bb01", "x' onload='y"] {
        assert_eq!(normalize_mac(bad), None, "{bad}");
    }
}

#[test]
fn hostile_descriptors_are_bounded() {
    let l = limits();
    // Deep nesting.
    let deep = format!(
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">{}{}</Envelope>"#,
        "<a>".repeat(10_000),
        "</a>".repeat(10_000)
    );
    expect_limit(parse_ovf(deep.as_bytes(), &l), "deep");
    // Too many elements (each tiny).
    let wide =
        format!(r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">{}</Envelope>"#, "<a/>".repeat(120_000));
    expect_limit(parse_ovf(wide.as_bytes(), &l), "elements");
    // Huge text over the descriptor limit.
    let huge = format!(
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><Info>{}</Info></Envelope>"#,
        "A".repeat(5 << 20)
    );
    expect_limit(parse_ovf(huge.as_bytes(), &l), "limit");
    // Huge text under a smaller limit.
    let small = Limits { max_ovf_bytes: 1024, ..l };
    expect_limit(parse_ovf(VSPHERE_OVF.as_bytes(), &small), "1024");
    // Entity expansion is impossible: a DOCTYPE is refused outright.
    let laughs = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><Info>&lol2;</Info></Envelope>"#;
    expect_corrupt(parse_ovf(laughs.as_bytes(), &l), "DOCTYPE");
    // Undeclared entity, bad nesting, junk, empty, not OVF, two roots, truncated.
    expect_corrupt(
        parse_ovf(br#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><a>&nope;</a></Envelope>"#, &l),
        "XML",
    );
    expect_corrupt(
        parse_ovf(br#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><a></b></Envelope>"#, &l),
        "XML",
    );
    expect_corrupt(parse_ovf(b"\x00\x01\x02 binary junk", &l), "");
    expect_corrupt(parse_ovf(b"", &l), "empty");
    expect_corrupt(
        parse_ovf(br#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"/>"#, &l),
        "not an OVF",
    );
    expect_corrupt(parse_ovf(br#"<Envelope/>"#, &l), "not an OVF");
    expect_corrupt(parse_ovf(br#"<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"/><x/>"#, &l), "root");
    expect_corrupt(parse_ovf(&VSPHERE_OVF.as_bytes()[..VSPHERE_OVF.len() / 2], &l), "");
    expect_unsupported(parse_ovf(b"\xff\xfe<\x00", &l), "UTF-16");
    // Too many disks and files.
    let few = Limits { max_disks: 1, ..l };
    expect_limit(parse_ovf(VSPHERE_OVF.as_bytes(), &few), "disks");
    let few = Limits { max_members: 2, ..l };
    expect_limit(parse_ovf(VSPHERE_OVF.as_bytes(), &few), "files");
    // Two virtual machines.
    let two = VSPHERE_OVF.replace("<VirtualSystem ovf:id=\"win2019-app01\">", "<VirtualSystemCollection ovf:id=\"c\"><VirtualSystem ovf:id=\"other\"><Info>x</Info></VirtualSystem><VirtualSystem ovf:id=\"win2019-app01\">").replace("</VirtualSystem>\n</Envelope>", "</VirtualSystem></VirtualSystemCollection>\n</Envelope>");
    expect_unsupported(parse_ovf(two.as_bytes(), &l), "2 virtual machines");
}

#[test]
fn manifest_lines_parse() {
    let text = b"SHA1(a.ovf)= 3c363836cf4e16666669a25da280a1865c2d2874\r\n\nSHA256 (sub/b.vmdk) = \
                 E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855\nSHA512(c(1).vmdk)=cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e\n";
    let entries = mf::parse_mf(text, "x.mf", 10).unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0].algorithm, DigestAlgorithm::Sha1);
    assert_eq!(entries[1].file, "sub/b.vmdk");
    assert_eq!(entries[1].expected, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(entries[2].file, "c(1).vmdk");
    assert_eq!(entries[2].algorithm, DigestAlgorithm::Sha512);
    expect_unsupported(mf::parse_mf(b"MD5(a.vmdk)= d41d8cd98f00b204e9800998ecf8427e\n", "x.mf", 10), "MD5");
    expect_corrupt(mf::parse_mf(b"SHA1(a.vmdk)= 1234\n", "x.mf", 10), "hex");
    expect_corrupt(mf::parse_mf(b"garbage\n", "x.mf", 10), "line 1");
    expect_corrupt(mf::parse_mf(b"SHA1(../a.vmdk)= 3c363836cf4e16666669a25da280a1865c2d2874\n", "x.mf", 10), "..");
    let many = "SHA1(a)= 3c363836cf4e16666669a25da280a1865c2d2874\n".repeat(11);
    expect_limit(mf::parse_mf(many.as_bytes(), "x.mf", 10), "10");
}

// ---------------------------------------------------------------------------------------------
// The tar index against Python's tarfile, and the sample OVAs end to end.

#[derive(serde::Deserialize)]
struct PyMember {
    name: String,
    offset_data: u64,
    size: u64,
    sha256: String,
}

const SAMPLES: [&str; 4] = ["vsphere-ustar.ova", "vsphere-gnu.ova", "vsphere-pax.ova", "cot-ubuntu.2.0.ova"];

#[test]
fn tar_index_matches_python_tarfile() {
    for sample in SAMPLES {
        let path = data_dir().join(sample);
        let json = std::fs::read(data_dir().join(format!("{sample}.members.json"))).unwrap();
        let expected: Vec<PyMember> = serde_json::from_slice(&json).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let members = tar::index(bytes.as_slice(), &path, 100).unwrap();
        assert_eq!(members.len(), expected.len(), "{sample}");
        for (m, py) in members.iter().zip(&expected) {
            assert_eq!(m.name, py.name, "{sample}");
            assert_eq!(m.kind, tar::MemberKind::File);
            assert_eq!(m.data, py.offset_data..py.offset_data + py.size, "{sample} {}", py.name);
            let data = &bytes[m.data.start as usize..m.data.end as usize];
            assert_eq!(sha256_hex(data), py.sha256, "{sample} {}", py.name);
        }
    }
}

#[test]
fn vsphere_sample_ovas_open_and_verify() {
    let cases = [
        ("vsphere-ustar.ova", "ova-sample.ovf", "disks/"),
        ("vsphere-gnu.ova", "export/ova-sample.ovf", "a-rather-long"),
        ("vsphere-pax.ova", "ova-sample.ovf", "disque-système"),
    ];
    for (sample, ovf_name, fragment) in cases {
        let path = data_dir().join(sample);
        let pkg = open(&path, &limits()).unwrap();
        assert_eq!(pkg.ovf_name, ovf_name, "{sample}");
        assert_eq!(pkg.disks.len(), 2);
        assert!(pkg.blank_disks.is_empty());
        assert!(pkg.warnings.is_empty(), "{:?}", pkg.warnings);
        assert_eq!(pkg.disks[0].disk_id, "vmdisk1");
        assert_eq!(pkg.disks[0].capacity_bytes, 2 << 20);
        assert_eq!(pkg.disks[1].disk_id, "vmdisk2");
        assert_eq!(pkg.disks[1].capacity_bytes, 1 << 20);
        assert!(pkg.disks.iter().any(|d| d.href.contains(fragment)), "{sample}");

        let bytes = std::fs::read(&path).unwrap();
        for disk in &pkg.disks {
            assert_eq!(&bytes[disk.member.start as usize..][..4], b"KDMV", "{sample} {}", disk.href);
            assert_eq!(pkg.member_range(&disk.href), Some(disk.member.clone()));
        }

        let hw = &pkg.hardware;
        assert_eq!((hw.cpu, hw.memory_mib), (Some(2), Some(2048)));
        assert_eq!(hw.firmware, Some(Firmware::Uefi));
        assert!(hw.secure_boot);
        assert_eq!(hw.os_type.as_deref(), Some("ubuntu64Guest"));
        assert_eq!(hw.nics.len(), 1);
        assert_eq!(hw.nics[0].mac.map(|m| m.to_string()).as_deref(), Some("00:50:56:a1:00:01"));
        assert_eq!(hw.nics[0].network.as_deref(), Some("VM Network"));
        assert_eq!(hw.nics[0].model.as_deref(), Some("VmxNet3"));

        let listed = pkg.manifest.as_ref().unwrap();
        assert_eq!(listed.entries.len(), 4);
        assert!(!listed.all_verified());
        let check = verify_manifest(&pkg).unwrap();
        assert!(check.all_verified());
        assert!(check.unlisted_disks.is_empty());
        let algo = if sample == "vsphere-gnu.ova" { DigestAlgorithm::Sha1 } else { DigestAlgorithm::Sha256 };
        assert!(check.entries.iter().all(|e| e.algorithm == algo));
    }
}

#[test]
fn members_read_in_place_are_disks_qemu_img_reads() {
    let tmp = tempfile::tempdir().unwrap();
    for sample in ["vsphere-ustar.ova", "vsphere-gnu.ova", "vsphere-pax.ova"] {
        let pkg = open(&data_dir().join(sample), &limits()).unwrap();
        for (n, disk) in pkg.disks.iter().enumerate() {
            let slice = pkg.open_disk(disk).unwrap();
            let mut data = vec![0u8; slice.len() as usize];
            slice.read_exact_at(&mut data, 0).unwrap();
            let vmdk = tmp.path().join(format!("{sample}-{n}.vmdk"));
            std::fs::write(&vmdk, &data).unwrap();
            let raw = tmp.path().join(format!("{sample}-{n}.raw"));
            let size = if n == 0 { 2 << 20 } else { 1 << 20 };
            std::fs::write(&raw, raw_image(n as u8 + 1, size)).unwrap();
            let out = qemu_img(&[
                "compare".as_ref(),
                "-f".as_ref(),
                "vmdk".as_ref(),
                "-F".as_ref(),
                "raw".as_ref(),
                vmdk.as_os_str(),
                raw.as_os_str(),
            ]);
            assert!(out.status.success(), "{sample} disk {n}: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
}

#[test]
fn cot_ubuntu_ova_opens_and_its_real_manifest_verifies() {
    let path = data_dir().join("cot-ubuntu.2.0.ova");
    let pkg = open(&path, &limits()).unwrap();
    assert_eq!(pkg.ovf_name, "ubuntu.2.0.ovf");
    assert_eq!(pkg.disks.len(), 1);
    let disk = &pkg.disks[0];
    assert_eq!(disk.disk_id, "vmdisk1");
    assert_eq!(disk.href, "ubuntu.2.0-disk1.vmdk");
    assert_eq!(disk.capacity_bytes, 8 << 30);
    assert_eq!(pkg.hardware.os_type.as_deref(), Some("Ubuntu_64"));
    assert_eq!(pkg.hardware.memory_mib, Some(512));

    // The member read by range is byte for byte the file tarfile stored, and qemu-img reads it.
    let slice = pkg.open_disk(disk).unwrap();
    let mut data = vec![0u8; slice.len() as usize];
    slice.read_exact_at(&mut data, 0).unwrap();
    assert_eq!(&data[..4], b"KDMV");
    assert_eq!(data, cot("ubuntu.2.0-disk1.vmdk"));
    let tmp = tempfile::tempdir().unwrap();
    let vmdk = tmp.path().join("member.vmdk");
    std::fs::write(&vmdk, &data).unwrap();
    let original = data_dir().join("cot/ubuntu.2.0-disk1.vmdk");
    let out = qemu_img(&[
        "compare".as_ref(),
        "-f".as_ref(),
        "vmdk".as_ref(),
        "-F".as_ref(),
        "vmdk".as_ref(),
        vmdk.as_os_str(),
        original.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let info = qemu_img(&["info".as_ref(), "--output=json".as_ref(), vmdk.as_os_str()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 8u64 << 30);

    let check = verify_manifest(&pkg).unwrap();
    assert_eq!(check.entries.len(), 2);
    assert!(check.all_verified());
}

#[test]
fn a_wrong_digest_names_the_member() {
    let original = std::fs::read(data_dir().join("vsphere-ustar.ova")).unwrap();
    let (_dir, path) = write_temp(&original);
    let pkg = open(&path, &limits()).unwrap();
    let disk2 = pkg.disks[1].clone();
    // One flipped byte in the middle of the second disk.
    let at = disk2.member.start + (disk2.member.end - disk2.member.start) / 2;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[original[at as usize] ^ 0xff], at).unwrap();
    let m = expect_corrupt(verify_manifest(&pkg), &disk2.href);
    assert!(m.contains("SHA256"), "{m}");
}

#[test]
fn a_manifest_listing_a_missing_member_is_an_error() {
    let ovf = one_disk_ovf("disk.vmdk", "");
    let disk = b"KDMV not really a disk";
    let mf = format!(
        "SHA256(vm.ovf)= {}\nSHA256(disk.vmdk)= {}\nSHA1(ghost.vmdk)= 3c363836cf4e16666669a25da280a1865c2d2874\n",
        sha256_hex(ovf.as_bytes()),
        sha256_hex(disk)
    );
    let tar = TarWriter::default()
        .file("vm.ovf", ovf.as_bytes())
        .file("vm.mf", mf.as_bytes())
        .file("disk.vmdk", disk)
        .finish();
    let (_dir, path) = write_temp(&tar);
    let pkg = open(&path, &limits()).unwrap();
    assert_eq!(pkg.manifest.as_ref().unwrap().entries.len(), 3);
    expect_corrupt(verify_manifest(&pkg), "ghost.vmdk");

    // Without the ghost line it verifies; without a .mf there is nothing to verify.
    // The same member under two algorithms is read once and checked against both.
    let sha1 = {
        use sha1::Digest;
        hex::encode(sha1::Sha1::digest(disk))
    };
    let mf_ok = mf.lines().take(2).collect::<Vec<_>>().join("\n") + &format!("\nSHA1(disk.vmdk)= {sha1}\n");
    let tar = TarWriter::default()
        .file("vm.ovf", ovf.as_bytes())
        .file("vm.mf", mf_ok.as_bytes())
        .file("disk.vmdk", disk)
        .finish();
    let (_dir2, path) = write_temp(&tar);
    let check = verify_manifest(&open(&path, &limits()).unwrap()).unwrap();
    assert_eq!(check.entries.len(), 3);
    assert!(check.all_verified());
    // A wrong SHA1 beside a right SHA256 is still caught.
    let mf_bad = mf_ok.replace(&sha1, &"0".repeat(40));
    let tar = TarWriter::default()
        .file("vm.ovf", ovf.as_bytes())
        .file("vm.mf", mf_bad.as_bytes())
        .file("disk.vmdk", disk)
        .finish();
    let (_dir4, path) = write_temp(&tar);
    let m = expect_corrupt(verify_manifest(&open(&path, &limits()).unwrap()), "disk.vmdk");
    assert!(m.contains("SHA1"), "{m}");
    let tar = TarWriter::default().file("vm.ovf", ovf.as_bytes()).file("disk.vmdk", disk).finish();
    let (_dir3, path) = write_temp(&tar);
    let pkg = open(&path, &limits()).unwrap();
    assert!(pkg.manifest.is_none());
    expect_unsupported(verify_manifest(&pkg), "no .mf");
}

// ---------------------------------------------------------------------------------------------
// Crafted archives: big sizes, truncation, hostile content.

#[test]
fn number_fields() {
    assert_eq!(tar::parse_number(&octal((8 << 30) - 1)), Some((8 << 30) - 1));
    assert_eq!(tar::parse_number(&base256(10 << 30)), Some(10 << 30));
    assert_eq!(tar::parse_number(&base256(u64::MAX)), Some(u64::MAX));
    let mut overflow = [0xffu8; 12];
    overflow[0] = 0x81;
    assert_eq!(tar::parse_number(&overflow), None);
    assert_eq!(tar::parse_number(&[0xff; 12]), None); // negative
    assert_eq!(tar::parse_number(b"   1234 \0\0\0\0"), Some(0o1234));
    assert_eq!(tar::parse_number(b"12x4\0\0\0\0\0\0\0\0"), None);
    assert_eq!(tar::parse_number(&[0u8; 12]), Some(0));
}

/// An OVA whose disk member's header claims `size` bytes, written as an OVF member followed
/// by `disk_headers`; returns the bytes and the disk data offset.
fn big_member_ova(disk_headers: &mut TarWriter) -> (Vec<u8>, u64) {
    let ovf = one_disk_ovf("big.vmdk", "");
    let mut t = TarWriter::default();
    t.file("vm.ovf", ovf.as_bytes());
    t.raw(&disk_headers.buf);
    let data_start = t.buf.len() as u64;
    (t.buf, data_start)
}

#[test]
fn members_over_8_gib_base256_and_pax() {
    const BIG: u64 = 9 << 30;
    let mut base = TarWriter::default();
    base.raw(&header("big.vmdk", base256(BIG), b'0'));
    let mut pax = TarWriter::default();
    pax.pax(&[("size", &BIG.to_string()), ("path", "big.vmdk")]).raw(&header("placeholder", octal(0), b'0'));
    for (what, mut headers) in [("base-256", base), ("pax", pax)] {
        let (bytes, data_start) = big_member_ova(&mut headers);
        // Without the data: truncated.
        let (dir, path) = write_temp(&bytes);
        let m = expect_corrupt(open(&path, &limits()), "truncated");
        assert!(m.contains(&BIG.to_string()), "{what}: {m}");
        // With the data (a sparse file) and the end-of-archive blocks: indexed in place.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let end = data_start + BIG;
        file.write_all_at(&[0u8; 1024], end).unwrap();
        file.write_all_at(b"KDMV", data_start).unwrap();
        let pkg = open(&path, &limits()).unwrap();
        assert_eq!(pkg.disks[0].member, data_start..end, "{what}");
        assert_eq!(pkg.disks[0].member_name, "big.vmdk");
        let slice = pkg.open_disk(&pkg.disks[0]).unwrap();
        assert_eq!(slice.len(), BIG);
        drop(dir);
    }
}

#[test]
fn truncated_archives_are_refused_clearly() {
    let bytes = std::fs::read(data_dir().join("vsphere-ustar.ova")).unwrap();
    let pkg = open(&data_dir().join("vsphere-ustar.ova"), &limits()).unwrap();
    let disk1 = &pkg.disks[0].member;
    // Inside the first disk's data, and inside a header.
    for cut in [disk1.start + 1000, disk1.start - 100] {
        let (_dir, path) = write_temp(&bytes[..cut as usize]);
        expect_corrupt(open(&path, &limits()), "truncated");
    }
    // Cut right after the descriptor and manifest: the disks are missing.
    let (_dir, path) = write_temp(&bytes[..(disk1.start - 512) as usize]);
    let m = expect_corrupt(open(&path, &limits()), "ova-sample-disk1.vmdk");
    assert!(m.contains("no member"), "{m}");
    // Not a tar at all.
    let (_dir, path) = write_temp(VSPHERE_OVF.as_bytes());
    expect_corrupt(open(&path, &limits()), "not a tar archive");
    let (_dir, path) = write_temp(b"");
    expect_corrupt(open(&path, &limits()), "no .ovf");
}

#[test]
fn header_count_and_damaged_headers() {
    let mut t = TarWriter::default();
    t.file("vm.ovf", one_disk_ovf("disk.vmdk", "").as_bytes()).file("disk.vmdk", b"KDMV");
    for i in 0..20 {
        t.file(&format!("junk{i}"), b"x");
    }
    let (_dir, path) = write_temp(&t.finish());
    expect_limit(open(&path, &Limits { max_members: 10, ..limits() }), "more than 10 tar headers");
    assert!(open(&path, &limits()).is_ok());

    // A flipped byte in a header fails its checksum.
    let mut bytes = TarWriter::default()
        .file("vm.ovf", one_disk_ovf("disk.vmdk", "").as_bytes())
        .file("disk.vmdk", b"KDMV")
        .finish();
    let second = bytes.len() - 1024 - 1024;
    bytes[second + 3] ^= 0x20;
    let (_dir, path) = write_temp(&bytes);
    expect_corrupt(open(&path, &limits()), "checksum");

    // A GNU long name longer than allowed, a malformed pax header.
    let long = "n".repeat(5000);
    let bytes = TarWriter::default().entry("././@LongLink", b'L', long.as_bytes()).file("x", b"").finish();
    let (_dir, path) = write_temp(&bytes);
    expect_limit(open(&path, &limits()), "long name");
    let bytes = TarWriter::default().entry("././@PaxHeader", b'x', b"999 path=x\n").file("x", b"").finish();
    let (_dir, path) = write_temp(&bytes);
    expect_corrupt(open(&path, &limits()), "pax");
}

fn crafted(entries: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
    let mut t = TarWriter::default();
    for (name, data) in entries {
        t.file(name, data);
    }
    write_temp(&t.finish())
}

#[test]
fn hostile_archives_are_refused() {
    let disk: &[u8] = b"KDMV";
    // href climbing out, absolute, naming no member.
    for (href, needle) in [("../disk.vmdk", ".."), ("/etc/passwd", "absolute"), ("sub/../../x.vmdk", "..")] {
        let ovf = one_disk_ovf(href, "");
        let (_d, path) = crafted(&[("vm.ovf", ovf.as_bytes()), ("disk.vmdk", disk)]);
        expect_corrupt(open(&path, &limits()), needle);
    }
    let ovf = one_disk_ovf("missing.vmdk", "");
    let (_d, path) = crafted(&[("vm.ovf", ovf.as_bytes()), ("disk.vmdk", disk)]);
    expect_corrupt(open(&path, &limits()), "missing.vmdk");

    // Two descriptors, none, the same name twice.
    let ovf = one_disk_ovf("disk.vmdk", "");
    let (_d, path) = crafted(&[("a.ovf", ovf.as_bytes()), ("b.ovf", ovf.as_bytes()), ("disk.vmdk", disk)]);
    expect_corrupt(open(&path, &limits()), "2 .ovf descriptors");
    let (_d, path) = crafted(&[("disk.vmdk", disk)]);
    expect_corrupt(open(&path, &limits()), "no .ovf");
    let (_d, path) = crafted(&[("vm.ovf", ovf.as_bytes()), ("disk.vmdk", disk), ("./disk.vmdk", b"evil")]);
    expect_corrupt(open(&path, &limits()), "two members");

    // The disk is a symlink or a directory, not data.
    let bytes = TarWriter::default().file("vm.ovf", ovf.as_bytes()).entry("disk.vmdk", b'2', b"").finish();
    let (_d, path) = write_temp(&bytes);
    expect_corrupt(open(&path, &limits()), "not a regular file");

    // ovf:size disagrees with the member.
    let sized = one_disk_ovf("disk.vmdk", r#"ovf:size="999""#);
    let (_d, path) = crafted(&[("vm.ovf", sized.as_bytes()), ("disk.vmdk", disk)]);
    expect_corrupt(open(&path, &limits()), "999");

    // Compressed disk.
    let gz = one_disk_ovf("disk.vmdk.gz", r#"ovf:compression="gzip""#);
    let (_d, path) = crafted(&[("vm.ovf", gz.as_bytes()), ("disk.vmdk.gz", b"\x1f\x8b")]);
    expect_unsupported(open(&path, &limits()), "without compression");

    // A descriptor or manifest over its limit.
    let (_d, path) = crafted(&[("vm.ovf", ovf.as_bytes()), ("disk.vmdk", disk)]);
    expect_limit(open(&path, &Limits { max_ovf_bytes: 100, ..limits() }), "vm.ovf");
    let mf = "SHA1(disk.vmdk)= 3c363836cf4e16666669a25da280a1865c2d2874\n".repeat(10);
    let (_d, path) = crafted(&[("vm.ovf", ovf.as_bytes()), ("vm.mf", mf.as_bytes()), ("disk.vmdk", disk)]);
    expect_limit(open(&path, &Limits { max_mf_bytes: 100, ..limits() }), "vm.mf");

    // An XML bomb inside an OVA is bounded the same way.
    let bomb = format!(r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">{}</Envelope>"#, "<a>".repeat(1000));
    let (_d, path) = crafted(&[("vm.ovf", bomb.as_bytes())]);
    expect_limit(open(&path, &limits()), "deep");
}

#[test]
fn ovf_anywhere_subfolders_blank_disks_and_missing_extras() {
    // The descriptor last, in a folder; the disk next to it; an ISO it references is absent.
    let ovf = one_disk_ovf("disk.vmdk", "").replace(
        r#"<File ovf:href="disk.vmdk" ovf:id="file1" />"#,
        r#"<File ovf:href="disk.vmdk" ovf:id="file1" /><File ovf:href="tools.iso" ovf:id="file2"/>"#,
    );
    assert!(ovf.contains("tools.iso"));
    let bytes = TarWriter::default()
        .entry("vm/", b'5', b"")
        .file("vm/disk.vmdk", b"KDMV....")
        .file("./vm/vm.ovf", ovf.as_bytes())
        .finish();
    let (_d, path) = write_temp(&bytes);
    let pkg = open(&path, &limits()).unwrap();
    assert_eq!(pkg.ovf_name, "vm/vm.ovf");
    assert_eq!(pkg.disks[0].member_name, "vm/disk.vmdk");
    assert_eq!(pkg.disks[0].member, 1024..1032);
    assert_eq!(pkg.warnings.len(), 1);
    assert!(pkg.warnings[0].contains("tools.iso"));

    // Percent-encoded hrefs resolve.
    let enc = one_disk_ovf("my%20disk.vmdk", "");
    let (_d, path) = crafted(&[("vm.ovf", enc.as_bytes()), ("my disk.vmdk", b"KDMV")]);
    assert_eq!(open(&path, &limits()).unwrap().disks[0].member_name, "my disk.vmdk");

    // A disk without a file is reported apart.
    let iosv = cot("iosv.ovf");
    let mut input_vmdk = vec![0u8; 152576]; // the size iosv.ovf gives its one file
    input_vmdk[..4].copy_from_slice(b"KDMV");
    let (_d, path) = crafted(&[("iosv.ovf", &iosv[..]), ("input.vmdk", &input_vmdk[..])]);
    let pkg = open(&path, &limits()).unwrap();
    assert_eq!(pkg.disks.len(), 1);
    assert_eq!(
        pkg.blank_disks,
        vec![BlankDisk { disk_id: "flash2".into(), ovf_disk_id: "flash2".into(), capacity_bytes: 128 << 20 }]
    );
}

#[test]
fn a_file_that_changed_since_open_is_refused() {
    let original = std::fs::read(data_dir().join("cot-ubuntu.2.0.ova")).unwrap();
    let (_dir, path) = write_temp(&original);
    let pkg = open(&path, &limits()).unwrap();
    std::io::Write::write_all(&mut std::fs::OpenOptions::new().append(true).open(&path).unwrap(), b"more").unwrap();
    expect_corrupt(pkg.open_disk(&pkg.disks[0]), "changed");
    expect_corrupt(verify_manifest(&pkg), "changed");
}

#[test]
fn many_items_parse_in_linear_time_and_nics_are_capped() {
    // 45 000 CPU items with distinct InstanceIDs (inside the element limit): a quadratic
    // de-duplication would take minutes.
    let items: String = (0..45_000).map(|i| format!("<Item><InstanceID>{i}</InstanceID></Item>")).collect();
    let xml = two_disk_ovf(&items);
    let started = std::time::Instant::now();
    parse_ovf(xml.as_bytes(), &limits()).unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());

    let nics: String = (0..65)
        .map(|i| {
            format!(
                "<ovf:Item><rasd:InstanceID>{i}</rasd:InstanceID><rasd:ResourceType>10</rasd:ResourceType></ovf:Item>"
            )
        })
        .collect();
    expect_limit(parse_ovf(two_disk_ovf(&nics).as_bytes(), &limits()), "network interfaces");
}

#[test]
fn attribute_and_namespace_floods_are_bounded() {
    let started = std::time::Instant::now();
    let attrs: String = (0..200_000).map(|i| format!(" a{i}=\"\"")).collect();
    let xml = format!(r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><x{attrs}/></Envelope>"#);
    expect_limit(parse_ovf(xml.as_bytes(), &limits()), "attributes");
    // Namespace declarations spread over many elements, each under the per-element cap.
    let decls: String = (0..100).map(|i| format!(" xmlns:p{i}=\"urn:{i}\"")).collect();
    let body = format!("<x{decls}><y/></x>").repeat(100);
    let xml = format!(r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">{body}</Envelope>"#);
    expect_limit(parse_ovf(xml.as_bytes(), &limits()), "namespaces");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
}

#[test]
fn multibyte_member_names_do_not_panic() {
    for name in ["€€", "a€", "€.ovf", "x.€mf", "ü.ovf"] {
        let (_d, path) = crafted(&[(name, b"data")]);
        let _ = open(&path, &limits());
    }
    let (_d, path) = crafted(&[("€€.ovf", one_disk_ovf("€.vmdk", "").as_bytes()), ("€.vmdk", b"KDMV")]);
    assert_eq!(open(&path, &limits()).unwrap().disks[0].member_name, "€.vmdk");
}

#[test]
fn links_carry_no_data_whatever_their_size_says() {
    let ovf = one_disk_ovf("disk.vmdk", "");
    let mut t = TarWriter::default();
    t.raw(&header("link-to-nowhere", base256(10 << 30), b'2'))
        .file("vm.ovf", ovf.as_bytes())
        .file("disk.vmdk", b"KDMV");
    let (_d, path) = write_temp(&t.finish());
    let pkg = open(&path, &limits()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[pkg.disks[0].member.start as usize..pkg.disks[0].member.end as usize], b"KDMV");
}

/// Issue 10: an OVA of 2000 `.ovf` members made an 8 MB error line. Every list a message
/// gives is capped, and so is every name an archive or descriptor puts into one.
#[test]
fn lists_and_names_in_messages_are_capped() {
    let long = "d".repeat(4000);
    let mut t = TarWriter::default();
    for n in 0..2000 {
        t.file(&format!("{long:.90}{n}.ovf"), b"");
    }
    let (_d, path) = write_temp(&t.finish());
    let m = expect_corrupt(open(&path, &limits()), "2000 .ovf descriptors");
    assert!(m.len() < 1500, "{} bytes: {m:.300}", m.len());
    assert!(m.contains("and 1995 more"), "{m:.300}");

    // No descriptor among 2000 members.
    let mut t = TarWriter::default();
    for n in 0..2000 {
        t.file(&format!("{long:.90}{n}.vmdk"), b"");
    }
    let (_d, path) = write_temp(&t.finish());
    let m = expect_corrupt(open(&path, &limits()), "no .ovf");
    assert!(m.len() < 1500 && m.contains("and 1995 more"), "{} bytes: {m:.300}", m.len());

    // A 100 000-character href is cut in the message.
    let ovf = one_disk_ovf(&format!("{}.vmdk", "x".repeat(100_000)), "");
    let (_d, path) = crafted(&[("vm.ovf", ovf.as_bytes())]);
    let m = expect_corrupt(open(&path, &limits()), "the archive has no member");
    assert!(m.len() < 1000, "{} bytes", m.len());

    // Thousands of referenced non-disk files missing: one warning, capped.
    let refs: String = (0..3000).map(|n| format!(r#"<File ovf:href="extra{n}.iso" ovf:id="x{n}"/>"#)).collect();
    let ovf = one_disk_ovf("disk.vmdk", "").replace("</References>", &format!("{refs}</References>"));
    let (_d, path) = crafted(&[("vm.ovf", ovf.as_bytes()), ("disk.vmdk", b"KDMV")]);
    let package = open(&path, &limits()).unwrap();
    assert_eq!(package.warnings.len(), 1, "one warning for the absent files");
    assert!(package.warnings[0].contains("3000 files") && package.warnings[0].len() < 500, "{:?}", package.warnings);
}

// ---------------------------------------------------------------------------------------------
// Unpacked OVF exports: the descriptor, its disks and its .mf in a directory.

/// A confinement to `root`, as SOURCE_ROOTS does it: resolved, inside, a regular file.
fn confined_to(root: &Path) -> impl Fn(&Path) -> Result<PathBuf, ImageError> + '_ {
    move |p: &Path| {
        let resolved = std::fs::canonicalize(p).map_err(|e| ImageError::io(p, e))?;
        if !resolved.starts_with(std::fs::canonicalize(root).unwrap()) {
            return Err(ImageError::Corrupt(format!("{} is outside SOURCE_ROOTS", p.display())));
        }
        unpacked::unconfined(&resolved)
    }
}

#[test]
fn a_real_virtualbox_export_opens_unpacked_and_its_mf_verifies() {
    let dir = data_dir().join("cot");
    let ovf = dir.join("ubuntu.2.0.ovf");
    assert!(unpacked::is_ovf_descriptor(&ovf));
    let package = unpacked::open(&ovf, &limits(), &unpacked::unconfined).unwrap();
    assert_eq!(package.disks.len(), 1);
    assert_eq!(package.disks[0].path, std::fs::canonicalize(dir.join("ubuntu.2.0-disk1.vmdk")).unwrap());
    assert_eq!(package.disks[0].source_format, crate::manifest::SourceFormat::Vmdk);
    assert_eq!(package.hardware.cpu, Some(1));
    let check = unpacked::verify_manifest(&package, &unpacked::unconfined).unwrap();
    assert!(check.all_verified() && check.entries.len() == 2, "{check:?}");
    assert!(check.unlisted_disks.is_empty());
}

#[test]
fn an_unpacked_export_reads_only_what_its_confinement_admits() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let export = root.path().join("export");
    std::fs::create_dir(&export).unwrap();
    let ovf_path = export.join("vm.ovf");
    std::fs::write(&ovf_path, one_disk_ovf("disk.vmdk", "")).unwrap();
    std::fs::write(outside.path().join("secret"), "root:x:0:0\n").unwrap();
    let confine = confined_to(root.path());

    // The disk is a symlink to a file outside: refused before it is read.
    std::os::unix::fs::symlink(outside.path().join("secret"), export.join("disk.vmdk")).unwrap();
    let m = expect_corrupt(unpacked::open(&ovf_path, &limits(), &confine), "outside SOURCE_ROOTS");
    assert!(!m.contains("root:x"), "{m}");
    std::fs::remove_file(export.join("disk.vmdk")).unwrap();

    // So is a .mf that leads outside.
    std::fs::write(export.join("disk.vmdk"), b"KDMV").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), export.join("vm.mf")).unwrap();
    let m = expect_corrupt(unpacked::open(&ovf_path, &limits(), &confine), "outside SOURCE_ROOTS");
    assert!(!m.contains("root:x"), "{m}");
    std::fs::remove_file(export.join("vm.mf")).unwrap();

    // And a file the .mf lists that leads outside, when the .mf is verified.
    std::os::unix::fs::symlink(outside.path().join("secret"), export.join("extra.iso")).unwrap();
    let mf = format!("SHA256(extra.iso)= {}\n", sha256_hex(b"root:x:0:0\n"));
    std::fs::write(export.join("vm.mf"), mf).unwrap();
    let package = unpacked::open(&ovf_path, &limits(), &confine).unwrap();
    expect_corrupt(unpacked::verify_manifest(&package, &confine), "outside SOURCE_ROOTS");

    // An href that climbs out is refused whatever it names; a missing disk is named.
    std::fs::write(&ovf_path, one_disk_ovf("../secret", "")).unwrap();
    expect_corrupt(unpacked::open(&ovf_path, &limits(), &confine), "..");
    std::fs::write(&ovf_path, one_disk_ovf("gone.vmdk", "")).unwrap();
    expect_corrupt(unpacked::open(&ovf_path, &limits(), &unpacked::unconfined), "gone.vmdk");

    // A "disk" that is plainly not one, and a disk of the wrong size.
    std::fs::write(export.join("notes.vmdk"), "just some notes\n").unwrap();
    std::fs::write(&ovf_path, one_disk_ovf("notes.vmdk", "")).unwrap();
    expect_corrupt(unpacked::open(&ovf_path, &limits(), &confine), "a text file, not a disk image");
    std::fs::write(&ovf_path, one_disk_ovf("disk.vmdk", r#"ovf:size="999""#)).unwrap();
    expect_corrupt(unpacked::open(&ovf_path, &limits(), &confine), "999");
}

#[test]
fn an_unpacked_export_that_does_not_match_its_mf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(data_dir().join("vsphere-gnu.ova"))
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let ovf = dir.path().join("export/ova-sample.ovf");
    let package = unpacked::open(&ovf, &limits(), &unpacked::unconfined).unwrap();
    assert_eq!(package.disks.len(), 2);
    let check = unpacked::verify_manifest(&package, &unpacked::unconfined).unwrap();
    assert!(check.entries.iter().all(|e| e.algorithm == DigestAlgorithm::Sha1 && e.verified), "{check:?}");
    let disk = &package.disks[1].path;
    let mut bytes = std::fs::read(disk).unwrap();
    let at = bytes.len() - 700;
    bytes[at] ^= 1;
    std::fs::write(disk, bytes).unwrap();
    expect_corrupt(unpacked::verify_manifest(&package, &unpacked::unconfined), "SHA1 of");
}
