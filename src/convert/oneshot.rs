//! `hyper2kvm convert` and `hyper2kvm inspect`: the engine used by hand, outside the queue.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Compression, ConversionRequest, ConvertError, Converter, ImageInfo, JobControl};
use crate::engine::Auto;
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

/// Describes a source image.
pub fn inspect(source: &Path, format: SourceFormat) -> Result<ImageInfo, ConvertError> {
    Auto::default().inspect(source, format, &JobControl::new(NO_DEADLINE))
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
