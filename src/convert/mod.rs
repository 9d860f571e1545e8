//! Disk conversion behind a small [`Converter`] trait.
//!
//! Converters are synchronous and run on a blocking thread: a conversion is long, CPU- and
//! I/O-bound work, and the daemon's async loop only needs to start it, watch its [`JobControl`]
//! and collect the result. [`native`] converts VMDK, OVA and raw natively; [`qemu_img`]
//! drives `qemu-img` for the formats read nowhere else (vhd, vhdx, vdi, qcow2 input).

pub mod auto;
pub mod fields;
pub mod native;
pub mod oneshot;
pub mod qemu_img;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::CompressionType;
use crate::image::tap::Tap;
use crate::image::{ImageError, SourceInfo};
use crate::manifest::SourceFormat;
use crate::source::SourceRoots;

/// Compressed output: codec and level (0–9; mapped for zstd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// The codec: `compression_type` of QEMU_CONVERT_OPTIONS.
    pub kind: CompressionType,
    /// COMPRESS_LEVEL (or the manifest's `compress_level`), 0–9.
    pub level: u32,
}

/// One disk to convert.
#[derive(Debug, Clone)]
pub struct ConversionRequest<'a> {
    /// The source disk (an OVA, or a VMDK descriptor, for formats made of several files).
    pub source: &'a Path,
    /// The disk's `source_format` from the manifest.
    pub format: SourceFormat,
    /// Where the qcow2 is written. Its directory was created by the job for this job alone,
    /// so nothing else can have put a symlink there.
    pub destination: &'a Path,
    /// Write compressed clusters with this codec and level; `None` writes them uncompressed.
    pub compression: Option<Compression>,
    /// With `format == Ova`: which of the archive's disks (in boot order).
    pub ova_disk: Option<usize>,
    /// The files the source referred to when the job inspected it and confined them to
    /// SOURCE_ROOTS. A converter that opens the source again refuses one that now refers to
    /// any other: the descriptor was rewritten since, and the new file was never confined.
    pub inspected_files: Option<&'a [PathBuf]>,
    /// The only way the converter may open the source and the files it names
    /// ([`SourceRoots::anywhere`] for the commands run by hand).
    pub roots: &'a SourceRoots,
    /// When the source's digest is taken in the conversion's own pass: the source file
    /// (`source`, opened and confined by the caller) read through its digests. A converter
    /// that cannot read through it (qemu-img) refuses the request rather than leave it unread.
    pub tap: Option<Arc<Tap>>,
}

impl ConversionRequest<'_> {
    /// Refuses a source whose files (as found by the converter's own open) are not the ones
    /// that were inspected.
    pub fn check_unchanged(&self, referenced_files: &[PathBuf]) -> Result<(), ConvertError> {
        let Some(inspected) = self.inspected_files else { return Ok(()) };
        match referenced_files.iter().find(|f| !inspected.contains(f)) {
            None => Ok(()),
            Some(new) => Err(ConvertError::Unsupported(format!(
                "it now refers to {}, which it did not when it was inspected (the export changed during the job); submit the manifest again once the export is complete",
                new.display()
            ))),
        }
    }
}

/// Byte counters a conversion advances while it runs.
///
/// `done_bytes` and `total_bytes` are the converter's, for the disk being converted now (the
/// converters restart them for each disk). The job adds up its earlier disks and the qcow2
/// bytes it wrote, so that the daemon's metrics can count a whole job while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Guest bytes of the current disk converted so far.
    pub done_bytes: AtomicU64,
    /// Guest size of the current disk (before the first disk starts: of the whole job).
    pub total_bytes: AtomicU64,
    /// Guest bytes of the job's disks converted before the current one.
    earlier_bytes: AtomicU64,
    /// Bytes of the qcow2 files the job has written and finished.
    output_bytes: AtomicU64,
}

impl Progress {
    /// Percentage done, when the total is known.
    pub fn percent(&self) -> Option<f64> {
        let total = self.total_bytes.load(Ordering::Relaxed);
        (total > 0).then(|| 100.0 * self.done_bytes.load(Ordering::Relaxed) as f64 / total as f64)
    }

    /// Moves on to the next disk of a job, `size` guest bytes: what the previous disk got
    /// through is kept in [`Progress::job_bytes`], and the per-disk counters restart.
    ///
    /// `done_bytes` is zeroed before `earlier_bytes` grows, and [`Progress::job_bytes`] reads
    /// them in the opposite order, so a reader may see a job's total dip for a moment but
    /// never count the previous disk twice.
    pub fn start_disk(&self, size: u64) {
        let previous = self.done_bytes.swap(0, Ordering::SeqCst);
        self.earlier_bytes.fetch_add(previous, Ordering::SeqCst);
        self.total_bytes.store(size, Ordering::SeqCst);
    }

    /// Guest bytes the job has converted, over all its disks so far.
    pub fn job_bytes(&self) -> u64 {
        let earlier = self.earlier_bytes.load(Ordering::SeqCst);
        earlier.saturating_add(self.done_bytes.load(Ordering::SeqCst))
    }

    /// Records a finished qcow2 of `bytes` bytes.
    pub fn add_output_bytes(&self, bytes: u64) {
        self.output_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes of the qcow2 files the job has finished writing.
    pub fn output_bytes(&self) -> u64 {
        self.output_bytes.load(Ordering::Relaxed)
    }
}

/// Deadline, cancellation and progress shared between a running conversion and the daemon.
#[derive(Debug, Clone)]
pub struct JobControl {
    deadline: Instant,
    cancelled: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    /// Bytes done so far, written by the converter and read for logs and metrics.
    pub progress: Arc<Progress>,
}

impl JobControl {
    /// A control whose deadline is `timeout` from now.
    pub fn new(timeout: Duration) -> Self {
        JobControl {
            deadline: Instant::now() + timeout,
            cancelled: Arc::new(AtomicBool::new(false)),
            lost: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(Progress::default()),
        }
    }

    /// Asks the conversion to stop as soon as it can.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Stops the job because another daemon took it over: it must publish nothing and leave
    /// the claim alone.
    pub fn abandon(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }

    /// Returns the reason to stop, if there is one.
    pub fn check(&self) -> Result<(), ConvertError> {
        if self.lost.load(Ordering::SeqCst) {
            Err(ConvertError::LockLost)
        } else if self.cancelled.load(Ordering::SeqCst) {
            Err(ConvertError::Cancelled)
        } else if Instant::now() >= self.deadline {
            Err(ConvertError::TimedOut)
        } else {
            Ok(())
        }
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// Why a conversion failed. Messages are written for the `.error` file's cause chain.
#[derive(Debug, Error)]
pub enum ConvertError {
    /// The source is damaged or not what its format says (the reader's detail).
    #[error("the image is unreadable or corrupt: {0}")]
    Corrupt(String),
    /// The source is valid but uses a format or feature no converter here handles.
    #[error("the image format is not supported: {0}")]
    Unsupported(String),
    /// The job's deadline ([`JobControl::new`]) passed before the conversion finished.
    #[error("the conversion ran past CONVERSION_TIMEOUT")]
    TimedOut,
    /// [`JobControl::cancel`] was called, e.g. at shutdown.
    #[error("the conversion was cancelled")]
    Cancelled,
    /// [`JobControl::abandon`] was called: the claim was taken over, nothing may be published.
    #[error("another daemon took the job over")]
    LockLost,
    /// Writing the output failed with ENOSPC; the detail names the file.
    #[error("no space left on the output filesystem: {0}")]
    NoSpace(String),
    /// An external tool (qemu-img) could not be started.
    #[error("{tool} could not be run: {source}")]
    Spawn {
        /// The program's name.
        tool: &'static str,
        /// Why starting it failed (not found, not executable, …).
        source: std::io::Error,
    },
    /// qemu-img failed or said something unexpected; the text says what.
    #[error("{0}")]
    Failed(String),
    /// A file the source names was refused by SOURCE_ROOTS confinement before being opened.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// Any other read or write failure.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The conversion error a job reports for an image reader's or writer's error: a full
/// output filesystem is told apart from other I/O failures, and a refused file keeps its
/// SOURCE_ROOTS reason.
impl From<ImageError> for ConvertError {
    fn from(e: ImageError) -> ConvertError {
        match e {
            ImageError::Corrupt(m) | ImageError::Limit(m) => ConvertError::Corrupt(m),
            ImageError::Unsupported(m) => ConvertError::Unsupported(m),
            e @ ImageError::Internal(_) => ConvertError::Failed(e.to_string()),
            ImageError::Source(e) => ConvertError::Source(e),
            ImageError::Io { path, source } if source.raw_os_error() == Some(libc::ENOSPC) => {
                ConvertError::NoSpace(format!("{}: {source}", path.display()))
            }
            ImageError::Io { path, source } => ConvertError::Failed(format!("{}: {source}", path.display())),
        }
    }
}

/// Reads a source disk and writes a qcow2.
pub trait Converter: Send + Sync {
    /// A short name for reports (`qemu-img`, `native`).
    fn name(&self) -> &'static str;

    /// Whether this converter parses `format` itself (and so checks its structure); when it
    /// does not, the job checks VMDK sparse extents before handing them to an external tool.
    fn reads_natively(&self, _format: SourceFormat) -> bool {
        false
    }

    /// Describes the source without converting it: format, size and the files it references,
    /// each confined to `roots` before anything opens it.
    fn inspect(
        &self,
        source: &Path,
        format: SourceFormat,
        roots: &SourceRoots,
        control: &JobControl,
    ) -> Result<SourceInfo, ConvertError>;

    /// Converts `request.source` into a new qcow2 at `request.destination`, honouring
    /// `control`'s deadline and cancellation and advancing its progress.
    fn convert(&self, request: &ConversionRequest<'_>, control: &JobControl) -> Result<(), ConvertError>;
}
