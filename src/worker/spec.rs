//! The Worker Job Protocol v1 job spec (`JOB.json`), parsed and validated.
//!
//! ```json
//! {
//!   "version": "1",
//!   "job_id": "convert-web01",
//!   "operation": "convert",
//!   "image": { "path": "/data/input/web01.vmdk", "format": "vmdk" },
//!   "parameters": { "output_format": "qcow2", "compress": true, "compress_level": 6 },
//!   "execution_policy": { "timeout_seconds": 7200, "retries": 2, "retry_backoff_seconds": 30 },
//!   "artifacts": { "output_path": "/data/output/web01" }
//! }
//! ```
//!
//! Every problem is collected and told at once, each naming its field. Unknown keys are
//! warnings, not errors: a spec written for a newer worker still runs the parts this one knows.
//! The reference is docs/WORKER.md.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::{CompressionType, DEFAULT_COMPRESS_LEVEL};
use crate::convert::Compression;
use crate::manifest::SourceFormat;

/// The protocol versions this worker runs.
pub const VERSIONS: [&str; 2] = ["1", "1.0"];

/// The largest `retries` accepted: more is a mistake, not a policy.
pub const MAX_RETRIES: u32 = 10;

/// `retry_backoff_seconds` when the spec gives none.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);

/// The longest wait between two attempts, however many there were (the backoff doubles).
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Describe the image (as `hyper2kvm inspect --json`).
    Inspect,
    /// Convert the image to qcow2 (as `hyper2kvm convert`).
    Convert,
    /// Repair the guest offline. Named by the protocol; this build has no guest fixing.
    OfflineFix,
}

impl Operation {
    /// The name as specs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Inspect => "inspect",
            Operation::Convert => "convert",
            Operation::OfflineFix => "offline_fix",
        }
    }
}

/// The image a job works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `image.path`: absolute.
    pub path: PathBuf,
    /// `image.format`, or guessed from the file name.
    pub format: SourceFormat,
}

/// How a job is run: its time limit and its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionPolicy {
    /// How long one attempt may take; `None`: no limit.
    pub timeout: Option<Duration>,
    /// Attempts after the first one that failed.
    pub retries: u32,
    /// The wait before the first retry; doubled before each further one, up to [`MAX_BACKOFF`].
    pub backoff: Duration,
}

impl ExecutionPolicy {
    /// The wait before attempt `attempt` (2 for the first retry).
    pub fn backoff_before(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(16);
        self.backoff.saturating_mul(1 << doublings).min(MAX_BACKOFF)
    }
}

/// A validated job spec.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// The protocol version as the spec wrote it (`1` or `1.0`).
    pub version: String,
    /// Names the job's files in `output_path`.
    pub job_id: String,
    /// `operation`: `inspect`, `convert` or `offline_fix`.
    pub operation: Operation,
    /// `image`: the source disk, its path and format.
    pub image: Image,
    /// For `convert`: the codec and level, when compressing.
    pub compression: Option<Compression>,
    /// For `convert`: the qcow2's file name in `output_path`.
    pub output_name: String,
    /// `execution_policy`: the time limit of an attempt, the retries and their backoff.
    pub policy: ExecutionPolicy,
    /// `artifacts.output_path`: where the output, the state, the result and the events go.
    pub output_path: PathBuf,
    /// Keys this worker does not know, ignored.
    pub warnings: Vec<String>,
}

/// A spec that cannot run: every problem found, and what of the job could still be read, so
/// that the failure can be recorded in its state file.
#[derive(Debug, Clone)]
pub struct Invalid {
    /// Each problem, naming its field (at most ten, then how many more).
    pub problems: Vec<String>,
    /// `job_id`, when it was valid.
    pub job_id: Option<String>,
    /// `artifacts.output_path`, when it was valid.
    pub output_path: Option<PathBuf>,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the job spec is invalid: {}", self.problems.join("; "))
    }
}

/// At most this many problems are told; the rest are counted.
const MAX_PROBLEMS: usize = 10;

/// Parses and validates a job spec's bytes.
pub fn parse(bytes: &[u8]) -> Result<JobSpec, Invalid> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| Invalid {
        problems: vec![format!("it is not JSON ({e})")],
        job_id: None,
        output_path: None,
    })?;
    let Some(root) = value.as_object() else {
        return Err(Invalid { problems: vec!["it is not a JSON object".into()], job_id: None, output_path: None });
    };
    let mut check = Checker::default();
    let spec = check.spec(root);
    match spec {
        Some(spec) if check.problems.is_empty() => Ok(JobSpec { warnings: check.warnings, ..spec }),
        _ => {
            let mut problems = check.problems;
            if problems.len() > MAX_PROBLEMS {
                let more = problems.len() - MAX_PROBLEMS;
                problems.truncate(MAX_PROBLEMS);
                problems.push(format!("and {more} more"));
            }
            Err(Invalid { problems, job_id: check.job_id, output_path: check.output_path })
        }
    }
}

const TOP_KEYS: [&str; 7] = ["version", "job_id", "operation", "image", "parameters", "execution_policy", "artifacts"];
const IMAGE_KEYS: [&str; 2] = ["path", "format"];
const PARAMETER_KEYS: [&str; 5] = ["output_format", "output_name", "compress", "compress_level", "compression_type"];
const POLICY_KEYS: [&str; 3] = ["timeout_seconds", "retries", "retry_backoff_seconds"];
const ARTIFACT_KEYS: [&str; 1] = ["output_path"];

/// Collects problems and warnings while reading a spec.
#[derive(Default)]
struct Checker {
    problems: Vec<String>,
    warnings: Vec<String>,
    job_id: Option<String>,
    output_path: Option<PathBuf>,
}

impl Checker {
    fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    fn spec(&mut self, root: &Map<String, Value>) -> Option<JobSpec> {
        self.unknown_keys("", root, &TOP_KEYS);
        let version = self.version(root.get("version"));
        let job_id = self.job_id(root.get("job_id"));
        let output_path = self.output_path(root.get("artifacts"));
        let operation = self.operation(root.get("operation"));
        let image = self.image(root.get("image"));
        let empty = Map::new();
        let parameters = self.section(root.get("parameters"), "parameters", &PARAMETER_KEYS).unwrap_or(&empty);
        let (compression, output_name) = self.parameters(parameters, image.as_ref());
        let policy = self.policy(root.get("execution_policy"));
        Some(JobSpec {
            version: version?,
            job_id: job_id?,
            operation: operation?,
            image: image?,
            compression,
            output_name: output_name?,
            policy: policy?,
            output_path: output_path?,
            warnings: Vec::new(),
        })
    }

    fn unknown_keys(&mut self, prefix: &str, map: &Map<String, Value>, known: &[&str]) {
        for key in map.keys().filter(|k| !known.contains(&k.as_str())).take(MAX_PROBLEMS) {
            self.warnings.push(format!("unknown key {prefix}{key} is ignored"));
        }
    }

    /// An object-valued section; absent is `None` without a problem.
    fn section<'a>(&mut self, value: Option<&'a Value>, name: &str, known: &[&str]) -> Option<&'a Map<String, Value>> {
        let value = value?;
        match value.as_object() {
            Some(map) => {
                self.unknown_keys(&format!("{name}."), map, known);
                Some(map)
            }
            None => {
                self.problem(format!("{name} must be an object"));
                None
            }
        }
    }

    fn version(&mut self, value: Option<&Value>) -> Option<String> {
        let text = match value {
            None => {
                self.problem("version is missing (this worker runs version \"1\")");
                return None;
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => {
                self.problem("version must be a string such as \"1\"");
                return None;
            }
        };
        if VERSIONS.contains(&text.as_str()) {
            Some(text)
        } else {
            self.problem(format!(
                "version {text:?} is not supported: this worker runs version \"1\"; use a worker that knows {text:?}"
            ));
            None
        }
    }

    fn job_id(&mut self, value: Option<&Value>) -> Option<String> {
        let id = self.string(value, "job_id")?;
        let safe = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !safe {
            self.problem(format!(
                "job_id {id:?} must be 1 to 128 characters of letters, digits, '.', '_' and '-', not starting with '.' (it names the job's files)"
            ));
            return None;
        }
        self.job_id = Some(id.clone());
        Some(id)
    }

    fn string(&mut self, value: Option<&Value>, name: &str) -> Option<String> {
        match value {
            None => {
                self.problem(format!("{name} is missing"));
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.problem(format!("{name} must be a string"));
                None
            }
        }
    }

    fn absolute_path(&mut self, value: Option<&Value>, name: &str) -> Option<PathBuf> {
        let text = self.string(value, name)?;
        let path = PathBuf::from(&text);
        if !path.is_absolute() {
            self.problem(format!("{name} {text:?} must be an absolute path"));
            return None;
        }
        if path.components().any(|c| c == std::path::Component::ParentDir) {
            self.problem(format!("{name} {text:?} must not contain '..'"));
            return None;
        }
        Some(path)
    }

    fn output_path(&mut self, value: Option<&Value>) -> Option<PathBuf> {
        if value.is_none() {
            self.problem("artifacts is missing (artifacts.output_path says where the job writes)");
            return None;
        }
        let artifacts = self.section(value, "artifacts", &ARTIFACT_KEYS)?;
        let path = self.absolute_path(artifacts.get("output_path"), "artifacts.output_path")?;
        self.output_path = Some(path.clone());
        Some(path)
    }

    fn operation(&mut self, value: Option<&Value>) -> Option<Operation> {
        let name = self.string(value, "operation")?;
        match name.as_str() {
            "inspect" => Some(Operation::Inspect),
            "convert" => Some(Operation::Convert),
            "offline_fix" => Some(Operation::OfflineFix),
            other => {
                self.problem(format!("operation {other:?} is not one of inspect, convert, offline_fix"));
                None
            }
        }
    }

    fn image(&mut self, value: Option<&Value>) -> Option<Image> {
        if value.is_none() {
            self.problem("image is missing (image.path names the disk image)");
            return None;
        }
        let image = self.section(value, "image", &IMAGE_KEYS)?;
        let path = self.absolute_path(image.get("path"), "image.path")?;
        let format = match image.get("format") {
            None | Some(Value::Null) => crate::convert::oneshot::guess_format(&path),
            Some(_) => {
                let name = self.string(image.get("format"), "image.format")?;
                match source_format(&name) {
                    Some(format) => format,
                    None => {
                        self.problem(format!(
                            "image.format {name:?} is not one of vmdk, ova, raw, qcow2, vhd, vhdx, vdi"
                        ));
                        return None;
                    }
                }
            }
        };
        Some(Image { path, format })
    }

    /// The compression and the output's file name.
    fn parameters(&mut self, p: &Map<String, Value>, image: Option<&Image>) -> (Option<Compression>, Option<String>) {
        if let Some(format) = p.get("output_format") {
            if format.as_str() != Some("qcow2") {
                self.problem(format!(
                    "parameters.output_format {format} is not supported: the only output format is \"qcow2\""
                ));
            }
        }
        let compress = match p.get("compress") {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(_) => {
                self.problem("parameters.compress must be true or false");
                false
            }
        };
        let level = match p.get("compress_level") {
            None => DEFAULT_COMPRESS_LEVEL,
            Some(v) => match v.as_u64().filter(|l| *l <= 9) {
                Some(level) => level as u32,
                None => {
                    self.problem(format!("parameters.compress_level {v} must be a whole number from 0 to 9"));
                    DEFAULT_COMPRESS_LEVEL
                }
            },
        };
        let kind = match p.get("compression_type").map(|v| v.as_str()) {
            None | Some(Some("zlib")) => CompressionType::Zlib,
            Some(Some("zstd")) => CompressionType::Zstd,
            Some(_) => {
                self.problem("parameters.compression_type must be \"zlib\" or \"zstd\"");
                CompressionType::Zlib
            }
        };
        let output_name = match p.get("output_name") {
            Some(_) => self.string(p.get("output_name"), "parameters.output_name").and_then(|name| {
                if crate::names::check_vm_name(&name).is_err() {
                    self.problem(format!(
                        "parameters.output_name {name:?} must be a file name (no '/', not starting with '.')"
                    ));
                    return None;
                }
                Some(name)
            }),
            None => image.map(|i| default_output_name(&i.path)),
        };
        (compress.then_some(Compression { kind, level }), output_name)
    }

    fn policy(&mut self, value: Option<&Value>) -> Option<ExecutionPolicy> {
        let empty = Map::new();
        let p = match value {
            None => &empty,
            Some(_) => self.section(value, "execution_policy", &POLICY_KEYS)?,
        };
        let timeout = match p.get("timeout_seconds") {
            None | Some(Value::Null) => None,
            Some(v) => {
                match v.as_f64().filter(|s| *s > 0.0 && *s <= 30.0 * 86400.0) {
                    Some(seconds) => Some(Duration::from_secs_f64(seconds)),
                    None => {
                        self.problem(format!("execution_policy.timeout_seconds {v} must be a number of seconds above 0 (at most 30 days)"));
                        return None;
                    }
                }
            }
        };
        let retries = match p.get("retries") {
            None => 0,
            Some(v) => match v.as_u64().filter(|r| *r <= u64::from(MAX_RETRIES)) {
                Some(r) => r as u32,
                None => {
                    self.problem(format!(
                        "execution_policy.retries {v} must be a whole number from 0 to {MAX_RETRIES}"
                    ));
                    return None;
                }
            },
        };
        let backoff = match p.get("retry_backoff_seconds") {
            None => DEFAULT_BACKOFF,
            Some(v) => match v.as_f64().filter(|s| *s >= 0.0 && *s <= MAX_BACKOFF.as_secs_f64()) {
                Some(seconds) => Duration::from_secs_f64(seconds),
                None => {
                    self.problem(format!(
                        "execution_policy.retry_backoff_seconds {v} must be a number of seconds from 0 to {}",
                        MAX_BACKOFF.as_secs()
                    ));
                    return None;
                }
            },
        };
        Some(ExecutionPolicy { timeout, retries, backoff })
    }
}

/// `web01.vmdk` → `web01.qcow2`.
fn default_output_name(image: &std::path::Path) -> String {
    let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if stem.is_empty() || stem.starts_with('.') {
        "disk.qcow2".to_owned()
    } else {
        format!("{stem}.qcow2")
    }
}

fn source_format(name: &str) -> Option<SourceFormat> {
    Some(match name.to_ascii_lowercase().as_str() {
        "vmdk" => SourceFormat::Vmdk,
        "ova" => SourceFormat::Ova,
        "raw" | "img" => SourceFormat::Raw,
        "qcow2" => SourceFormat::Qcow2,
        "vhd" | "vpc" => SourceFormat::Vhd,
        "vhdx" => SourceFormat::Vhdx,
        "vdi" => SourceFormat::Vdi,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn good() -> Value {
        json!({
            "version": "1",
            "job_id": "convert-web01",
            "operation": "convert",
            "image": {"path": "/data/in/web01.vmdk", "format": "vmdk"},
            "parameters": {"output_format": "qcow2", "compress": true, "compress_level": 3, "compression_type": "zstd"},
            "execution_policy": {"timeout_seconds": 60, "retries": 2, "retry_backoff_seconds": 5},
            "artifacts": {"output_path": "/data/out"}
        })
    }

    fn parse_value(v: &Value) -> Result<JobSpec, Invalid> {
        parse(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn a_full_spec_reads_every_field() {
        let spec = parse_value(&good()).unwrap();
        assert_eq!(spec.job_id, "convert-web01");
        assert_eq!(spec.operation, Operation::Convert);
        assert_eq!(spec.image, Image { path: "/data/in/web01.vmdk".into(), format: SourceFormat::Vmdk });
        assert_eq!(spec.compression, Some(Compression { kind: CompressionType::Zstd, level: 3 }));
        assert_eq!(spec.output_name, "web01.qcow2");
        assert_eq!(
            spec.policy,
            ExecutionPolicy { timeout: Some(Duration::from_secs(60)), retries: 2, backoff: Duration::from_secs(5) }
        );
        assert_eq!(spec.output_path, PathBuf::from("/data/out"));
        assert!(spec.warnings.is_empty(), "{:?}", spec.warnings);
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let mut v = good();
        v["priority"] = json!(5);
        v["parameters"]["fstab_mode"] = json!("stabilize-all");
        let spec = parse_value(&v).unwrap();
        assert_eq!(spec.warnings, ["unknown key priority is ignored", "unknown key parameters.fstab_mode is ignored"]);
    }

    #[test]
    fn every_problem_is_told_with_its_field() {
        let mut v = good();
        v["version"] = json!("2");
        v["image"]["path"] = json!("relative.vmdk");
        v["execution_policy"]["retries"] = json!(99);
        v["parameters"]["compress_level"] = json!(12);
        let err = parse_value(&v).unwrap_err();
        let text = err.to_string();
        for part in [
            "version \"2\" is not supported",
            "image.path \"relative.vmdk\" must be an absolute path",
            "execution_policy.retries 99",
            "parameters.compress_level 12",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert_eq!(err.job_id.as_deref(), Some("convert-web01"));
        assert_eq!(err.output_path, Some(PathBuf::from("/data/out")));
    }

    #[test]
    fn bad_job_ids_and_output_paths_are_refused() {
        for id in ["../x", ".h", "a/b", "", "a b"] {
            let mut v = good();
            v["job_id"] = json!(id);
            assert!(parse_value(&v).unwrap_err().to_string().contains("job_id"), "{id}");
        }
        let mut v = good();
        v["artifacts"]["output_path"] = json!("/data/../etc");
        assert!(parse_value(&v).unwrap_err().to_string().contains("must not contain '..'"));
        assert!(parse(b"[1]").unwrap_err().to_string().contains("not a JSON object"));
        assert!(parse(b"{").unwrap_err().to_string().contains("not JSON"));
    }

    #[test]
    fn the_example_specs_are_valid_without_warnings() {
        for bytes in [
            &include_bytes!("../../k8s/examples/inspect-job.json")[..],
            &include_bytes!("../../k8s/examples/convert-job.json")[..],
        ] {
            let spec = parse(bytes).unwrap_or_else(|e| panic!("{e}"));
            assert!(spec.warnings.is_empty(), "{:?}", spec.warnings);
        }
    }

    #[test]
    fn defaults_and_backoff() {
        let v = json!({"version": 1, "job_id": "i", "operation": "inspect",
            "image": {"path": "/x/disk.raw"}, "artifacts": {"output_path": "/o"}});
        let spec = parse_value(&v).unwrap();
        assert_eq!(spec.image.format, SourceFormat::Raw);
        assert_eq!(spec.compression, None);
        assert_eq!(spec.policy.timeout, None);
        assert_eq!(spec.policy.retries, 0);
        let policy = ExecutionPolicy { timeout: None, retries: 5, backoff: Duration::from_secs(10) };
        let waits: Vec<u64> = (2..=6).map(|a| policy.backoff_before(a).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160]);
        assert_eq!(policy.backoff_before(40), MAX_BACKOFF);
    }
}
