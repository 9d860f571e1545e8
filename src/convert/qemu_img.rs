//! The `qemu-img` backend: a real, well-kept tool that reads every format we accept.
//!
//! It runs as a child process with a deadline: on timeout or cancellation the child is killed.
//! `qemu-img convert -p` prints `(12.34/100%)\r` progress to stdout even into a pipe, which
//! feeds the job's progress counters.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::{ConversionRequest, ConvertError, Converter, ImageInfo, JobControl};
use crate::config::CompressionType;
use crate::manifest::SourceFormat;

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

    fn inspect(&self, source: &Path, format: SourceFormat, control: &JobControl) -> Result<ImageInfo, ConvertError> {
        let mut cmd = self.command();
        cmd.args(["info", "--output=json", "--backing-chain", "-f", qemu_format(format)?]).arg(source);
        let output = run(cmd, control, |_| {})?;
        let json: Value = serde_json::from_slice(&output)
            .map_err(|e| ConvertError::Failed(format!("qemu-img info printed unexpected output: {e}")))?;
        parse_info(&json, source)
    }

    fn convert(&self, request: &ConversionRequest<'_>, control: &JobControl) -> Result<(), ConvertError> {
        let mut options = String::from("compat=1.1");
        if let Some(c) = request.compression {
            if c.kind == CompressionType::Zstd {
                options.push_str(",compression_type=zstd");
            }
        }
        let mut cmd = self.command();
        cmd.args(["convert", "-p", "-f", qemu_format(request.format)?, "-O", "qcow2", "-o", &options]);
        if request.compression.is_some() {
            cmd.arg("-c");
        }
        cmd.arg(request.source).arg(request.destination);
        let progress = control.progress.clone();
        run(cmd, control, move |percent| {
            let total = progress.total_bytes.load(Ordering::Relaxed);
            progress.done_bytes.store((total as f64 * percent / 100.0) as u64, Ordering::Relaxed);
        })?;
        Ok(())
    }
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

/// Reads format, size and every referenced file from `qemu-img info --backing-chain` JSON.
fn parse_info(json: &Value, source: &Path) -> Result<ImageInfo, ConvertError> {
    let chain = json.as_array().ok_or_else(|| ConvertError::Failed("qemu-img info did not print a chain".into()))?;
    let top = chain.first().ok_or_else(|| ConvertError::Failed("qemu-img info printed an empty chain".into()))?;
    let base_dir = source.parent().unwrap_or(Path::new("/"));
    let mut referenced = Vec::new();
    for image in chain {
        collect_filenames(image, base_dir, &mut referenced)?;
    }
    referenced.sort();
    referenced.dedup();
    referenced.retain(|p| p != source);
    let backing = chain.iter().skip(1).filter_map(|image| image["filename"].as_str()).map(|f| base_dir.join(f));
    Ok(ImageInfo {
        format: top["format"].as_str().unwrap_or("unknown").to_owned(),
        subformat: top["format-specific"]["data"]["create-type"].as_str().map(str::to_owned),
        virtual_size: top["virtual-size"].as_u64().unwrap_or(0),
        referenced_files: referenced,
        allocated_bytes: None,
        chain: backing.collect(),
        ddb: Default::default(),
    })
}

/// Walks the whole info tree: extents and backing files appear at several depths.
fn collect_filenames(value: &Value, base_dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ConvertError> {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if key == "filename" || key == "full-backing-filename" {
                    if let Some(name) = v.as_str().filter(|s| !s.is_empty()) {
                        out.push(referenced_path(name, base_dir)?);
                    }
                } else {
                    collect_filenames(v, base_dir, out)?;
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_filenames(item, base_dir, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A plain file path, made absolute against the image's directory. Protocol references
/// (`nbd://…`, `json:{…}`) are refused: a disk image must only point at files.
fn referenced_path(name: &str, base_dir: &Path) -> Result<PathBuf, ConvertError> {
    let looks_like_protocol =
        name.split_once(':').is_some_and(|(scheme, _)| !scheme.contains('/') && !scheme.is_empty());
    if looks_like_protocol {
        return Err(ConvertError::Unsupported(format!("the image refers to {name:?}, which is not a plain file")));
    }
    let path = Path::new(name);
    Ok(if path.is_absolute() { path.to_owned() } else { base_dir.join(path) })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
