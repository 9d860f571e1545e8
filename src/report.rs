//! The job report `V.json`: what was converted, from what, into what, how long it took, and
//! the digests of the outputs.
//!
//! It only builds the report; writing and publishing it is [`crate::publish`]'s.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::BootCheck;
use crate::guest::{BootReport, FixReport, GuestInfo, Verification};
use crate::manifest::{Pipeline, SourceFormat};

/// One converted disk.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DiskReport {
    pub id: String,
    pub boot: bool,
    pub source_path: PathBuf,
    pub source_format: SourceFormat,
    /// Format as detected by inspection (for a VMDK, with its subformat).
    pub detected_format: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subformat: Option<String>,
    pub virtual_size: u64,
    /// Bytes of the source disk that hold data, when its reader knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
    /// The source's delta chain below it, child first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<PathBuf>,
    /// The VMDK descriptor's `ddb.*` keys, as exported.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ddb: std::collections::BTreeMap<String, String>,
    pub source_bytes: u64,
    /// File name in OUTPUT_DIR.
    pub output: String,
    pub output_format: &'static str,
    pub output_bytes: u64,
    /// Whether the manifest's `checksum` of the source was verified (taken in the
    /// conversion's own pass for the formats read natively). There is no digest of the
    /// output: it would cost a second read of the whole qcow2 (docs/DECISIONS.md, "One pass
    /// over the source").
    pub source_checksum_verified: bool,
    /// What checked the output instead: `qemu-img check: no errors` (its metadata read and
    /// cross-checked; a failed check fails the job), or why no check was made.
    pub output_check: &'static str,
    pub seconds: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub job_id: String,
    pub vm_name: String,
    pub instance: Option<String>,
    pub host: String,
    pub converter: &'static str,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub seconds: f64,
    pub disks: Vec<DiskReport>,
    /// Name of the domain in the XML (and in libvirt when registered).
    pub domain_name: String,
    /// The domain's UUID, stable for a VM: re-importing it updates the same domain.
    pub domain_uuid: String,
    /// The disk files the domain uses, boot disk first: in OUTPUT_DIR, or in LIBVIRT_POOL's
    /// directory when the disks were placed there.
    pub domain_disks: Vec<PathBuf>,
    /// The libvirt URI the domain was defined in, when it was.
    pub libvirt_uri: Option<String>,
    /// The storage pool the domain's disks were placed in or left for, when registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt_pool: Option<String>,
    /// This job created that pool: LIBVIRT_POOL was `default` and the host had none.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub libvirt_pool_created: bool,
    pub domain_xml: String,
    /// The domain's firmware, disk bus, NIC model, machine type and OS id, each with its reason.
    pub devices: crate::libvirt::domain_xml::Devices,
    /// What the guest stage was asked, did and skipped.
    pub guest: GuestReport,
    pub warnings: Vec<String>,
}

/// `V.json`'s `guest`: the manifest's `pipeline.inspect`/`fix`/`validate` and BOOT_CHECK, what
/// each step found, and what was not done and why (docs/GUEST.md).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct GuestReport {
    pub asked: GuestAsked,
    /// The guest as inspection saw it (its kernels' virtio facts as verified after a fix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspect: Option<GuestInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<FixRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validate: Option<ValidateRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_check: Option<BootReport>,
    /// Each step run, with its time and how its qemu ran.
    pub steps: Vec<StepRecord>,
    pub skipped: Vec<Skipped>,
}

/// What the job was asked for: the manifest's guest steps and the configuration's BOOT_CHECK.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct GuestAsked {
    #[serde(flatten)]
    pub pipeline: Pipeline,
    pub boot_check: BootCheck,
}

/// The fix: virt-v2v-in-place's run, what hyper2kvm mended after it, and the verification.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FixRecord {
    pub done: bool,
    /// `log`, `seconds`, `accel`.
    #[serde(flatten)]
    pub tool: FixReport,
    pub mended: Vec<String>,
    pub verification: Verification,
    /// The manifest's repair options against what the tool does.
    pub options: Vec<FixOption>,
    /// Copies of the staged disks taken before the fix (`fix.backup`), kept until the job ends.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backup: Vec<PathBuf>,
}

/// One `pipeline.fix` option: asked (the manifest's value; `null` when left out) and done.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FixOption {
    pub option: &'static str,
    pub asked: serde_json::Value,
    /// `always`: virt-v2v-in-place has no switch for it and always does it.
    pub done: &'static str,
    pub note: String,
}

/// `pipeline.validate`: `qemu-img check` of every staged output.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ValidateRecord {
    pub image_integrity: Vec<IntegrityCheck>,
}

/// One output's `qemu-img check`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IntegrityCheck {
    /// File name in OUTPUT_DIR.
    pub output: String,
    pub ok: bool,
    /// qemu-img's JSON (corruptions, leaks, check-errors, …).
    pub result: serde_json::Value,
    pub seconds: f64,
}

/// One guest step's time.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StepRecord {
    pub step: &'static str,
    pub seconds: f64,
    /// `kvm` or `tcg`; absent for steps without a VM (qemu-img check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
}

/// A step or option not done, and why.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Skipped {
    pub step: String,
    pub reason: String,
}
