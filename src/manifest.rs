//! The Artifact Manifest v1.0 (HyperSDK's schema): parsing and validation into a [`JobSpec`].
//!
//! Strict where safety needs it (version, disk ids, absolute paths, checksums, result names)
//! and where a lenient reading would silently build another VM than the one exported (vCPUs,
//! memory, MACs, NICs: docs/DECISIONS.md); lenient in spelling everywhere else: unknown keys are
//! ignored, numbers and booleans may arrive as strings, and a boot disk without
//! `boot_order_hint` is normal because Go omits zero values. Every error names its field.
//!
//! Also the one reader of manifest files ([`read_file`]), bounded by [`MAX_MANIFEST_BYTES`].
//!
//! It opens nothing a manifest names: confining `local_path` is [`crate::source`]'s, result
//! names are [`crate::names`]' and [`crate::output_layout`]'s.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use crate::mac::MacAddress;
use crate::names::{self, UnsafeName};

/// The only manifest version this daemon reads.
pub(crate) const SUPPORTED_VERSION: &str = "1.0";

/// Largest manifest accepted, in bytes. Real ones are a few KiB; every read of a manifest
/// file ([`read_file`]) stops one byte past this, so a multi-GB file dropped under a `*.json`
/// name costs the daemon 1 MiB of memory, not its size.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Most vCPUs a manifest may ask for: KVM's own ceiling on x86-64 (`KVM_MAX_VCPUS`, 4096 since
/// Linux 6.x; vSphere 8 stops at 768). More is a typo, not a VM.
pub(crate) const MAX_VCPUS: i64 = 4096;

/// Most memory a manifest may ask for, in GiB: 16 TiB, the domain builder's ceiling (vSphere 8
/// allows 24 TB, but no host this daemon feeds has that much).
pub(crate) const MAX_MEM_GB: f64 = 16384.0;

/// Least memory a manifest may ask for, in GiB: about 1 MiB, the unit the domain is written in.
pub(crate) const MIN_MEM_GB: f64 = 0.001;

/// Most NICs a manifest may list: the OVF reader's limit (`ovf::MAX_NICS`), far above what
/// vSphere (10) or VirtualBox (36) allow.
pub(crate) const MAX_NICS: usize = crate::image::ova::ovf::MAX_NICS;

/// Why a manifest cannot be run. Each variant's message is the first line of the `.error`
/// file, so it says what is wrong and what to do.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("The manifest is not valid JSON ({0}); fix it and submit it again.")]
    NotJson(String),
    #[error("The manifest is {0} bytes; manifests over 1 MiB ({MAX_MANIFEST_BYTES} bytes) are refused, check that the right file was dropped.")]
    TooLarge(u64),
    #[error("The manifest is not a regular file; drop the manifest itself, not a link, FIFO or directory.")]
    NotAFile,
    #[error("The manifest could not be read ({0}); check the queue directory's storage and permissions.")]
    Unreadable(String),
    #[error(
        "The manifest does not match the Artifact Manifest v1.0 schema ({0}); fix that field and submit it again."
    )]
    Schema(String),
    #[error("manifest_version is {0}, but this daemon reads only \"1.0\"; export with a HyperSDK that writes Artifact Manifest v1.0.")]
    WrongVersion(String),
    #[error("The manifest lists no disks (disks[] is empty or missing), so there is nothing to convert.")]
    NoDisks,
    #[error("Disk id {id:?} is not allowed: use 1 to 64 letters, digits, '_' and '-'.")]
    BadDiskId { id: String },
    #[error("Disk id {id:?} appears more than once; give every disk a unique id.")]
    DuplicateDiskId { id: String },
    #[error("Disk {id} has source_format {format:?}; supported formats are vmdk, ova, raw, qcow2, vhd, vhdx and vdi.")]
    BadSourceFormat { id: String, format: String },
    #[error(
        "Disk {id} has local_path {path:?}, which is not an absolute path; give the full path to the exported disk."
    )]
    RelativePath { id: String, path: String },
    #[error("Disk {id} has checksum {checksum:?}; it must look like sha256:<64 hex digits>.")]
    BadChecksum { id: String, checksum: String },
    #[error("Disk {id} has disk_type {value:?}; use boot, data or unknown.")]
    BadDiskType { id: String, value: String },
    #[error("vm.firmware is {0:?}; use bios, uefi or efi.")]
    BadFirmware(String),
    #[error("source.vm_name {name:?} cannot name the result files because {reason}; rename the VM in the manifest.")]
    UnsafeVmName { name: String, reason: UnsafeName },
    #[error("output.format is {0:?}, but hyper2kvm only produces qcow2; set output.format to \"qcow2\" or remove it.")]
    OutputNotQcow2(String),
    #[error("pipeline.convert.enabled is false, so no .qcow2 would be produced; enable conversion or do not submit this manifest to hyper2kvm.")]
    ConversionDisabled,
    #[error("pipeline.convert.compress_level is {0}; use a level from 0 to 9.")]
    BadCompressLevel(i64),
    #[error("vm.cpu is {0}; use a whole number of vCPUs from 1 to {MAX_VCPUS}, or leave it out for the default.")]
    BadCpu(String),
    #[error("vm.mem_gb is {0}; use a size in GiB from {MIN_MEM_GB} (1 MiB) to {MAX_MEM_GB} (16 TiB), or leave it out for the default.")]
    BadMemory(String),
    #[error("{nic} has mac {mac}, which is not a MAC address a VM can use; write it as 00:50:56:aa:bb:cc (unicast), or leave it out for a generated one.")]
    BadMac { nic: String, mac: String },
    #[error("{nic} has mac {mac}, which {other} already has; give each NIC its own MAC address.")]
    DuplicateMac { nic: String, mac: String, other: String },
    #[error("The manifest lists {0} NICs; at most {MAX_NICS} are supported, remove the extra ones.")]
    TooManyNics(usize),
    #[error("{field} is {value}, which cannot be read as {expected}; fix that field or remove it.")]
    BadValue { field: String, value: String, expected: &'static str },
    #[error("The result file for disk {id} would be named with {bytes} bytes, over the {limit}-byte limit of file names; shorten source.vm_name or the disk id.")]
    ResultNameTooLong { id: String, bytes: usize, limit: usize },
}

/// Why a manifest file could not be read. `Clone`, unlike [`ManifestError`], so that a job can
/// keep the outcome of its one read and report it when it parses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReadError {
    /// Over [`MAX_MANIFEST_BYTES`]; the file's size as its metadata gives it.
    #[error("{0} bytes, over the limit of {MAX_MANIFEST_BYTES}")]
    TooLarge(u64),
    #[error("not a regular file")]
    NotAFile,
    #[error("{0}")]
    Unreadable(String),
}

impl From<ReadError> for ManifestError {
    fn from(e: ReadError) -> ManifestError {
        match e {
            ReadError::TooLarge(size) => ManifestError::TooLarge(size),
            ReadError::NotAFile => ManifestError::NotAFile,
            ReadError::Unreadable(text) => ManifestError::Unreadable(text),
        }
    }
}

/// Reads a manifest file: the one reader of manifests for the scanner, the job, the daemon and
/// `status`. Never reads more than [`MAX_MANIFEST_BYTES`] + 1 bytes, whatever the file's size.
/// A symlink is not followed (anyone who can write the queue could point one at any file) and
/// a FIFO does not block the open.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let unreadable = |e: std::io::Error| ReadError::Unreadable(e.to_string());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| if e.raw_os_error() == Some(libc::ELOOP) { ReadError::NotAFile } else { unreadable(e) })?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(ReadError::NotAFile);
    }
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ReadError::TooLarge(meta.len().max(bytes.len() as u64)));
    }
    Ok(bytes)
}

/// A claimed manifest as read once: the bytes a job parses, names its results by and archives,
/// so that a file swapped under the job changes none of them.
#[derive(Debug, Clone)]
pub struct ManifestFile {
    name: String,
    read: Result<Vec<u8>, ReadError>,
    vm_name: String,
}

impl ManifestFile {
    /// Reads `path` (with [`read_file`]); `name` is the file's name in WATCH_DIR, which gives the
    /// VM its name when the manifest names none.
    pub fn read(path: &Path, name: &str) -> ManifestFile {
        let read = read_file(path);
        let vm_name = vm_name_hint(read.as_deref().unwrap_or_default(), name);
        ManifestFile { name: name.to_owned(), read, vm_name }
    }

    /// The file's name in WATCH_DIR.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bytes read, when the read succeeded.
    pub fn bytes(&self) -> Option<&[u8]> {
        self.read.as_deref().ok()
    }

    /// The VM's name as far as it can be told, for logs and the `.error` ([`vm_name_hint`]).
    pub fn vm_name(&self) -> &str {
        &self.vm_name
    }

    /// Parses and validates the bytes read ([`parse_with_warnings`]); a failed read is the
    /// error.
    pub fn parse(&self) -> Result<(JobSpec, Vec<String>), ManifestError> {
        self.parse_job().map(|(spec, _, warnings)| (spec, warnings))
    }

    /// [`ManifestFile::parse`], with the guest steps asked for ([`parse_job`]).
    pub fn parse_job(&self) -> Result<(JobSpec, Pipeline, Vec<String>), ManifestError> {
        match &self.read {
            Ok(bytes) => parse_job(bytes, &self.name),
            Err(e) => Err(e.clone().into()),
        }
    }
}

/// The source format a manifest names for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// `vmdk`: a VMware disk (descriptor, monolithic sparse or stream-optimized).
    Vmdk,
    /// The disk is a whole OVF package: an OVA archive, or the `.ovf` of an unpacked export
    /// (manifest values `ova` and `ovf`).
    Ova,
    /// `raw` (or `img`): a flat image, byte for byte the guest's disk.
    Raw,
    /// `qcow2`: a QEMU image, converted again so the result is self-contained.
    Qcow2,
    /// `vhd` (or `vpc`): a Hyper-V / Virtual PC image, fixed or dynamic.
    Vhd,
    /// `vhdx`: a Hyper-V VHDX image.
    Vhdx,
    /// `vdi`: a VirtualBox image.
    Vdi,
}

impl SourceFormat {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "vmdk" => Self::Vmdk,
            // An OVF package, packed (`.ova`) or unpacked (`.ovf` beside its disks): the
            // job tells which by the file's first bytes.
            "ova" | "ovf" => Self::Ova,
            "raw" | "img" => Self::Raw,
            "qcow2" => Self::Qcow2,
            "vhd" | "vpc" => Self::Vhd,
            "vhdx" => Self::Vhdx,
            "vdi" => Self::Vdi,
            _ => return None,
        })
    }

    /// The name as the manifest and reports spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vmdk => "vmdk",
            Self::Ova => "ova",
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
            Self::Vhd => "vhd",
            Self::Vhdx => "vhdx",
            Self::Vdi => "vdi",
        }
    }
}

/// What the manifest says a disk is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    /// `boot`: the disk the guest boots from; sorted first.
    Boot,
    /// `data`: not the boot disk.
    Data,
    /// `unknown`, or `disk_type` left out: ordered by `boot_order_hint`.
    #[default]
    Unknown,
}

/// VM firmware. The client writes `efi`; `uefi` is accepted as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// `bios`: legacy BIOS boot (SeaBIOS); the default.
    #[default]
    Bios,
    /// `uefi` or `efi`: UEFI boot (OVMF).
    Uefi,
}

/// One disk to convert, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DiskSpec {
    /// `disks[].id`: unique within the manifest, 1–64 of `[A-Za-z0-9_-]`; names the result file.
    pub id: String,
    /// `disks[].source_format`: how to read `local_path`.
    pub source_format: SourceFormat,
    /// `disks[].local_path`: absolute path of the exported disk, not yet confined to SOURCE_ROOTS.
    pub local_path: PathBuf,
    /// Size the producer reported; informative only (a mismatch is a warning).
    pub bytes: Option<u64>,
    /// Expected SHA-256 of `local_path`, verified before publishing.
    #[serde(serialize_with = "serialize_checksum")]
    pub sha256: Option<[u8; 32]>,
    /// `disks[].boot_order_hint`: lower boots first; `None` (Go omits 0) counts as 0.
    pub boot_order_hint: Option<i64>,
    /// `disks[].label`: the producer's name for the disk, informative only.
    pub label: Option<String>,
    /// `disks[].disk_type`: whether this is the boot disk.
    pub disk_type: DiskType,
    /// For a disk expanded from an OVA: its index among the OVA's disks. Never from the
    /// manifest itself, where `source_format: "ova"` names the whole archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ova_disk: Option<usize>,
}

fn serialize_checksum<S: serde::Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_str(&format!("sha256:{}", hex::encode(d))),
        None => s.serialize_none(),
    }
}

/// A network interface to recreate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NicSpec {
    /// `nics[].id`: the producer's name for the NIC, used in messages; `None` when absent.
    pub id: Option<String>,
    /// From a manifest, always one a NIC can use ([`MacAddress::is_usable_for_nic`]); from an
    /// OVF, any the descriptor held.
    pub mac: Option<MacAddress>,
    /// `nics[].network`: the network it was on at the source (e.g. `VM Network`), informative;
    /// the NIC attaches to LIBVIRT_NETWORK or LIBVIRT_BRIDGE.
    pub network: Option<String>,
}

/// Virtual hardware from the manifest's `vm` block; absent fields are `None` so that an OVF
/// (or the defaults of the domain builder) can fill them.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Hardware {
    /// `vm.cpu`: vCPUs, 1 to [`MAX_VCPUS`].
    pub cpu: Option<u32>,
    /// `vm.mem_gb`: memory in GiB, fractions allowed.
    pub mem_gb: Option<f64>,
    /// `vm.firmware`: BIOS or UEFI.
    pub firmware: Option<Firmware>,
    /// `vm.secureboot`: boot with Secure Boot enabled (UEFI only); false when absent.
    pub secureboot: bool,
    /// `vm.os_hint`: free-text guest OS description; one containing "win" marks Windows.
    pub os_hint: Option<String>,
    /// `vm.os_version`: the source's guest type id, e.g. vSphere's `windows2019srv_64Guest`.
    pub os_version: Option<String>,
}

/// A validated manifest: everything a job needs, in the order it needs it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobSpec {
    /// Names every result file, verbatim.
    pub vm_name: String,
    /// `source.vm_id`: the VM's id at the source (e.g. a vSphere managed object id), informative.
    pub vm_id: Option<String>,
    /// `source.provider`: the platform exported from (e.g. `vsphere`), informative.
    pub provider: Option<String>,
    /// The `vm` block: virtual hardware to recreate.
    pub hardware: Hardware,
    /// Disks in boot order: the boot disk is `disks[0]`.
    pub disks: Vec<DiskSpec>,
    /// `nics[]`, in manifest order: the guest's network interfaces.
    pub nics: Vec<NicSpec>,
    /// `pipeline.convert.compress`, overriding the configuration when present.
    pub compress: Option<bool>,
    /// `pipeline.convert.compress_level`, overriding COMPRESS_LEVEL when present.
    pub compress_level: Option<u32>,
}

/// The guest steps a manifest asks for (`pipeline.inspect`, `.fix`, `.validate`), each off
/// unless its block says `enabled: true`. Serialized as the manifest spells them, for `V.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Pipeline {
    /// `pipeline.inspect`: look at the guest OS before fixing it.
    pub inspect: InspectStep,
    /// `pipeline.fix`: make the guest boot on KVM (virt-v2v-in-place).
    pub fix: FixStep,
    /// `pipeline.validate`: check the outputs before publishing them.
    pub validate: ValidateStep,
}

/// `pipeline.inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct InspectStep {
    /// `pipeline.inspect.enabled`: run the step at all.
    pub enabled: bool,
    /// `pipeline.inspect.collect_guest_info`: ask for the guest's details; honoured only with `enabled`.
    pub collect_guest_info: bool,
}

/// `pipeline.fix`. The four repair switches are `None` when the manifest leaves them out:
/// virt-v2v-in-place does each of them always, so only an explicit `false` matters (it cannot
/// be honoured, and the job says so).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct FixStep {
    /// `pipeline.fix.enabled`: run the step at all.
    pub enabled: bool,
    /// `pipeline.fix.backup`: copy the staged disks (in TEMP_DIR) before changing them.
    pub backup: bool,
    /// `pipeline.fix.update_grub`: regenerate the boot loader's configuration.
    pub update_grub: Option<bool>,
    /// `pipeline.fix.regen_initramfs`: rebuild the initramfs with virtio drivers.
    pub regen_initramfs: Option<bool>,
    /// `pipeline.fix.fstab_mode`: how `/etc/fstab` entries are rewritten.
    pub fstab_mode: Option<FstabMode>,
    /// `pipeline.fix.remove_vmware_tools`: uninstall VMware Tools from the guest.
    pub remove_vmware_tools: Option<bool>,
}

/// `pipeline.fix.fstab_mode`, the original project's three modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FstabMode {
    /// Rewrite mounts to stable names (the original: UUID/PARTUUID/LABEL).
    StabilizeAll,
    /// Rewrite only `/dev/disk/by-path/…` entries.
    BypathOnly,
    /// Leave fstab alone.
    Noop,
}

impl FstabMode {
    fn parse(v: &Value) -> Option<FstabMode> {
        Some(match v.as_str()?.trim().to_ascii_lowercase().as_str() {
            "stabilize-all" => FstabMode::StabilizeAll,
            "bypath-only" => FstabMode::BypathOnly,
            "noop" => FstabMode::Noop,
            _ => return None,
        })
    }
}

/// `pipeline.validate`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ValidateStep {
    /// `pipeline.validate.enabled`: run the step at all.
    pub enabled: bool,
    /// `pipeline.validate.check_image_integrity`: `qemu-img check` every staged output.
    pub check_image_integrity: bool,
}

impl JobSpec {
    /// The boot disk, whose result `V.qcow2` is published last.
    pub fn boot_disk(&self) -> &DiskSpec {
        &self.disks[0]
    }
}

// ---- wire types: everything optional so that validation can say precisely what is wrong ----

#[derive(Deserialize, Default)]
struct RawManifest {
    manifest_version: Option<Value>,
    #[serde(default)]
    source: RawSource,
    #[serde(default)]
    vm: RawVm,
    disks: Option<Vec<RawDisk>>,
    #[serde(default)]
    nics: Vec<RawNic>,
    #[serde(default)]
    pipeline: RawPipeline,
    #[serde(default)]
    output: RawOutput,
}

#[derive(Deserialize, Default)]
struct RawSource {
    provider: Option<String>,
    vm_id: Option<Value>,
    vm_name: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawVm {
    cpu: Option<Value>,
    mem_gb: Option<Value>,
    firmware: Option<String>,
    secureboot: Option<Value>,
    os_hint: Option<String>,
    os_version: Option<String>,
}

#[derive(Deserialize)]
struct RawDisk {
    id: Option<String>,
    source_format: Option<String>,
    local_path: Option<String>,
    bytes: Option<Value>,
    checksum: Option<String>,
    boot_order_hint: Option<Value>,
    label: Option<String>,
    disk_type: Option<String>,
}

#[derive(Deserialize)]
struct RawNic {
    id: Option<String>,
    mac: Option<String>,
    network: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawPipeline {
    convert: Option<RawConvert>,
    inspect: Option<RawInspect>,
    fix: Option<RawFix>,
    validate: Option<RawValidate>,
}

#[derive(Deserialize, Default)]
struct RawInspect {
    enabled: Option<Value>,
    collect_guest_info: Option<Value>,
}

#[derive(Deserialize, Default)]
struct RawFix {
    enabled: Option<Value>,
    backup: Option<Value>,
    update_grub: Option<Value>,
    regen_initramfs: Option<Value>,
    fstab_mode: Option<Value>,
    remove_vmware_tools: Option<Value>,
}

#[derive(Deserialize, Default)]
struct RawValidate {
    enabled: Option<Value>,
    check_image_integrity: Option<Value>,
}

#[derive(Deserialize, Default)]
struct RawConvert {
    enabled: Option<Value>,
    compress: Option<Value>,
    compress_level: Option<Value>,
}

#[derive(Deserialize, Default)]
struct RawOutput {
    format: Option<String>,
}

/// Parses and validates manifest bytes. `file_name` supplies the default `vm_name` (its stem)
/// when `source.vm_name` is missing.
pub fn parse(bytes: &[u8], file_name: &str) -> Result<JobSpec, ManifestError> {
    parse_with_warnings(bytes, file_name).map(|(spec, _)| spec)
}

/// [`parse`], with the warnings a job records about a valid manifest (unknown keys).
pub(crate) fn parse_with_warnings(bytes: &[u8], file_name: &str) -> Result<(JobSpec, Vec<String>), ManifestError> {
    parse_job(bytes, file_name).map(|(spec, _, warnings)| (spec, warnings))
}

/// [`parse_with_warnings`], with the guest steps the manifest asks for. The [`Pipeline`] is
/// kept beside the [`JobSpec`] rather than in it: the domain builder and its tests build
/// `JobSpec`s of their own and have no use for it.
pub(crate) fn parse_job(bytes: &[u8], file_name: &str) -> Result<(JobSpec, Pipeline, Vec<String>), ManifestError> {
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(bytes.len() as u64));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ManifestError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(ManifestError::Schema("the top level must be a JSON object".into()));
    }
    let warnings = unknown_key_warnings(&value);
    // The error names the field by its JSON path, e.g. `disks[1].local_path: invalid type: …`.
    let raw: RawManifest = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ManifestError::Schema(format!("{path}: {}", e.into_inner()))
    })?;
    // The rest of the manifest is judged first: its errors say more than a pipeline option's.
    let pipeline = validate_pipeline(&raw.pipeline);
    let spec = validate(raw, file_name)?;
    Ok((spec, pipeline?, warnings))
}

/// Keys of the Artifact Manifest v1.0 schema, as JSON paths (`[]` for any array index): the
/// keys the contract and HyperSDK's example name, used or not. Anything under a key in
/// [`FREE_FORM_KEYS`] is the producer's own.
const SCHEMA_KEYS: &[&str] = &[
    "manifest_version",
    "source",
    "source.provider",
    "source.vm_id",
    "source.vm_name",
    "source.datacenter",
    "source.export_timestamp",
    "source.export_method",
    "vm",
    "vm.cpu",
    "vm.mem_gb",
    "vm.firmware",
    "vm.secureboot",
    "vm.os_hint",
    "vm.os_version",
    "disks",
    "disks[].id",
    "disks[].source_format",
    "disks[].bytes",
    "disks[].local_path",
    "disks[].checksum",
    "disks[].boot_order_hint",
    "disks[].label",
    "disks[].disk_type",
    "nics",
    "nics[].id",
    "nics[].mac",
    "nics[].network",
    "pipeline",
    "pipeline.inspect",
    "pipeline.inspect.enabled",
    "pipeline.inspect.collect_guest_info",
    "pipeline.fix",
    "pipeline.fix.enabled",
    "pipeline.fix.backup",
    "pipeline.fix.update_grub",
    "pipeline.fix.regen_initramfs",
    "pipeline.fix.fstab_mode",
    "pipeline.fix.remove_vmware_tools",
    "pipeline.convert",
    "pipeline.convert.enabled",
    "pipeline.convert.compress",
    "pipeline.convert.compress_level",
    "pipeline.validate",
    "pipeline.validate.enabled",
    "pipeline.validate.check_image_integrity",
    "output",
    "output.directory",
    "output.format",
];

/// Keys whose contents the schema leaves to the producer.
const FREE_FORM_KEYS: &[&str] = &["notes", "metadata", "options"];

/// Most unknown keys named one by one in a job's warnings; the rest are counted.
const MAX_UNKNOWN_KEYS_LISTED: usize = 10;

/// Warnings for the keys of `value` that the Artifact Manifest v1.0 schema does not define:
/// ignored, as the contract says, but said once per job (the job's log and `V.json`), so that
/// a misspelt key (`mem_GB`) does not go unnoticed.
fn unknown_key_warnings(value: &Value) -> Vec<String> {
    let mut unknown = UnknownKeys::default();
    collect_unknown_keys(value, "", "", &mut unknown);
    let mut warnings: Vec<String> = unknown
        .listed
        .iter()
        .map(|path| format!("manifest key {path} is not in the Artifact Manifest v1.0 schema; it was ignored"))
        .collect();
    if unknown.count > MAX_UNKNOWN_KEYS_LISTED {
        let more = unknown.count - MAX_UNKNOWN_KEYS_LISTED;
        warnings.push(format!("{more} more manifest keys not in the Artifact Manifest v1.0 schema were ignored"));
    }
    warnings
}

/// The first [`MAX_UNKNOWN_KEYS_LISTED`] unknown keys found, and how many there are.
#[derive(Default)]
struct UnknownKeys {
    listed: Vec<String>,
    count: usize,
}

/// `schema` is the path with `[]` for indices (to look up), `actual` the one with the real
/// indices (to report).
fn collect_unknown_keys(value: &Value, schema: &str, actual: &str, unknown: &mut UnknownKeys) {
    let join = |base: &str, key: &str| if base.is_empty() { key.to_owned() } else { format!("{base}.{key}") };
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let (schema_path, actual_path) = (join(schema, key), join(actual, key));
                if FREE_FORM_KEYS.contains(&schema_path.as_str()) {
                    continue;
                }
                if SCHEMA_KEYS.contains(&schema_path.as_str()) {
                    collect_unknown_keys(child, &schema_path, &actual_path, unknown);
                } else {
                    unknown.count += 1;
                    if unknown.listed.len() < MAX_UNKNOWN_KEYS_LISTED {
                        unknown.listed.push(capped(&actual_path));
                    }
                }
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                collect_unknown_keys(item, &format!("{schema}[]"), &format!("{actual}[{index}]"), unknown);
            }
        }
        _ => {}
    }
}

/// Checks only that `bytes` are one complete JSON document, as the queue does before it takes
/// a manifest that may still be being written.
pub fn is_complete_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

/// The `vm_name` a manifest file will produce results under, when it can be told at all:
/// used to name the `.error` of a manifest that fails validation.
pub fn vm_name_hint(bytes: &[u8], file_name: &str) -> String {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("source")?.get("vm_name")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| file_stem(file_name))
}

fn file_stem(file_name: &str) -> String {
    Path::new(file_name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| file_name.to_owned())
}

fn validate(raw: RawManifest, file_name: &str) -> Result<JobSpec, ManifestError> {
    check_version(raw.manifest_version.as_ref())?;
    check_output(&raw)?;
    let vm_name = raw.source.vm_name.clone().unwrap_or_else(|| file_stem(file_name));
    names::check_vm_name(&vm_name).map_err(|reason| ManifestError::UnsafeVmName { name: vm_name.clone(), reason })?;

    let raw_disks = raw.disks.unwrap_or_default();
    if raw_disks.is_empty() {
        return Err(ManifestError::NoDisks);
    }
    let mut disks = Vec::with_capacity(raw_disks.len());
    for (index, raw_disk) in raw_disks.into_iter().enumerate() {
        let disk = validate_disk(raw_disk, index)?;
        if disks.iter().any(|d: &DiskSpec| d.id == disk.id) {
            return Err(ManifestError::DuplicateDiskId { id: disk.id });
        }
        check_result_name(&vm_name, &disk.id)?;
        disks.push(disk);
    }
    order_for_boot(&mut disks);

    let convert = raw.pipeline.convert.unwrap_or_default();
    let compress_level = match read_i64(convert.compress_level.as_ref(), "pipeline.convert.compress_level")? {
        Some(level @ 0..=9) => Some(level as u32),
        Some(level) => return Err(ManifestError::BadCompressLevel(level)),
        None => None,
    };
    Ok(JobSpec {
        vm_name,
        vm_id: raw.source.vm_id.as_ref().and_then(as_string),
        provider: raw.source.provider,
        hardware: validate_hardware(raw.vm)?,
        disks,
        nics: validate_nics(raw.nics)?,
        compress: read_bool(convert.compress.as_ref(), "pipeline.convert.compress")?,
        compress_level,
    })
}

/// `pipeline.inspect`, `.fix` and `.validate`: every value read leniently as the other
/// booleans are, a value that cannot be read refused naming its path.
fn validate_pipeline(raw: &RawPipeline) -> Result<Pipeline, ManifestError> {
    let flag = |value: &Option<Value>, field: &str| -> Result<bool, ManifestError> {
        Ok(read_bool(value.as_ref(), field)?.unwrap_or(false))
    };
    let inspect = match &raw.inspect {
        None => InspectStep::default(),
        Some(i) => InspectStep {
            enabled: flag(&i.enabled, "pipeline.inspect.enabled")?,
            collect_guest_info: flag(&i.collect_guest_info, "pipeline.inspect.collect_guest_info")?,
        },
    };
    let fix = match &raw.fix {
        None => FixStep::default(),
        Some(f) => FixStep {
            enabled: flag(&f.enabled, "pipeline.fix.enabled")?,
            backup: flag(&f.backup, "pipeline.fix.backup")?,
            update_grub: read_bool(f.update_grub.as_ref(), "pipeline.fix.update_grub")?,
            regen_initramfs: read_bool(f.regen_initramfs.as_ref(), "pipeline.fix.regen_initramfs")?,
            fstab_mode: read_with(
                f.fstab_mode.as_ref(),
                "pipeline.fix.fstab_mode",
                FstabMode::parse,
                "stabilize-all, bypath-only or noop",
            )?,
            remove_vmware_tools: read_bool(f.remove_vmware_tools.as_ref(), "pipeline.fix.remove_vmware_tools")?,
        },
    };
    let validate = match &raw.validate {
        None => ValidateStep::default(),
        Some(v) => ValidateStep {
            enabled: flag(&v.enabled, "pipeline.validate.enabled")?,
            check_image_integrity: flag(&v.check_image_integrity, "pipeline.validate.check_image_integrity")?,
        },
    };
    Ok(Pipeline { inspect, fix, validate })
}

/// NICs as listed, each MAC read in any spelling [`MacAddress`] knows and written as libvirt
/// wants it. A MAC that cannot be used is refused rather than dropped: the VM would come up
/// with another address, and whatever was bound to the old one (a DHCP reservation, a
/// licence) would break without a word.
fn validate_nics(raw: Vec<RawNic>) -> Result<Vec<NicSpec>, ManifestError> {
    if raw.len() > MAX_NICS {
        return Err(ManifestError::TooManyNics(raw.len()));
    }
    let mut nics: Vec<NicSpec> = Vec::with_capacity(raw.len());
    let mut labels: Vec<String> = Vec::with_capacity(raw.len());
    for (index, nic) in raw.into_iter().enumerate() {
        let label = match &nic.id {
            Some(id) if !id.is_empty() => format!("NIC nics[{index}] ({})", capped(&format!("{id:?}"))),
            _ => format!("NIC nics[{index}]"),
        };
        let mac = match nic.mac.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
            None => None,
            Some(text) => {
                let bad = || ManifestError::BadMac { nic: label.clone(), mac: capped(&format!("{text:?}")) };
                let mac = text.parse::<MacAddress>().map_err(|_| bad())?;
                if !mac.is_usable_for_nic() {
                    return Err(bad());
                }
                if let Some(other) = nics.iter().position(|n| n.mac == Some(mac)) {
                    let other = labels[other].clone();
                    return Err(ManifestError::DuplicateMac { nic: label, mac: mac.to_string(), other });
                }
                Some(mac)
            }
        };
        nics.push(NicSpec { id: nic.id, mac, network: nic.network });
        labels.push(label);
    }
    Ok(nics)
}

fn check_version(version: Option<&Value>) -> Result<(), ManifestError> {
    match version {
        Some(Value::String(s)) if s == SUPPORTED_VERSION => Ok(()),
        // A number such as 1.0 would print like the string it should have been.
        Some(Value::Number(n)) => Err(ManifestError::WrongVersion(format!("the number {n}"))),
        Some(other) => Err(ManifestError::WrongVersion(capped(&other.to_string()))),
        None => Err(ManifestError::WrongVersion("missing".into())),
    }
}

fn check_output(raw: &RawManifest) -> Result<(), ManifestError> {
    if let Some(format) = &raw.output.format {
        if !format.eq_ignore_ascii_case("qcow2") {
            return Err(ManifestError::OutputNotQcow2(capped(format)));
        }
    }
    let enabled =
        read_bool(raw.pipeline.convert.as_ref().and_then(|c| c.enabled.as_ref()), "pipeline.convert.enabled")?;
    if enabled == Some(false) {
        return Err(ManifestError::ConversionDisabled);
    }
    Ok(())
}

/// Any disk may become a data disk (`V-<id>.qcow2`), the longest of the result names.
pub(crate) fn check_result_name(vm_name: &str, disk_id: &str) -> Result<(), ManifestError> {
    let bytes = crate::output_layout::data_disk_file(vm_name, disk_id).len();
    if bytes > names::MAX_FILE_NAME_BYTES {
        return Err(ManifestError::ResultNameTooLong {
            id: disk_id.to_owned(),
            bytes,
            limit: names::MAX_FILE_NAME_BYTES,
        });
    }
    Ok(())
}

fn validate_disk(raw: RawDisk, index: usize) -> Result<DiskSpec, ManifestError> {
    let id = raw.id.ok_or_else(|| ManifestError::Schema(format!("disks[{index}].id is missing")))?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') || id.len() > 64 {
        return Err(ManifestError::BadDiskId { id: capped(&id) });
    }
    let format_text = raw.source_format.unwrap_or_default();
    let source_format = SourceFormat::parse(&format_text)
        .ok_or_else(|| ManifestError::BadSourceFormat { id: id.clone(), format: capped(&format_text) })?;
    let path_text = raw
        .local_path
        .ok_or_else(|| ManifestError::Schema(format!("disks[{index}].local_path (disk {id}) is missing")))?;
    if !path_text.starts_with('/') || path_text.contains('\0') {
        return Err(ManifestError::RelativePath { id, path: capped(&path_text) });
    }
    let sha256 = match raw.checksum.as_deref().filter(|c| !c.is_empty()) {
        Some(text) => Some(
            parse_checksum(text)
                .ok_or_else(|| ManifestError::BadChecksum { id: id.clone(), checksum: capped(text) })?,
        ),
        None => None,
    };
    let disk_type = match raw.disk_type.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("unknown") => DiskType::Unknown,
        Some("boot") => DiskType::Boot,
        Some("data") => DiskType::Data,
        Some(other) => return Err(ManifestError::BadDiskType { id, value: capped(other) }),
    };
    Ok(DiskSpec {
        id,
        source_format,
        local_path: PathBuf::from(path_text),
        bytes: read_u64(raw.bytes.as_ref(), &format!("disks[{index}].bytes"))?,
        sha256,
        boot_order_hint: read_i64(raw.boot_order_hint.as_ref(), &format!("disks[{index}].boot_order_hint"))?,
        label: raw.label,
        disk_type,
        ova_disk: None,
    })
}

fn parse_checksum(text: &str) -> Option<[u8; 32]> {
    let (algo, digest) = text.split_once(':')?;
    if !algo.eq_ignore_ascii_case("sha256") || digest.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(digest, &mut out).ok()?;
    Some(out)
}

/// Puts the boot disk first: `disk_type == boot`, else the lowest hint (missing counts as 0),
/// ties by array order. The other disks keep their relative order by the same key.
fn order_for_boot(disks: &mut [DiskSpec]) {
    // A stable sort keeps array order among equal keys.
    disks.sort_by_key(|d| (d.disk_type != DiskType::Boot, d.boot_order_hint.unwrap_or(0)));
}

fn validate_hardware(vm: RawVm) -> Result<Hardware, ManifestError> {
    let firmware = match vm.firmware.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => None,
        Some("bios") => Some(Firmware::Bios),
        Some("uefi") | Some("efi") => Some(Firmware::Uefi),
        Some(other) => return Err(ManifestError::BadFirmware(capped(other))),
    };
    Ok(Hardware {
        cpu: validate_cpu(vm.cpu.as_ref())?,
        mem_gb: validate_mem_gb(vm.mem_gb.as_ref())?,
        firmware,
        secureboot: read_bool(vm.secureboot.as_ref(), "vm.secureboot")?.unwrap_or(false),
        os_hint: vm.os_hint.filter(|s| !s.is_empty()),
        os_version: vm.os_version.filter(|s| !s.is_empty()),
    })
}

/// `vm.cpu`: absent, `null` or 0 (Go's zero value, written when the producer does not know)
/// leave the default; anything else must be a vCPU count KVM can run. A manifest asking for an
/// impossible VM is refused, not silently shrunk to the default.
fn validate_cpu(value: Option<&Value>) -> Result<Option<u32>, ManifestError> {
    let Some(value) = value.filter(|v| !v.is_null()) else { return Ok(None) };
    match as_i64(value) {
        Some(0) => Ok(None),
        Some(n @ 1..=MAX_VCPUS) => Ok(u32::try_from(n).ok()),
        _ => Err(ManifestError::BadCpu(capped(&value.to_string()))),
    }
}

/// `vm.mem_gb`, in GiB: absent, `null` or 0 leave the default, as for [`validate_cpu`].
fn validate_mem_gb(value: Option<&Value>) -> Result<Option<f64>, ManifestError> {
    let Some(value) = value.filter(|v| !v.is_null()) else { return Ok(None) };
    match as_f64(value) {
        Some(0.0) => Ok(None),
        // The range check also refuses NaN and infinity ("inf" parses as a number).
        Some(gb) if (MIN_MEM_GB..=MAX_MEM_GB).contains(&gb) => Ok(Some(gb)),
        _ => Err(ManifestError::BadMemory(capped(&value.to_string()))),
    }
}

// ---- lenient scalars: producers in other languages write numbers and booleans as strings ----
// Lenient in spelling, not in meaning: a value that is there but cannot be read is refused,
// naming its field, rather than taken as absent.

fn read_i64(value: Option<&Value>, field: &str) -> Result<Option<i64>, ManifestError> {
    read_with(value, field, as_i64, "a whole number")
}

fn read_u64(value: Option<&Value>, field: &str) -> Result<Option<u64>, ManifestError> {
    read_with(value, field, |v| as_i64(v).and_then(|n| u64::try_from(n).ok()), "a whole number of 0 or more")
}

fn read_bool(value: Option<&Value>, field: &str) -> Result<Option<bool>, ManifestError> {
    read_with(value, field, as_bool, "true or false")
}

/// `None` for an absent or `null` value, the value read by `read`, or [`ManifestError::BadValue`].
fn read_with<T>(
    value: Option<&Value>,
    field: &str,
    read: impl Fn(&Value) -> Option<T>,
    expected: &'static str,
) -> Result<Option<T>, ManifestError> {
    match value.filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => read(v).map(Some).ok_or_else(|| ManifestError::BadValue {
            field: field.to_owned(),
            value: capped(&v.to_string()),
            expected,
        }),
    }
}

/// At most 80 characters of a value quoted in a message.
fn capped(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(true),
            "false" | "no" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_i64().map(|i| i != 0),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
