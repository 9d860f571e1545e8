//! `hyper2kvm convert` and `hyper2kvm inspect`: the engine used by hand, outside the queue.
//!
//! Also the one-shot commands' signal handling ([`Interrupt`]). It serves paths a person named
//! (no SOURCE_ROOTS: `SourceRoots::anywhere`), so the daemon's jobs must not use it: they go
//! through [`super::auto::Auto`] with their confinement. `hyper2kvm run` reuses it.

use std::fs::File;
use std::io::{ErrorKind, IsTerminal, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::sys::signal::Signal;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::auto::Auto;
use super::native::{self, sequential, PipelineOptions};
use super::{Compression, ConversionRequest, ConvertError, Converter, JobControl};
use crate::image::{ova, sniff};
use crate::manifest::SourceFormat;
use crate::source::SourceRoots;
use crate::{host, publish};

/// One-shot conversions have no CONVERSION_TIMEOUT.
const NO_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Guesses a source format for commands run by hand: from the file name when it names a
/// format (`.ovf` and `.ova` are both OVF packages), else from the first bytes (a qcow2 named
/// `.img`, an OVF without its extension), else raw — which [`RawImage::open`] refuses when the
/// bytes are plainly not a disk.
///
/// [`RawImage::open`]: crate::image::raw::RawImage::open
pub fn guess_format(path: &Path) -> SourceFormat {
    let by_name = match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("vmdk") => Some(SourceFormat::Vmdk),
        Some("ova" | "ovf") => Some(SourceFormat::Ova),
        Some("qcow2") => Some(SourceFormat::Qcow2),
        Some("vhd") => Some(SourceFormat::Vhd),
        Some("vhdx") => Some(SourceFormat::Vhdx),
        Some("vdi") => Some(SourceFormat::Vdi),
        _ => None,
    };
    by_name.or_else(|| sniff::sniff_file(path).ok().and_then(sniff::Kind::source_format)).unwrap_or(SourceFormat::Raw)
}

/// Describes a source image: format, subformat, virtual size, allocated bytes, referenced
/// files and chain (native formats), and for an OVA its disks and OVF hardware.
pub fn inspect(source: &Path, format: SourceFormat) -> Result<serde_json::Value, ConvertError> {
    inspect_with(source, format, &JobControl::new(NO_DEADLINE))
}

/// [`inspect`] under `control`, whose deadline and cancellation stop a `qemu-img info` (the
/// native readers only read headers and tables, and take no time worth stopping).
pub fn inspect_with(
    source: &Path,
    format: SourceFormat,
    control: &JobControl,
) -> Result<serde_json::Value, ConvertError> {
    if !native::reads_natively(format) {
        let info = Auto::default().inspect(source, format, &SourceRoots::anywhere(), control)?;
        let mut value = serde_json::to_value(info).map_err(|e| ConvertError::Failed(e.to_string()))?;
        // qemu-img lists no extents: the report of a format it reads has never had the key.
        if let Some(fields) = value.as_object_mut() {
            fields.remove("extents");
        }
        return Ok(value);
    }
    if format == SourceFormat::Ova {
        return inspect_ova(source);
    }
    let info = native::inspect(source, format)?;
    serde_json::to_value(info).map_err(|e| ConvertError::Failed(e.to_string()))
}

fn inspect_ova(source: &Path) -> Result<serde_json::Value, ConvertError> {
    if ova::unpacked::is_ovf_descriptor(source) {
        return inspect_unpacked(source);
    }
    let package = ova::open(source, &ova::Limits::default())?;
    let mut disks = Vec::new();
    for (index, disk) in package.disks.iter().enumerate() {
        let info = native::inspect_ova_disk(source, index)?;
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
    Ok(serde_json::json!({
        "format": "ova",
        "ovf": package.ovf_name,
        "manifest_listed": package.manifest.is_some(),
        "disks": disks,
        "hardware": hardware_json(&package.hardware),
        "warnings": package.warnings,
    }))
}

/// An unpacked OVF export: what [`inspect_ova`] shows of an OVA, with each disk's file.
fn inspect_unpacked(source: &Path) -> Result<serde_json::Value, ConvertError> {
    let package = ova::unpacked::open(source, &ova::Limits::default(), &ova::unpacked::unconfined)?;
    let mut disks = Vec::new();
    for disk in &package.disks {
        let info = native::inspect(&disk.path, disk.source_format)?;
        disks.push(serde_json::json!({
            "disk_id": disk.disk_id,
            "href": disk.href,
            "file": disk.path,
            "capacity_bytes": disk.capacity_bytes,
            "format": info.format,
            "subformat": info.subformat,
            "virtual_size": info.virtual_size,
            "allocated_bytes": info.allocated_bytes,
        }));
    }
    Ok(serde_json::json!({
        "format": "ovf",
        "ovf": source,
        "manifest_listed": package.manifest.is_some(),
        "disks": disks,
        "hardware": hardware_json(&package.hardware),
        "warnings": package.warnings,
    }))
}

fn hardware_json(hw: &ova::OvfHardware) -> serde_json::Value {
    let nics: Vec<_> =
        hw.nics.iter().map(|n| serde_json::json!({"network": n.network, "mac": n.mac, "model": n.model})).collect();
    serde_json::json!({
        "name": hw.name,
        "cpu": hw.cpu,
        "memory_mib": hw.memory_mib,
        "firmware": hw.firmware,
        "secure_boot": hw.secure_boot,
        "os_type": hw.os_type,
        "nics": nics,
    })
}

/// One qcow2 to write: which disk of the source, and its final name.
struct Output {
    /// The file read: the source, or a disk file of an unpacked OVF.
    source: PathBuf,
    format: SourceFormat,
    /// With an OVA: the disk's index (boot order).
    ova_disk: Option<usize>,
    path: PathBuf,
    /// The hidden name it is written under, in the same directory.
    temp: PathBuf,
}

/// Converts `source` to qcow2 and returns the files written.
///
/// One file, `destination`, except for an OVA or an unpacked OVF (`vm.ovf` and its files)
/// with several disks: its first (boot) disk becomes `destination` and each other one
/// `<destination's stem>-<disk id>.qcow2` beside it, the names the daemon gives them. The
/// package's `.mf` is verified before anything is written.
///
/// Every file is written under a hidden temporary name in its final directory and linked to
/// its name only once all of them converted, so that a failed or interrupted run (SIGINT,
/// SIGTERM, SIGHUP) leaves nothing under a final name; its temporary files are removed. A
/// progress bar is drawn when stderr is a terminal, nothing is printed otherwise.
pub fn convert(
    source: &Path,
    format: SourceFormat,
    destination: &Path,
    compression: Option<Compression>,
) -> Result<Vec<PathBuf>, ConvertError> {
    convert_with(source, format, destination, compression, &JobControl::new(NO_DEADLINE))
}

/// [`convert`] under `control`: its deadline and cancellation stop the conversion (then
/// nothing is published), and its progress advances disk by disk.
pub fn convert_with(
    source: &Path,
    format: SourceFormat,
    destination: &Path,
    compression: Option<Compression>,
    control: &JobControl,
) -> Result<Vec<PathBuf>, ConvertError> {
    check_destination(destination)?;
    let outputs = plan(source, format, destination)?;
    let interrupt = Interrupt::install();
    let converter = Auto::default();
    let roots = SourceRoots::anywhere();
    let mut result = Ok(());
    for (n, output) in outputs.iter().enumerate() {
        let label = (outputs.len() > 1).then(|| format!("disk {}/{}", n + 1, outputs.len()));
        let request = ConversionRequest {
            source: &output.source,
            format: output.format,
            destination: &output.temp,
            compression,
            ova_disk: output.ova_disk,
            inspected_files: None,
            roots: &roots,
            tap: None,
        };
        result = convert_one(&converter, &request, label, control);
        if result.is_err() {
            break;
        }
    }
    conclude(outputs, interrupt, result)
}

/// Publishes the outputs after a successful run, removes the temporary files either way, and
/// reports an interruption as one, not as the error it caused.
fn conclude(
    outputs: Vec<Output>,
    interrupt: Interrupt,
    result: Result<(), ConvertError>,
) -> Result<Vec<PathBuf>, ConvertError> {
    let result = result.and_then(|()| interrupt.check()).and_then(|()| publish_outputs(&outputs));
    for output in &outputs {
        // After publishing these are second names of the results; after a failure, the
        // partial files.
        let _ = std::fs::remove_file(&output.temp);
    }
    drop(interrupt);
    match (result, interrupted()) {
        (Ok(()), _) => Ok(outputs.into_iter().map(|o| o.path).collect()),
        // The conversion's own error would only say it was cancelled.
        (Err(_), Some(sig)) => {
            let name = Signal::try_from(sig).map_or("a signal", |s| s.as_str());
            Err(ConvertError::Failed(format!("interrupted by {name}; nothing was written")))
        }
        (Err(e), None) => Err(e),
    }
}

/// Whether `source` can only be read front to back: `-` (standard input), a FIFO, a socket
/// or a character device. Such a source looks like an empty file to the random-access readers.
pub fn is_stream(source: &Path) -> bool {
    if source == Path::new("-") {
        return true;
    }
    std::fs::metadata(source).is_ok_and(|m| {
        let kind = m.file_type();
        kind.is_fifo() || kind.is_socket() || kind.is_char_device()
    })
}

/// `hyper2kvm convert`: [`convert_stream`] for a source that cannot seek, else [`convert`]
/// with `format`, or the one [`guess_format`] finds.
pub fn convert_any(
    source: &Path,
    format: Option<SourceFormat>,
    destination: &Path,
    compression: Option<Compression>,
) -> Result<Vec<PathBuf>, ConvertError> {
    if is_stream(source) {
        return convert_stream(source, format, destination, compression);
    }
    let format = format.unwrap_or_else(|| guess_format(source));
    convert(source, format, destination, compression)
}

/// `hyper2kvm convert`: [`convert_any`], then the paths of the other disks of an OVA, which
/// the user did not name (the first disk is the one named).
pub fn convert_command(
    source: &Path,
    format: Option<SourceFormat>,
    destination: &Path,
    compression: Option<Compression>,
) -> Result<(), ConvertError> {
    let written = convert_any(source, format, destination, compression)?;
    if written.len() > 1 {
        for path in written {
            println!("{}", path.display());
        }
    }
    Ok(())
}

/// `hyper2kvm inspect`: [`inspect`] with `format` or the one [`guess_format`] finds, printed
/// as JSON or as `key: value` lines.
pub fn inspect_command(source: &Path, format: Option<SourceFormat>, json: bool) -> Result<(), ConvertError> {
    let format = format.unwrap_or_else(|| guess_format(source));
    let info = inspect(source, format)?;
    super::fields::print(&info, json).map_err(|e| ConvertError::Failed(e.to_string()))
}

/// [`convert`] for a source that cannot seek (see [`is_stream`]): a stream-optimized VMDK
/// read in one pass ([`super::native::sequential`]); every other format is refused before
/// anything is written. Without `format`, the first bytes tell. The result is published as
/// [`convert`] publishes it.
pub fn convert_stream(
    source: &Path,
    format: Option<SourceFormat>,
    destination: &Path,
    compression: Option<Compression>,
) -> Result<Vec<PathBuf>, ConvertError> {
    let name = stream_name(source);
    if let Some(format) = format.filter(|f| *f != SourceFormat::Vmdk) {
        return Err(not_streamable(&name, &format!("--format {} was given", format.as_str())));
    }
    check_destination(destination)?;
    // Before the handlers: opening a FIFO waits for a writer, and a signal meanwhile should
    // end the process as usual (nothing is written yet); once they are installed, it would
    // only be noted, and the wait would go on.
    let file = open_stream(source)?;
    let outputs = vec![Output {
        source: source.to_owned(),
        format: SourceFormat::Vmdk,
        ova_disk: None,
        temp: temp_name(destination),
        path: destination.to_owned(),
    }];
    let interrupt = Interrupt::install();
    let control = JobControl::new(NO_DEADLINE);
    let result = watched(&control, None, || {
        let mut reader =
            std::io::BufReader::with_capacity(STREAM_BUFFER, Cancellable { file, control: control.clone() });
        let mut first = [0u8; 512];
        reader.read_exact(&mut first).map_err(|e| read_failed(&control, &name, e))?;
        sequential::stream_header(&first).map_err(|why| not_streamable(&name, &why))?;
        let options = PipelineOptions { compression, ..PipelineOptions::default() };
        let reader = std::io::Cursor::new(first).chain(reader);
        sequential::convert_stream(reader, &outputs[0].temp, options, &control).map(drop)
    });
    conclude(outputs, interrupt, result)
}

/// Read ahead from a stream: large reads, few wake-ups.
const STREAM_BUFFER: usize = 1 << 20;

fn stream_name(source: &Path) -> String {
    if source == Path::new("-") {
        "standard input".into()
    } else {
        source.display().to_string()
    }
}

fn not_streamable(name: &str, why: &str) -> ConvertError {
    ConvertError::Failed(format!(
        "{name} cannot seek; only streamOptimized VMDK can be converted from a pipe — save it to a file first ({why})"
    ))
}

fn read_failed(control: &JobControl, name: &str, e: std::io::Error) -> ConvertError {
    if let Err(stop) = control.check() {
        return stop;
    }
    match e.kind() {
        ErrorKind::UnexpectedEof => {
            ConvertError::Corrupt(format!("{name} ended before the end of its first 512 bytes: it is not a VMDK"))
        }
        _ => ConvertError::Failed(format!("reading {name} failed: {e}")),
    }
}

fn open_stream(source: &Path) -> Result<File, ConvertError> {
    let opened = if source == Path::new("-") {
        // A duplicate of fd 0, unbuffered: `Cancellable` polls it, and bytes already taken
        // into std's stdin buffer would never show in a poll.
        std::io::stdin().as_fd().try_clone_to_owned().map(File::from)
    } else {
        File::open(source)
    };
    opened.map_err(|e| ConvertError::Failed(format!("{}: {e}", stream_name(source))))
}

/// A stream that gives up once its conversion is cancelled, even while no byte comes: a
/// writer that stalls must not keep an interrupted conversion from cleaning up.
struct Cancellable {
    file: File,
    control: JobControl,
}

impl Read for Cancellable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.control.check().is_err() {
                return Err(std::io::Error::other("the conversion was stopped"));
            }
            let mut fd = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, for a descriptor this struct owns.
            match unsafe { libc::poll(&mut fd, 1, 200) } {
                0 => continue,
                n if n > 0 => return self.file.read(buf),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

fn check_destination(destination: &Path) -> Result<(), ConvertError> {
    refuse_existing(destination)?;
    let dir = directory_of(destination);
    if !dir.is_dir() {
        // Said now: the writer would name the temporary file instead.
        return Err(ConvertError::Failed(format!(
            "{} cannot be written: the directory {} does not exist",
            destination.display(),
            dir.display()
        )));
    }
    Ok(())
}

fn refuse_existing(path: &Path) -> Result<(), ConvertError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ConvertError::Failed(format!(
            "{} already exists; choose another name or remove it",
            path.display()
        )));
    }
    Ok(())
}

/// The files to write. For an OVA: one per disk, once the `.mf` (when there is one) matched;
/// for an unpacked OVF the same, each read from its own file.
fn plan(source: &Path, format: SourceFormat, destination: &Path) -> Result<Vec<Output>, ConvertError> {
    if format != SourceFormat::Ova {
        return Ok(vec![output(source.to_owned(), format, None, destination.to_owned())]);
    }
    if ova::unpacked::is_ovf_descriptor(source) {
        return plan_unpacked(source, destination);
    }
    let package = ova::open(source, &ova::Limits::default())?;
    let ids: Vec<&str> = package.disks.iter().map(|d| d.disk_id.as_str()).collect();
    let outputs = name_outputs(source, destination, &ids, |index| (source.to_owned(), format, Some(index)))?;
    // After the names: hashing a large OVA takes a while, and a name taken is known at once.
    if package.manifest.is_some() {
        ova::verify_manifest(&package)?;
    }
    Ok(outputs)
}

fn plan_unpacked(source: &Path, destination: &Path) -> Result<Vec<Output>, ConvertError> {
    let confine = &ova::unpacked::unconfined;
    let package = ova::unpacked::open(source, &ova::Limits::default(), confine)?;
    let ids: Vec<&str> = package.disks.iter().map(|d| d.disk_id.as_str()).collect();
    let outputs = name_outputs(source, destination, &ids, |index| {
        let disk = &package.disks[index];
        (disk.path.clone(), disk.source_format, None)
    })?;
    if package.manifest.is_some() {
        ova::unpacked::verify_manifest(&package, confine)?;
    }
    Ok(outputs)
}

fn output(source: PathBuf, format: SourceFormat, ova_disk: Option<usize>, path: PathBuf) -> Output {
    Output { source, format, ova_disk, temp: temp_name(&path), path }
}

/// The outputs of a package's disks (`ids`, boot order): the first is `destination`, each
/// other `<destination's stem>-<disk id>.qcow2` beside it, refused if it exists.
fn name_outputs(
    source: &Path,
    destination: &Path,
    ids: &[&str],
    read: impl Fn(usize) -> (PathBuf, SourceFormat, Option<usize>),
) -> Result<Vec<Output>, ConvertError> {
    if ids.is_empty() {
        return Err(ConvertError::Corrupt(format!(
            "{} holds no disk to convert; check that the export included its disks",
            source.display()
        )));
    }
    let stem = destination.file_stem().unwrap_or_default().to_string_lossy().into_owned();
    let mut outputs = Vec::with_capacity(ids.len());
    for (index, id) in ids.iter().enumerate() {
        let path = if index == 0 {
            destination.to_owned()
        } else {
            let path = destination.with_file_name(format!("{stem}-{id}.qcow2"));
            refuse_existing(&path)?;
            path
        };
        let (source, format, ova_disk) = read(index);
        outputs.push(output(source, format, ova_disk, path));
    }
    Ok(outputs)
}

/// `.<name>.<random>.tmp` beside `path`: hidden, and on the same filesystem, so that
/// publishing is a link.
fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}.tmp", host::random_hex()))
}

/// Converts one disk into `request.destination`, drawing a progress bar on a terminal.
fn convert_one(
    converter: &Auto,
    request: &ConversionRequest<'_>,
    label: Option<String>,
    control: &JobControl,
) -> Result<(), ConvertError> {
    control.progress.start_disk(0);
    if !native::reads_natively(request.format) {
        // The native engine sets the total itself; qemu-img only reports percentages.
        let info = converter.inspect(request.source, request.format, request.roots, control)?;
        control.progress.total_bytes.store(info.virtual_size, Ordering::Relaxed);
    }
    watched(control, label, || converter.convert(request, control))
}

/// Runs `work` while a watcher cancels `control` on a signal and draws a progress bar on a
/// terminal.
fn watched<T>(
    control: &JobControl,
    label: Option<String>,
    work: impl FnOnce() -> Result<T, ConvertError>,
) -> Result<T, ConvertError> {
    let finished = Arc::new(AtomicBool::new(false));
    let watcher = spawn_watcher(control.clone(), finished.clone(), std::io::stderr().is_terminal(), label);
    let result = work();
    finished.store(true, Ordering::SeqCst);
    // Woken now rather than at its next tick: the join would otherwise add up to a tick to
    // every conversion, a tenth of a second on a one-second one.
    watcher.thread().unpark();
    if let Ok(Some(bar)) = watcher.join() {
        if result.is_ok() {
            bar.finish();
        } else {
            bar.abandon();
        }
    }
    result
}

/// Until `finished`: cancels the conversion when a signal asks to stop, and when `draw`,
/// keeps a progress bar (rate and ETA) on stderr, which it returns to be finished.
fn spawn_watcher(
    control: JobControl,
    finished: Arc<AtomicBool>,
    draw: bool,
    label: Option<String>,
) -> std::thread::JoinHandle<Option<indicatif::ProgressBar>> {
    std::thread::spawn(move || {
        let bar = draw.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let template = if label.is_some() {
                "{msg} {bar:40.cyan/blue} {percent:>3}%  {bytes}/{total_bytes}  {binary_bytes_per_sec}  ETA {eta}"
            } else {
                "{bar:40.cyan/blue} {percent:>3}%  {bytes}/{total_bytes}  {binary_bytes_per_sec}  ETA {eta}"
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            if let Some(label) = label {
                bar.set_message(label);
            }
            bar
        });
        let update = |bar: &Option<indicatif::ProgressBar>| {
            if let Some(bar) = bar {
                bar.set_length(control.progress.total_bytes.load(Ordering::Relaxed));
                bar.set_position(control.progress.done_bytes.load(Ordering::Relaxed));
            }
        };
        while !finished.load(Ordering::SeqCst) {
            if interrupted().is_some() {
                control.cancel();
            }
            update(&bar);
            std::thread::park_timeout(Duration::from_millis(100));
        }
        update(&bar);
        bar
    })
}

/// Links each temporary file to its final name, which fails rather than replace a file that
/// appeared meanwhile; on failure, the names already given are taken back.
fn publish_outputs(outputs: &[Output]) -> Result<(), ConvertError> {
    let failed = |path: &Path, e: std::io::Error| ConvertError::Failed(format!("{}: {e}", path.display()));
    for output in outputs {
        // qemu-img does not flush what it writes; a name must never point at lost data.
        publish::fsync_file(&output.temp).map_err(|e| failed(&output.temp, e))?;
    }
    for (n, output) in outputs.iter().enumerate() {
        if let Err(e) = link_new(&output.temp, &output.path) {
            for earlier in &outputs[..n] {
                let _ = std::fs::remove_file(&earlier.path);
            }
            return Err(match e.kind() {
                ErrorKind::AlreadyExists => ConvertError::Failed(format!(
                    "{} was created by something else during the conversion; it was left alone and nothing was written",
                    output.path.display()
                )),
                _ => failed(&output.path, e),
            });
        }
    }
    if let Some(first) = outputs.first() {
        let dir = directory_of(&first.path);
        publish::fsync_dir(dir).map_err(|e| failed(dir, e))?;
    }
    Ok(())
}

fn directory_of(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Gives `temp` the name `path` unless `path` exists. A hard link refuses an existing name
/// atomically; on filesystems without hard links, a rename after a check has to do.
fn link_new(temp: &Path, path: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(temp, path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(temp, path)
        }
        linked => linked,
    }
}

/// The first signal that asked a conversion to stop; 0 for none.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signals that cancel a conversion instead of killing the process.
const STOP_SIGNALS: [libc::c_int; 3] = [SIGINT, SIGTERM, SIGHUP];

/// How many [`Interrupt`] guards are alive (the worker's, and a conversion's inside it).
static GUARDS: AtomicUsize = AtomicUsize::new(0);

/// The handlers, registered once per process and never removed (signal-hook cannot put a
/// disposition back); `disarmed` tells them to act as the signal's default instead.
struct Handlers {
    disarmed: Arc<AtomicBool>,
}

fn handlers() -> &'static Handlers {
    static HANDLERS: OnceLock<Handlers> = OnceLock::new();
    HANDLERS.get_or_init(|| {
        let disarmed = Arc::new(AtomicBool::new(true));
        let ignored = ignored_signals();
        for sig in STOP_SIGNALS.into_iter().filter(|sig| !ignored.contains(sig)) {
            let off = Arc::clone(&disarmed);
            // SAFETY: the action only loads and stores atomics, which is async-signal-safe.
            let noted = unsafe {
                signal_hook::low_level::register(sig, move || {
                    if !off.load(Ordering::SeqCst) {
                        let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
                    }
                })
            };
            // Registered second, so it runs after the signal was noted.
            if noted.is_ok() {
                let _ = signal_hook::flag::register_conditional_default(sig, Arc::clone(&disarmed));
            }
        }
        Handlers { disarmed }
    })
}

/// The signals ignored when the process started (`nohup` ignores SIGHUP), from the `SigIgn`
/// mask of `/proc/self/status`: they stay ignored. None when the mask cannot be read.
fn ignored_signals() -> Vec<libc::c_int> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    STOP_SIGNALS.into_iter().filter(|&sig| mask & (1u64 << (sig - 1)) != 0).collect()
}

/// The signal that interrupted [`convert`], if one did. Once the last [`Interrupt`] is
/// dropped, the signal acts as its default again: raising it ends the process as the signal
/// would have, for the shell to see.
pub fn interrupted() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// For a command that failed and said why: when a signal interrupted [`convert`] (its partial
/// files are gone by now), raises it again, so that the process ends as the signal would have
/// ended it and a shell or script sees an interruption, not a failure.
pub fn raise_if_interrupted() {
    if let Some(signal) = interrupted() {
        let _ = signal_hook::low_level::raise(signal);
    }
}

/// While alive, SIGINT, SIGTERM and SIGHUP cancel the conversion instead of killing the
/// process, so that its temporary files are removed. A signal ignored when the process
/// started (`nohup`) stays ignored.
pub struct Interrupt {
    _private: (),
}

impl Interrupt {
    /// Catches the signals until dropped; [`interrupted`] tells whether one came.
    pub fn install() -> Interrupt {
        let handlers = handlers();
        if GUARDS.fetch_add(1, Ordering::SeqCst) == 0 {
            handlers.disarmed.store(false, Ordering::SeqCst);
        }
        Interrupt { _private: () }
    }

    fn check(&self) -> Result<(), ConvertError> {
        match interrupted() {
            Some(_) => Err(ConvertError::Cancelled),
            None => Ok(()),
        }
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        if GUARDS.fetch_sub(1, Ordering::SeqCst) == 1 {
            handlers().disarmed.store(true, Ordering::SeqCst);
        }
    }
}
