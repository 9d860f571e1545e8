//! The `qemu-img` backend: a real, well-kept tool that reads every format we accept.
//!
//! It runs as a child process with a deadline: on timeout or cancellation the child is killed.
//! `qemu-img convert -p` prints `(12.34/100%)\r` progress to stdout even into a pipe, which
//! feeds the job's progress counters.
//!
//! It is handed opened descriptors (`/dev/fd/N` in a `json:` description), never a name for
//! qemu-img to resolve, and does not choose which formats come to it ([`super::auto`] does).

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::{ConversionRequest, ConvertError, Converter, JobControl};
use crate::config::CompressionType;
use crate::image::SourceInfo;
use crate::manifest::SourceFormat;
use crate::source::{Confined, SourceRoots};

/// How often a running child is checked against the deadline.
const POLL: Duration = Duration::from_millis(50);

/// Longest piece of qemu-img's stderr quoted in an error.
const MAX_MESSAGE: usize = 400;

/// Converts with the `qemu-img` binary found on PATH.
#[derive(Debug, Clone)]
pub struct QemuImg {
    binary: PathBuf,
}

impl Default for QemuImg {
    fn default() -> Self {
        QemuImg { binary: PathBuf::from("qemu-img") }
    }
}

impl QemuImg {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.stdin(Stdio::null()).env("LC_ALL", "C");
        // If the daemon is killed outright, qemu-img must not go on writing into a staging
        // directory that the next daemon will clean up. The signal follows the spawning thread,
        // which is the job's thread and waits for the child.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

/// What [`QemuImg::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputCheck {
    /// `qemu-img check` found no corruption and no leak.
    Clean,
    /// No qemu-img on this host: the check was not made.
    NoQemuImg,
}

impl QemuImg {
    /// `qemu-img check` of a qcow2 this daemon wrote: its metadata (header, L1 and L2 tables,
    /// refcounts) read and cross-checked, not its data — a few MiB per TiB of disk. Any
    /// corruption or leak is an error carrying qemu-img's words; a missing qemu-img is
    /// [`OutputCheck::NoQemuImg`], since the native engine needs none.
    pub fn check(&self, qcow2: &Path, control: &JobControl) -> Result<OutputCheck, ConvertError> {
        let mut cmd = self.command();
        cmd.args(["check", "-f", "qcow2"]).arg(qcow2);
        match run(cmd, control, |_| {}) {
            Ok(_) => Ok(OutputCheck::Clean),
            Err(ConvertError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(OutputCheck::NoQemuImg)
            }
            Err(e @ (ConvertError::Cancelled | ConvertError::TimedOut | ConvertError::LockLost)) => Err(e),
            // A fault of the output, not of the source: not worded as the source's corruption.
            Err(e) => Err(ConvertError::Failed(format!("qemu-img check of the converted disk failed: {e}"))),
        }
    }
}

/// The `-f` name qemu-img uses for a manifest format.
fn qemu_format(format: SourceFormat) -> Result<&'static str, ConvertError> {
    Ok(match format {
        SourceFormat::Vmdk => "vmdk",
        SourceFormat::Raw => "raw",
        SourceFormat::Qcow2 => "qcow2",
        SourceFormat::Vhd => "vpc",
        SourceFormat::Vhdx => "vhdx",
        SourceFormat::Vdi => "vdi",
        SourceFormat::Ova => {
            return Err(ConvertError::Unsupported(
                "OVA archives are read by the native engine, which this build does not include yet".into(),
            ))
        }
    })
}

impl Converter for QemuImg {
    fn name(&self) -> &'static str {
        "qemu-img"
    }

    fn inspect(
        &self,
        source: &Path,
        format: SourceFormat,
        roots: &SourceRoots,
        control: &JobControl,
    ) -> Result<SourceInfo, ConvertError> {
        Ok(self.walk(source, format, roots, control)?.info())
    }

    /// Converts exactly the chain inspected: every file is opened here, through `roots`, and
    /// handed to qemu-img as `/dev/fd/N` in an explicit `json:` description (driver, data
    /// file, backing, and `"backing": null` at the bottom), so qemu-img resolves no name
    /// itself and cannot open anything that was not confined.
    fn convert(&self, request: &ConversionRequest<'_>, control: &JobControl) -> Result<(), ConvertError> {
        if request.tap.is_some() {
            // qemu-img reads the file itself: a digest asked of this pass would never be taken.
            return Err(ConvertError::Unsupported(format!(
                "{} cannot be hashed while qemu-img converts it; its checksum is verified in a pass of its own",
                request.source.display()
            )));
        }
        let chain = self.walk(request.source, request.format, request.roots, control)?;
        request.check_unchanged(&chain.info().referenced_files)?;
        let mut options = String::from("compat=1.1");
        if let Some(c) = request.compression {
            if c.kind == CompressionType::Zstd {
                options.push_str(",compression_type=zstd");
            }
        }
        let mut cmd = self.command_with(&chain.fds());
        cmd.args(["convert", "-p", "-O", "qcow2", "-o", &options]);
        if request.compression.is_some() {
            cmd.arg("-c");
        }
        cmd.arg(format!("json:{}", chain.description())).arg(request.destination);
        let progress = control.progress.clone();
        run(cmd, control, move |percent| {
            let total = progress.total_bytes.load(Ordering::Relaxed);
            progress.done_bytes.store((total as f64 * percent / 100.0) as u64, Ordering::Relaxed);
        })?;
        self.check_still(&chain, control)
    }
}

impl QemuImg {
    /// Inspects `top` and its backing chain one image at a time: each file is confined and
    /// opened first (a FIFO, a device or a name outside `roots` is refused unopened), then
    /// `qemu-img info` reads that one descriptor without following its backing file, and the
    /// names it reports (backing file, data file) are judged before the next step opens them.
    fn walk(
        &self,
        top: &Path,
        format: SourceFormat,
        roots: &SourceRoots,
        control: &JobControl,
    ) -> Result<Chain, ConvertError> {
        let mut layers: Vec<Layer> = Vec::new();
        let mut next = Some((top.to_owned(), Some(qemu_format(format)?.to_owned())));
        while let Some((path, format)) = next.take() {
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(ConvertError::Corrupt(format!(
                    "its backing chain is deeper than {MAX_CHAIN_DEPTH} images; commit the snapshots into one image first"
                )));
            }
            let file = roots.open(&path)?;
            if layers.iter().any(|l| l.file.resolved == file.resolved) {
                return Err(ConvertError::Corrupt(format!(
                    "its backing chain loops back to {}: the backing file names are corrupt",
                    path.display()
                )));
            }
            // Named explicitly: qemu-img's own probe may pick a driver (vmdk) that opens other
            // files by name.
            let format = match format {
                Some(format) => format,
                None => probe(&file.file).map_err(ConvertError::Io)?.to_owned(),
            };
            if !READ_BY_QEMU_IMG.contains(&format.as_str()) {
                return Err(ConvertError::Unsupported(format!(
                    "{} is a {} image, which is not converted through qemu-img (only {})",
                    path.display(),
                    shown(&format),
                    READ_BY_QEMU_IMG.join(", ")
                )));
            }
            let info = self.describe(&file, &format, &path, control)?;
            let data_file = match &info.data_file {
                Some(name) => Some((name.clone(), roots.open(name)?)),
                None => None,
            };
            next = info.backing.clone().map(|b| (b.path, b.format));
            layers.push(Layer { path, file, info, data_file });
        }
        Ok(Chain { layers })
    }

    /// `qemu-img info` of one image already open, read as `format` (its chain not followed).
    fn describe(
        &self,
        file: &Confined,
        format: &str,
        path: &Path,
        control: &JobControl,
    ) -> Result<LayerInfo, ConvertError> {
        let mut cmd = self.command_with(&[file.file.as_raw_fd()]);
        cmd.args(["info", "--output=json", "-U", "-f", format]).arg(fd_path(&file.file));
        let output = run(cmd, control, |_| {})?;
        let json: Value = serde_json::from_slice(&output)
            .map_err(|e| ConvertError::Failed(format!("qemu-img info printed unexpected output: {e}")))?;
        parse_layer(&json, path)
    }

    /// After a conversion: every image of the chain still names the backing and data files it
    /// named before. A header rewritten in place while qemu-img ran (to add a data file, which
    /// qemu would open by name) fails the conversion instead of publishing what it read.
    fn check_still(&self, chain: &Chain, control: &JobControl) -> Result<(), ConvertError> {
        for layer in &chain.layers {
            let now = self.describe(&layer.file, &layer.info.format, &layer.path, control)?;
            if (&now.backing, &now.data_file) != (&layer.info.backing, &layer.info.data_file) {
                return Err(ConvertError::Unsupported(format!(
                    "{} was rewritten while it was converted (it now names other backing or data files); submit the manifest again once the export is complete",
                    layer.path.display()
                )));
            }
        }
        Ok(())
    }

    /// [`QemuImg::command`], with the descriptors `fds` (opened close-on-exec) left open in
    /// the child, which names them `/dev/fd/N`.
    fn command_with(&self, fds: &[RawFd]) -> Command {
        let mut cmd = self.command();
        let fds = fds.to_vec();
        // SAFETY: fcntl is async-signal-safe and only changes flags of descriptors this
        // process owns (and keeps open until the child has exited).
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }
}

/// Deepest backing chain walked, the top image included: as VMDK's `max_chain_depth`.
const MAX_CHAIN_DEPTH: usize = 16;

/// The formats qemu-img may read for us, by qemu-img's name: each references no file but its
/// backing file and (qcow2) its data file, which the walk confines. Others are refused —
/// qemu's vmdk driver opens extents by name, qed and luks are not export formats.
const READ_BY_QEMU_IMG: [&str; 5] = ["qcow2", "raw", "vpc", "vhdx", "vdi"];

/// One image of a backing chain, confined and open.
struct Layer {
    /// As named (by the manifest, or by its child's backing file name).
    path: PathBuf,
    file: Confined,
    info: LayerInfo,
    /// A qcow2 external data file: as named, and open.
    data_file: Option<(PathBuf, Confined)>,
}

/// A backing chain, top first, every file confined and open.
struct Chain {
    layers: Vec<Layer>,
}

impl Chain {
    /// Format, size and every file besides the top one.
    fn info(&self) -> SourceInfo {
        let top = &self.layers[0].info;
        let backing: Vec<PathBuf> = self.layers.iter().skip(1).map(|l| l.path.clone()).collect();
        let mut referenced = backing.clone();
        referenced.extend(self.layers.iter().filter_map(|l| l.data_file.as_ref().map(|(name, _)| name.clone())));
        SourceInfo {
            format: top.format.clone(),
            subformat: top.subformat.clone(),
            virtual_size: top.virtual_size,
            referenced_files: referenced,
            allocated_bytes: None,
            chain: backing,
            ..SourceInfo::default()
        }
    }

    /// Every descriptor qemu-img is to read.
    fn fds(&self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        for layer in &self.layers {
            fds.push(layer.file.file.as_raw_fd());
            fds.extend(layer.data_file.as_ref().map(|(_, f)| f.file.as_raw_fd()));
        }
        fds
    }

    /// The chain as qemu's `json:` image description, every file as its `/dev/fd/N`.
    fn description(&self) -> Value {
        let mut below = Value::Null;
        for layer in self.layers.iter().rev() {
            let mut image = serde_json::json!({
                "driver": layer.info.format,
                "file": {"driver": "file", "filename": fd_path(&layer.file.file)},
                "backing": below,
            });
            if let Some((_, data)) = &layer.data_file {
                image["data-file"] = serde_json::json!({"driver": "file", "filename": fd_path(&data.file)});
            }
            below = image;
        }
        below
    }
}

/// The format of a backing file whose image does not record it, from its first bytes, as
/// qemu would probe it among the formats qemu-img reads for us; anything else is raw.
fn probe(file: &std::fs::File) -> std::io::Result<&'static str> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 72];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    let head = &head[..got];
    Ok(if head.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if head.starts_with(b"conectix") {
        "vpc"
    } else if head.starts_with(b"vhdxfile") {
        "vhdx"
    } else if head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        "vdi"
    } else {
        "raw"
    })
}

/// How a child process names a descriptor it inherited.
fn fd_path(file: &std::fs::File) -> String {
    format!("/dev/fd/{}", file.as_raw_fd())
}

/// Runs `cmd` to completion under `control`, feeding `-p` percentages to `on_progress`, and
/// returns its stdout. A non-zero exit becomes an error carrying qemu-img's own message.
fn run(
    mut cmd: Command,
    control: &JobControl,
    on_progress: impl Fn(f64) + Send + 'static,
) -> Result<Vec<u8>, ConvertError> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ConvertError::Spawn { tool: "qemu-img", source })?;
    let stdout = child.stdout.take().map(|out| std::thread::spawn(move || read_stdout(out, on_progress)));
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = err.read_to_end(&mut text);
            text
        })
    });
    let status = wait(&mut child, control)?;
    let out = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
    let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if status.success() {
        Ok(out)
    } else {
        Err(classify_failure(&String::from_utf8_lossy(&err)))
    }
}

fn wait(child: &mut Child, control: &JobControl) -> Result<std::process::ExitStatus, ConvertError> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if let Err(stop) = control.check() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(stop);
        }
        std::thread::sleep(POLL);
    }
}

/// Collects stdout, calling `on_progress` for every `(NN.NN/100%)` record.
fn read_stdout(mut out: impl Read, on_progress: impl Fn(f64)) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let mut record = Vec::new();
    while let Ok(n) = out.read(&mut buf) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if let Some(p) = parse_progress(&record) {
                    on_progress(p);
                }
                record.clear();
            } else {
                record.push(b);
            }
        }
    }
    all
}

fn parse_progress(record: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(record).ok()?.trim();
    let inner = text.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse().ok()
}

/// Maps qemu-img's stderr to an error kind, keeping its last meaningful line.
fn classify_failure(stderr: &str) -> ConvertError {
    let message: String = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("qemu-img failed without a message")
        .trim_start_matches("qemu-img: ")
        .chars()
        .take(MAX_MESSAGE)
        .collect();
    if message.contains("No space left on device") {
        ConvertError::NoSpace(message)
    } else if message.contains("Unknown driver") || message.contains("Unsupported") || message.contains("not supported")
    {
        ConvertError::Unsupported(message)
    } else {
        ConvertError::Corrupt(message)
    }
}

/// A backing file as its image names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// Made absolute against the image's directory.
    pub path: PathBuf,
    /// `backing-filename-format`, when the image records it (otherwise qemu-img probes it).
    pub format: Option<String>,
}

/// What `qemu-img info --output=json` says of one image (its chain not followed), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// qemu-img's format name, one of those read by qemu-img for us.
    pub format: String,
    /// VMDK create type, when there is one.
    pub subformat: Option<String>,
    /// `virtual-size`: the guest-visible disk size, in bytes.
    pub virtual_size: u64,
    /// `backing-filename`: the backing file; `None` when the image stands alone.
    pub backing: Option<BackingRef>,
    /// A qcow2 external data file, made absolute against the image's directory.
    pub data_file: Option<PathBuf>,
}

/// Reads one image's `qemu-img info` JSON. `image` is the image as named: relative backing and
/// data file names are taken relative to its directory. Protocol references (`nbd://…`,
/// `json:{…}`, `http:…`) and formats that name other files are refused.
pub fn parse_layer(json: &Value, image: &Path) -> Result<LayerInfo, ConvertError> {
    let unexpected = |what: &str| ConvertError::Failed(format!("qemu-img info printed no {what}"));
    let format = json["format"].as_str().ok_or_else(|| unexpected("format"))?;
    if !READ_BY_QEMU_IMG.contains(&format) {
        return Err(ConvertError::Unsupported(format!(
            "{} is a {} image, which is not converted through qemu-img (only {})",
            image.display(),
            shown(format),
            READ_BY_QEMU_IMG.join(", ")
        )));
    }
    let base_dir = image.parent().unwrap_or(Path::new("/"));
    let backing = match json["backing-filename"].as_str().filter(|s| !s.is_empty()) {
        Some(name) => Some(BackingRef {
            path: referenced_path(name, base_dir)?,
            format: json["backing-filename-format"].as_str().map(str::to_owned),
        }),
        None => None,
    };
    let data_file = match json["format-specific"]["data"]["data-file"].as_str().filter(|s| !s.is_empty()) {
        Some(name) => Some(referenced_path(name, base_dir)?),
        None => None,
    };
    Ok(LayerInfo {
        format: format.to_owned(),
        subformat: json["format-specific"]["data"]["create-type"].as_str().map(str::to_owned),
        virtual_size: json["virtual-size"].as_u64().unwrap_or(0),
        backing,
        data_file,
    })
}

/// Text from an untrusted header, short and printable, for a message.
fn shown(text: &str) -> String {
    format!("{:?}", text.chars().take(64).collect::<String>())
}

/// A plain file path, made absolute against the image's directory. Protocol references
/// (`nbd://…`, `json:{…}`, `file:…`: anything with a `:` before the first `/`, which qemu
/// would take as a protocol) are refused: a disk image must only point at files.
fn referenced_path(name: &str, base_dir: &Path) -> Result<PathBuf, ConvertError> {
    let looks_like_protocol =
        name.split_once(':').is_some_and(|(scheme, _)| !scheme.contains('/') && !scheme.is_empty());
    if looks_like_protocol || name.contains('\0') {
        return Err(ConvertError::Unsupported(format!(
            "the image refers to {}, which is not a plain file",
            shown(name)
        )));
    }
    let path = Path::new(name);
    Ok(if path.is_absolute() { path.to_owned() } else { base_dir.join(path) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceError;

    #[test]
    fn parses_progress_records() {
        assert_eq!(parse_progress(b"    (12.50/100%)"), Some(12.5));
        assert_eq!(parse_progress(b"(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress(b"garbage"), None);
    }

    #[test]
    fn classifies_failures_by_message() {
        assert!(matches!(classify_failure("qemu-img: foo: No space left on device\n"), ConvertError::NoSpace(_)));
        let corrupt = classify_failure("qemu-img: Could not open 'x.vmdk': Invalid footer\n");
        assert!(matches!(&corrupt, ConvertError::Corrupt(m) if m == "Could not open 'x.vmdk': Invalid footer"));
    }

    #[test]
    fn refuses_protocol_references() {
        assert!(referenced_path("nbd://host/x", Path::new("/d")).is_err());
        assert!(referenced_path("json:{\"file\":1}", Path::new("/d")).is_err());
        assert_eq!(referenced_path("x-flat.vmdk", Path::new("/d")).unwrap(), PathBuf::from("/d/x-flat.vmdk"));
        assert_eq!(referenced_path("/a/b:c", Path::new("/d")).unwrap(), PathBuf::from("/a/b:c"));
    }

    #[test]
    fn reads_backing_and_data_file_names_relative_to_the_image() {
        let json = serde_json::json!({
            "format": "qcow2",
            "virtual-size": 1048576,
            "filename": "/dev/fd/7",
            "full-backing-filename": "/dev/fd/base.qcow2",
            "backing-filename": "base.qcow2",
            "backing-filename-format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"data-file": "top.raw", "data-file-raw": true}},
        });
        let layer = parse_layer(&json, Path::new("/exports/vm/top.qcow2")).unwrap();
        assert_eq!(layer.virtual_size, 1 << 20);
        assert_eq!(
            layer.backing,
            Some(BackingRef { path: "/exports/vm/base.qcow2".into(), format: Some("qcow2".into()) })
        );
        assert_eq!(layer.data_file, Some(PathBuf::from("/exports/vm/top.raw")));
    }

    #[test]
    fn refuses_protocols_and_formats_that_name_other_files() {
        let top = Path::new("/exports/top.qcow2");
        let with = |key: &str, value: &str| {
            let mut json = serde_json::json!({"format": "qcow2", "virtual-size": 1});
            if key == "data-file" {
                json["format-specific"] = serde_json::json!({"data": {"data-file": value}});
            } else {
                json[key] = value.into();
            }
            json
        };
        for name in ["nbd://127.0.0.1:10809/x", "json:{\"driver\":\"nbd\"}", "http://h/x", "file:/etc/shadow"] {
            assert!(parse_layer(&with("backing-filename", name), top).is_err(), "backing {name}");
            assert!(parse_layer(&with("data-file", name), top).is_err(), "data file {name}");
        }
        for format in ["vmdk", "qed", "luks", "nbd", "file"] {
            assert!(parse_layer(&with("format", format), top).is_err(), "format {format}");
        }
        assert!(parse_layer(&serde_json::json!([]), top).is_err(), "not an object");
    }

    #[test]
    fn probes_backing_formats_from_their_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let probe_of = |bytes: &[u8]| {
            let path = dir.path().join("probe");
            std::fs::write(&path, bytes).unwrap();
            probe(&std::fs::File::open(&path).unwrap()).unwrap()
        };
        assert_eq!(probe_of(b"QFI\xfb\0\0\0\x03"), "qcow2");
        assert_eq!(probe_of(b"conectix"), "vpc");
        assert_eq!(probe_of(b"vhdxfile"), "vhdx");
        let mut vdi = vec![0u8; 72];
        vdi[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe_of(&vdi), "vdi");
        // A VMDK descriptor is not handed to qemu's vmdk driver, which would open its extents.
        assert_eq!(probe_of(b"# Disk DescriptorFile\n"), "raw");
        assert_eq!(probe_of(b""), "raw");
    }

    /// A real chain: qemu-img reads each image by descriptor and converts exactly the chain
    /// inspected (the backing's data shows through the top's holes).
    #[test]
    fn converts_a_backing_chain_through_the_descriptors_it_confined() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let qemu = |args: &[&str]| crate::test_support::run_in(d, args);
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
        qemu(&["qemu-io", "-c", "write -P 0x41 0 64k", "base.qcow2"]);
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "top.qcow2"]);
        qemu(&["qemu-io", "-c", "write -P 0x42 64k 64k", "top.qcow2"]);
        let roots = SourceRoots::new(&[d.to_owned()]);
        let control = JobControl::new(Duration::from_secs(60));
        let top = d.join("top.qcow2");
        let info = QemuImg::default().inspect(&top, SourceFormat::Qcow2, &roots, &control).unwrap();
        assert_eq!(info.chain, [d.join("base.qcow2")]);
        assert_eq!(info.referenced_files, [d.join("base.qcow2")]);
        let out = d.join("out.qcow2");
        let request = ConversionRequest {
            source: &top,
            format: SourceFormat::Qcow2,
            destination: &out,
            compression: None,
            ova_disk: None,
            inspected_files: Some(&info.referenced_files),
            roots: &roots,
            tap: None,
        };
        QemuImg::default().convert(&request, &control).unwrap();
        qemu(&["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", "top.qcow2", "out.qcow2"]);
        // A top inside the roots whose backing is outside them: refused by name.
        std::fs::create_dir(d.join("vm")).unwrap();
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "../base.qcow2", "vm/top.qcow2"]);
        let narrow = SourceRoots::new(&[d.join("vm")]);
        match QemuImg::default().inspect(&d.join("vm/top.qcow2"), SourceFormat::Qcow2, &narrow, &control) {
            Err(ConvertError::Source(SourceError::Outside { path, .. })) => assert!(path.ends_with("base.qcow2")),
            other => panic!("a backing outside the roots must be refused, got {other:?}"),
        }
    }

    /// A header rewritten in place while qemu-img converts (here: another backing file) fails
    /// the conversion: the chain read after it must be the chain confined before it.
    #[test]
    fn a_header_rewritten_during_the_conversion_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let qemu = |args: &[&str]| crate::test_support::run_in(d, args);
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "other.qcow2", "1M"]);
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "top.qcow2"]);
        let roots = SourceRoots::new(&[d.to_owned()]);
        let control = JobControl::new(Duration::from_secs(60));
        let qemu_img = QemuImg::default();
        let chain = qemu_img.walk(&d.join("top.qcow2"), SourceFormat::Qcow2, &roots, &control).unwrap();
        qemu_img.check_still(&chain, &control).expect("nothing changed yet");
        let inode = |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(d.join(p)).unwrap());
        let before = inode("top.qcow2");
        qemu(&["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "other.qcow2", "top.qcow2"]);
        assert_eq!(inode("top.qcow2"), before, "rewritten in place");
        match qemu_img.check_still(&chain, &control) {
            Err(ConvertError::Unsupported(m)) => assert!(m.contains("rewritten while it was converted"), "{m}"),
            other => panic!("a rewritten header must fail the conversion, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;
    use crate::test_support::qemu_img;
    use std::os::unix::fs::FileExt;

    /// The check that replaced the digest of the output (issue 13) passes a sound qcow2 and
    /// fails one whose refcount table lost its first entry.
    #[test]
    fn qemu_img_check_tells_a_sound_qcow2_from_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "8M"]);
        let control = JobControl::new(std::time::Duration::from_secs(60));
        assert_eq!(QemuImg::default().check(&disk, &control).unwrap(), OutputCheck::Clean);

        let file = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        let mut field = [0u8; 8];
        file.read_exact_at(&mut field, 48).unwrap();
        file.write_all_at(&[0u8; 8], u64::from_be_bytes(field)).unwrap();
        match QemuImg::default().check(&disk, &control) {
            Err(ConvertError::Failed(said)) => {
                assert!(said.starts_with("qemu-img check of the converted disk failed"), "{said}")
            }
            other => panic!("a damaged qcow2 must fail the check, got {other:?}"),
        }
        let missing = QemuImg { binary: dir.path().join("no-qemu-img") };
        assert_eq!(missing.check(&disk, &control).unwrap(), OutputCheck::NoQemuImg);
    }
}
