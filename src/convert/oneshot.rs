//! `hyper2kvm convert` and `hyper2kvm inspect`: the engine used by hand, outside the queue.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Compression, ConversionRequest, ConvertError, Converter, JobControl};
use crate::engine::pipeline::image_error;
use crate::engine::Auto;
use crate::image::ova;
use crate::manifest::SourceFormat;

/// One-shot conversions have no CONVERSION_TIMEOUT.
const NO_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Guesses a source format from the file name, for commands run by hand.
pub fn guess_format(path: &Path) -> SourceFormat {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("vmdk") => SourceFormat::Vmdk,
        Some("ova") => SourceFormat::Ova,
        Some("qcow2") => SourceFormat::Qcow2,
        Some("vhd") => SourceFormat::Vhd,
        Some("vhdx") => SourceFormat::Vhdx,
        Some("vdi") => SourceFormat::Vdi,
        _ => SourceFormat::Raw,
    }
}

/// Describes a source image: format, subformat, virtual size, allocated bytes, referenced
/// files and chain (native formats), and for an OVA its disks and OVF hardware.
pub fn inspect(source: &Path, format: SourceFormat) -> Result<serde_json::Value, ConvertError> {
    if !crate::engine::reads_natively(format) {
        let info = Auto::default().inspect(source, format, &JobControl::new(NO_DEADLINE))?;
        return serde_json::to_value(info).map_err(|e| ConvertError::Failed(e.to_string()));
    }
    if format == SourceFormat::Ova {
        return inspect_ova(source);
    }
    let (_, info) = crate::engine::open(source, format).map_err(image_error)?;
    serde_json::to_value(info).map_err(|e| ConvertError::Failed(e.to_string()))
}

fn inspect_ova(source: &Path) -> Result<serde_json::Value, ConvertError> {
    let package = ova::open(source, &ova::Limits::default()).map_err(image_error)?;
    let mut disks = Vec::new();
    for (index, disk) in package.disks.iter().enumerate() {
        let (_, info) = crate::engine::open_ova_disk(source, index).map_err(image_error)?;
        disks.push(serde_json::json!({
            "disk_id": disk.disk_id,
            "href": disk.href,
            "capacity_bytes": disk.capacity_bytes,
            "member_offset": disk.member.start,
            "member_bytes": disk.member.end - disk.member.start,
            "subformat": info.subformat,
            "virtual_size": info.virtual_size,
            "allocated_bytes": info.allocated_bytes,
        }));
    }
    let hw = &package.hardware;
    let nics: Vec<_> =
        hw.nics.iter().map(|n| serde_json::json!({"network": n.network, "mac": n.mac, "model": n.model})).collect();
    Ok(serde_json::json!({
        "format": "ova",
        "ovf": package.ovf_name,
        "manifest_listed": package.manifest.is_some(),
        "disks": disks,
        "hardware": {
            "name": hw.name,
            "cpu": hw.cpu,
            "memory_mib": hw.memory_mib,
            "firmware": hw.firmware,
            "secure_boot": hw.secure_boot,
            "os_type": hw.os_type,
            "nics": nics,
        },
        "warnings": package.warnings,
    }))
}

/// Converts `source` to a new qcow2 at `destination`, with a progress line on a terminal.
pub fn convert(
    source: &Path,
    format: SourceFormat,
    destination: &Path,
    compression: Option<Compression>,
) -> Result<(), ConvertError> {
    if destination.exists() {
        return Err(ConvertError::Failed(format!(
            "{} already exists; choose another name or remove it",
            destination.display()
        )));
    }
    let converter = Auto::default();
    let control = JobControl::new(NO_DEADLINE);
    let info = converter.inspect(source, format, &control)?;
    control.progress.total_bytes.store(info.virtual_size, Ordering::Relaxed);
    let finished = Arc::new(AtomicBool::new(false));
    let painter = std::io::stderr().is_terminal().then(|| spawn_progress(control.clone(), finished.clone()));
    let request = ConversionRequest { source, format, destination, compression, ova_disk: None };
    let result = converter.convert(&request, &control);
    finished.store(true, Ordering::SeqCst);
    if let Some(painter) = painter {
        let _ = painter.join();
    }
    if result.is_err() {
        let _ = std::fs::remove_file(destination);
    }
    result
}

/// A progress bar on stderr (rate and ETA) until `finished`.
fn spawn_progress(control: JobControl, finished: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let total = control.progress.total_bytes.load(Ordering::Relaxed);
        let bar = indicatif::ProgressBar::new(total);
        let style = indicatif::ProgressStyle::with_template(
            "{bar:40.cyan/blue} {percent:>3}%  {bytes}/{total_bytes}  {binary_bytes_per_sec}  ETA {eta}",
        );
        if let Ok(style) = style {
            bar.set_style(style);
        }
        while !finished.load(Ordering::SeqCst) {
            bar.set_position(control.progress.done_bytes.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.set_position(control.progress.done_bytes.load(Ordering::Relaxed));
        bar.finish();
    })
}
