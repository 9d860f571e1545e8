//! The Artifact Manifest v1.0 (HyperSDK's schema): parsing and validation into a [`JobSpec`].
//!
//! Strict where safety needs it (version, disk ids, absolute paths, checksums, result names),
//! lenient everywhere else: unknown keys are ignored, numbers may arrive as strings, and a boot
//! disk without `boot_order_hint` is normal because Go omits zero values.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use crate::names::{self, UnsafeName};

/// The only manifest version this daemon reads.
pub const SUPPORTED_VERSION: &str = "1.0";

/// Largest manifest accepted, in bytes. Real ones are a few KiB.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Why a manifest cannot be run. Each variant's message is the first line of the `.error`
/// file, so it says what is wrong and what to do.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("The manifest is not valid JSON ({0}); fix it and submit it again.")]
    NotJson(String),
    #[error("The manifest is {0} bytes; manifests over 1 MiB are refused, check that the right file was dropped.")]
    TooLarge(u64),
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
    #[error("The result file for disk {id} would be named with {bytes} bytes, over the {limit}-byte limit of file names; shorten source.vm_name or the disk id.")]
    ResultNameTooLong { id: String, bytes: usize, limit: usize },
}

/// The source format a manifest names for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Vmdk,
    /// The disk is a whole OVF package: an OVA archive, or the `.ovf` of an unpacked export
    /// (manifest values `ova` and `ovf`).
    Ova,
    Raw,
    Qcow2,
    Vhd,
    Vhdx,
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
    Boot,
    Data,
    #[default]
    Unknown,
}

/// VM firmware. The client writes `efi`; `uefi` is accepted as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

/// One disk to convert, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DiskSpec {
    pub id: String,
    pub source_format: SourceFormat,
    pub local_path: PathBuf,
    /// Size the producer reported; informative only (a mismatch is a warning).
    pub bytes: Option<u64>,
    /// Expected SHA-256 of `local_path`, verified before publishing.
    #[serde(serialize_with = "serialize_checksum")]
    pub sha256: Option<[u8; 32]>,
    pub boot_order_hint: Option<i64>,
    pub label: Option<String>,
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
    pub id: Option<String>,
    pub mac: Option<String>,
    pub network: Option<String>,
}

/// Virtual hardware from the manifest's `vm` block; absent fields are `None` so that an OVF
/// (or the defaults of the domain builder) can fill them.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Hardware {
    pub cpu: Option<u32>,
    pub mem_gb: Option<f64>,
    pub firmware: Option<Firmware>,
    pub secureboot: bool,
    pub os_hint: Option<String>,
    pub os_version: Option<String>,
}

/// A validated manifest: everything a job needs, in the order it needs it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobSpec {
    /// Names every result file, verbatim.
    pub vm_name: String,
    pub vm_id: Option<String>,
    pub provider: Option<String>,
    pub hardware: Hardware,
    /// Disks in boot order: the boot disk is `disks[0]`.
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    /// `pipeline.convert.compress`, overriding the configuration when present.
    pub compress: Option<bool>,
    /// `pipeline.convert.compress_level`, overriding COMPRESS_LEVEL when present.
    pub compress_level: Option<u32>,
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
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(bytes.len() as u64));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ManifestError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(ManifestError::Schema("the top level must be a JSON object".into()));
    }
    let raw: RawManifest = serde_json::from_value(value).map_err(|e| ManifestError::Schema(e.to_string()))?;
    validate(raw, file_name)
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
    let compress_level = match convert.compress_level.as_ref().and_then(as_i64) {
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
        nics: raw.nics.into_iter().map(|n| NicSpec { id: n.id, mac: n.mac, network: n.network }).collect(),
        compress: convert.compress.as_ref().and_then(as_bool),
        compress_level,
    })
}

fn check_version(version: Option<&Value>) -> Result<(), ManifestError> {
    match version {
        Some(Value::String(s)) if s == SUPPORTED_VERSION => Ok(()),
        // A number such as 1.0 would print like the string it should have been.
        Some(Value::Number(n)) => Err(ManifestError::WrongVersion(format!("the number {n}"))),
        Some(other) => Err(ManifestError::WrongVersion(other.to_string())),
        None => Err(ManifestError::WrongVersion("missing".into())),
    }
}

fn check_output(raw: &RawManifest) -> Result<(), ManifestError> {
    if let Some(format) = &raw.output.format {
        if !format.eq_ignore_ascii_case("qcow2") {
            return Err(ManifestError::OutputNotQcow2(format.clone()));
        }
    }
    let enabled = raw.pipeline.convert.as_ref().and_then(|c| c.enabled.as_ref()).and_then(as_bool);
    if enabled == Some(false) {
        return Err(ManifestError::ConversionDisabled);
    }
    Ok(())
}

/// Any disk may become a data disk (`V-<id>.qcow2`), the longest of the result names.
pub fn check_result_name(vm_name: &str, disk_id: &str) -> Result<(), ManifestError> {
    let bytes = names::data_disk_file(vm_name, disk_id).len();
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
    let id = raw.id.ok_or_else(|| ManifestError::Schema(format!("disks[{index}] has no id")))?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') || id.len() > 64 {
        return Err(ManifestError::BadDiskId { id });
    }
    let format_text = raw.source_format.unwrap_or_default();
    let source_format = SourceFormat::parse(&format_text)
        .ok_or_else(|| ManifestError::BadSourceFormat { id: id.clone(), format: format_text })?;
    let path_text = raw.local_path.ok_or_else(|| ManifestError::Schema(format!("disk {id} has no local_path")))?;
    if !path_text.starts_with('/') || path_text.contains('\0') {
        return Err(ManifestError::RelativePath { id, path: path_text });
    }
    let sha256 = match raw.checksum.as_deref().filter(|c| !c.is_empty()) {
        Some(text) => Some(
            parse_checksum(text)
                .ok_or_else(|| ManifestError::BadChecksum { id: id.clone(), checksum: text.to_owned() })?,
        ),
        None => None,
    };
    let disk_type = match raw.disk_type.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("unknown") => DiskType::Unknown,
        Some("boot") => DiskType::Boot,
        Some("data") => DiskType::Data,
        Some(other) => return Err(ManifestError::BadDiskType { id, value: other.to_owned() }),
    };
    Ok(DiskSpec {
        id,
        source_format,
        local_path: PathBuf::from(path_text),
        bytes: raw.bytes.as_ref().and_then(as_i64).and_then(|b| u64::try_from(b).ok()),
        sha256,
        boot_order_hint: raw.boot_order_hint.as_ref().and_then(as_i64),
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
        Some(other) => return Err(ManifestError::BadFirmware(other.to_owned())),
    };
    Ok(Hardware {
        cpu: vm.cpu.as_ref().and_then(as_i64).filter(|&n| n > 0).and_then(|n| u32::try_from(n).ok()),
        mem_gb: vm.mem_gb.as_ref().and_then(as_f64).filter(|&g| g > 0.0),
        firmware,
        secureboot: vm.secureboot.as_ref().and_then(as_bool).unwrap_or(false),
        os_hint: vm.os_hint.filter(|s| !s.is_empty()),
        os_version: vm.os_version.filter(|s| !s.is_empty()),
    })
}

// ---- lenient scalars: producers in other languages write numbers and booleans as strings ----

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
