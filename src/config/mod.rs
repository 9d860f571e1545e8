//! Configuration: built-in defaults < `HYPER2KVM_<KEY>` in the environment < `hyper2kvm.conf`
//! < `hyper2kvm-INSTANCE.conf` < `KEY` in the environment < command-line flags.
//!
//! Every value remembers where it came from, so that an invalid one is reported with its key,
//! its source (file and line, environment, or flag) and the accepted range. An empty value at
//! any layer counts as unset: systemd expands `--log-level=${LOG_LEVEL}` to `--log-level=` when
//! the variable is missing, and that must not override a default.

pub mod envfile;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// Where configuration files live unless `--config-dir` or `HYPER2KVM_CONFIG_DIR` says otherwise.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/hyper2kvm";

/// Root of the daemon's state when the defaults are used.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/hyper2kvm";

/// COMPRESS_LEVEL when unset: qemu's own level for zlib, so outputs match `qemu-img -c`'s.
pub const DEFAULT_COMPRESS_LEVEL: u32 = 6;

/// Every key the daemon reads. Keys not in the contract (`SETTLE_SECONDS`,
/// `INVALID_MANIFEST_GRACE`, `DRAIN_SECONDS`, `USE_INOTIFY`, `MIN_FREE_SPACE_MB`) are documented in docs/CONFIG.md.
pub const KNOWN_KEYS: &[&str] = &[
    "WATCH_DIR",
    "OUTPUT_DIR",
    "LOG_LEVEL",
    "INSTANCE_NAME",
    "POLL_INTERVAL",
    "MAX_CONCURRENT",
    "QEMU_CONVERT_OPTIONS",
    "COMPRESS_LEVEL",
    "CLEANUP_SOURCE",
    "CONVERSION_TIMEOUT",
    "LIBVIRT_INTEGRATION",
    "LIBVIRT_URI",
    "LIBVIRT_BRIDGE",
    "LIBVIRT_NETWORK",
    "LIBVIRT_POOL",
    "LIBVIRT_AUTOSTART",
    "VERBOSE_PROGRESS",
    "RETENTION_DAYS",
    "FAILED_RETENTION_DAYS",
    "TEMP_DIR",
    "SOURCE_ROOTS",
    "LEASE_SECONDS",
    "METRICS_ADDR",
    "SETTLE_SECONDS",
    "INVALID_MANIFEST_GRACE",
    "DRAIN_SECONDS",
    "USE_INOTIFY",
    "MIN_FREE_SPACE_MB",
    "GUEST_TOOLS_WRAPPER",
    "VIRTIO_WIN",
    "BOOT_CHECK",
    "BOOT_CHECK_SECONDS",
];

/// BOOT_CHECK: whether a job boots its result once before publishing it (docs/GUEST.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootCheck {
    /// No boot check.
    #[default]
    Off,
    /// A guest that does not reach a login prompt is a warning in `V.json`.
    Warn,
    /// A guest that does not reach a login prompt fails the job.
    Require,
}

impl BootCheck {
    fn parse(text: &str) -> Option<BootCheck> {
        Some(match text.to_ascii_lowercase().as_str() {
            "off" | "false" | "no" | "0" => BootCheck::Off,
            "warn" => BootCheck::Warn,
            "require" => BootCheck::Require,
            _ => return None,
        })
    }
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// No layer set it: the built-in default.
    Default,
    /// A configuration file.
    File {
        /// The file that set it.
        path: PathBuf,
        /// The 1-based line of the assignment (the first line of a continued one).
        line: usize,
    },
    /// The plain `KEY` variable in the environment.
    Environment,
    /// `HYPER2KVM_<KEY>` in the environment (the variable's name).
    PrefixedEnvironment(String),
    /// A command-line flag (`--watch-dir`, `--set KEY=VALUE`, …).
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "the built-in default"),
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Environment => write!(f, "the environment"),
            Origin::PrefixedEnvironment(variable) => write!(f, "the environment variable {variable}"),
            Origin::Flag => write!(f, "the command line"),
        }
    }
}

/// Why the configuration cannot be used. Fatal at start-up.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A value does not parse or is out of range.
    #[error("invalid {key}={value:?} in {origin}: expected {expected}")]
    Invalid {
        /// The key, as in [`KNOWN_KEYS`].
        key: &'static str,
        /// The raw value as it was given.
        value: String,
        /// The layer that set it.
        origin: Origin,
        /// What would have been accepted, for the message.
        expected: String,
    },
    /// A configuration file exists but cannot be read (a missing one is skipped).
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// A configuration file has a line that is not `KEY=value`.
    #[error("syntax error in configuration file {path} {source}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The offending line and what is wrong with it.
        source: envfile::SyntaxError,
    },
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// `trace`: everything.
    Trace,
    /// `debug`: diagnostics for developers and bug reports.
    Debug,
    /// `info`: job progress and results (the default).
    Info,
    /// `warn` (or `warning`): only problems that did not stop a job.
    Warn,
    /// `error`: only failures.
    Error,
}

impl LogLevel {
    /// Parses `trace debug info warn error` case-insensitively; `warning` means `warn`.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_lowercase().as_str() {
            "trace" => Self::Trace,
            "debug" => Self::Debug,
            "info" => Self::Info,
            "warn" | "warning" => Self::Warn,
            "error" => Self::Error,
            _ => return None,
        })
    }

    /// The name `tracing` filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// Compression codec of qcow2 clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    /// `zlib` (deflate): qcow2's original codec, readable by every qemu.
    Zlib,
    /// `zstd`: faster, needs qemu 5.1 or later to read.
    Zstd,
}

/// The honoured subset of QEMU_CONVERT_OPTIONS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertOptions {
    /// `-c`: write compressed clusters.
    pub compress: bool,
    /// `-o compression_type=…`.
    pub compression_type: CompressionType,
    /// `-p`: progress lines.
    pub progress: bool,
}

/// The resolved configuration of one daemon instance (or one command run by hand).
#[derive(Debug, Clone)]
pub struct Config {
    /// INSTANCE_NAME: the instance this daemon is; `None` for the unnamed default instance.
    pub instance: Option<String>,
    /// WATCH_DIR: where manifests are picked up (default `STATE_ROOT/queue`).
    pub watch_dir: PathBuf,
    /// OUTPUT_DIR: where converted disks and domain files are published (default `STATE_ROOT/output`).
    pub output_dir: PathBuf,
    /// LOG_LEVEL: the least severe level logged (default `info`).
    pub log_level: LogLevel,
    /// POLL_INTERVAL: time between scans of WATCH_DIR (seconds in the file, default 5).
    pub poll_interval: Duration,
    /// How long a manifest's size and mtime must hold still before it is taken.
    pub settle: Duration,
    /// How long an unparseable manifest may sit unchanged before it is failed.
    pub invalid_manifest_grace: Duration,
    /// Jobs converted at once; 0 in the file means the number of CPUs.
    pub max_concurrent: usize,
    /// QEMU_CONVERT_OPTIONS: the honoured `qemu-img convert` options (default `-O qcow2`).
    pub convert_options: ConvertOptions,
    /// COMPRESS_LEVEL: codec level 0–9 for compressed clusters (default 6).
    pub compress_level: u32,
    /// CLEANUP_SOURCE: delete the source disks after a verified success.
    pub cleanup_source: bool,
    /// CONVERSION_TIMEOUT: how long one job may run (minutes in the file, default 60).
    pub conversion_timeout: Duration,
    /// LIBVIRT_INTEGRATION: define each converted VM in libvirt (`V.xml` is written either way).
    pub libvirt_integration: bool,
    /// LIBVIRT_URI: the libvirt connection to register with (default `qemu:///system`).
    pub libvirt_uri: String,
    /// LIBVIRT_BRIDGE: host bridge the NICs attach to (default `virbr0`).
    pub libvirt_bridge: String,
    /// LIBVIRT_NETWORK: a libvirt network the NICs attach to instead; `None` uses LIBVIRT_BRIDGE.
    pub libvirt_network: Option<String>,
    /// LIBVIRT_POOL: storage pool the disks are placed into (default `default`).
    pub libvirt_pool: String,
    /// LIBVIRT_AUTOSTART: mark registered domains to start with the host.
    pub libvirt_autostart: bool,
    /// VERBOSE_PROGRESS: log `converting: N%` every 5 %.
    pub verbose_progress: bool,
    /// RETENTION_DAYS: days finished job records are kept under `done/` (default 7).
    pub retention_days: u32,
    /// FAILED_RETENTION_DAYS: days failed job records are kept under `failed/` (default 3).
    pub failed_retention_days: u32,
    /// TEMP_DIR: scratch space for images being written, on OUTPUT_DIR's filesystem.
    pub temp_dir: PathBuf,
    /// SOURCE_ROOTS: the only directories source disks (and files they name) may resolve into.
    pub source_roots: Vec<PathBuf>,
    /// LEASE_SECONDS: a claim whose heartbeat is older than this is taken over (default 90 s).
    pub lease: Duration,
    /// METRICS_ADDR: where `/metrics` and `/healthz` are served; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// How long SIGTERM waits for running jobs before releasing them.
    pub drain_timeout: Duration,
    /// Use inotify for faster local pickup (polling is always on).
    pub use_inotify: bool,
    /// Below this many free bytes in OUTPUT_DIR the daemon claims nothing (MIN_FREE_SPACE_MB).
    pub min_free_bytes: u64,
    /// GUEST_TOOLS_WRAPPER split on whitespace: the command prefix the guest tools
    /// (virt-inspector, virt-v2v-in-place, qemu-system) run behind; empty runs them from PATH.
    pub guest_tools_wrapper: Vec<String>,
    /// VIRTIO_WIN: the virtio-win ISO or directory virt-v2v-in-place installs Windows' virtio
    /// drivers from; checked at start-up (exists, readable). Without it a Windows guest keeps
    /// SATA and e1000e.
    pub virtio_win: Option<PathBuf>,
    /// BOOT_CHECK: boot each job's result once before publishing it.
    pub boot_check: BootCheck,
    /// BOOT_CHECK_SECONDS: how long that boot has to reach a login prompt.
    pub boot_check_seconds: Duration,
    /// Start-up warnings (unknown keys, ignored options), to be logged once.
    pub warnings: Vec<String>,
}

/// What the command line contributes: the layer above the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config-dir`; falls back to `HYPER2KVM_CONFIG_DIR`, then `/etc/hyper2kvm`.
    pub config_dir: Option<PathBuf>,
    /// `KEY` → value from flags such as `--watch-dir` or `--set KEY=VALUE`.
    pub flags: Vec<(String, String)>,
}

/// A source of environment variables; the process environment in production, a map in tests.
pub trait Environment {
    /// The variable's value, or `None` when it is unset (or not valid Unicode).
    fn var(&self, key: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

type Layer = BTreeMap<String, (String, Origin)>;

impl Config {
    /// Where results and staging directories live under OUTPUT_DIR and TEMP_DIR.
    pub fn output_layout(&self) -> crate::output_layout::OutputLayout {
        crate::output_layout::OutputLayout::new(&self.output_dir, &self.temp_dir)
    }

    /// Loads the configuration from every layer.
    pub fn load(overrides: &Overrides, env: &dyn Environment) -> Result<Config, ConfigError> {
        let config_dir = config_dir(overrides, env);
        let mut warnings = Vec::new();
        // HYPER2KVM_<KEY> ranks just above the defaults: below the files, so that a value is
        // the same whether systemd exports the files (plain KEY, which wins) or the binary
        // reads them itself.
        let prefixed = prefixed_env_layer(env);
        let mut values: Layer = prefixed.clone();

        read_file_layer(&config_dir.join("hyper2kvm.conf"), &mut values, &mut warnings)?;
        let env_layer = env_layer(env);
        let flag_layer = flag_layer(&overrides.flags, &mut warnings);
        // The instance decides which per-instance file to read, so look for it in the layers
        // that can name it before that file is read.
        let instance = [&flag_layer, &env_layer, &values].iter().find_map(|layer| layer.get("INSTANCE_NAME").cloned());
        if let Some((name, origin)) = &instance {
            check_instance_name(name, origin)?;
            let path = config_dir.join(format!("hyper2kvm-{name}.conf"));
            read_file_layer(&path, &mut values, &mut warnings)?;
        }
        for (key, (value, origin)) in env_layer {
            // systemd's EnvironmentFile= exports the conf files' values to us as well: where the
            // environment only repeats a file, the file (with its line) is the origin to name.
            if values.get(&key).is_some_and(|(from_file, _)| *from_file == value) {
                continue;
            }
            values.insert(key, (value, origin));
        }
        values.extend(flag_layer);
        // The instance file itself may set INSTANCE_NAME; that value names the state root too.
        if let Some((name, origin)) = values.get("INSTANCE_NAME") {
            check_instance_name(name, origin)?;
        }
        warn_shadowed(&prefixed, &values, &mut warnings);
        let instance = values.get("INSTANCE_NAME").map(|(v, _)| v.clone());
        Resolver { values, warnings }.resolve(instance)
    }
}

/// The directory holding `hyper2kvm.conf` and `hyper2kvm-INSTANCE.conf`: `--config-dir`, else
/// `HYPER2KVM_CONFIG_DIR`, else `/etc/hyper2kvm`.
pub fn config_dir(overrides: &Overrides, env: &dyn Environment) -> PathBuf {
    overrides
        .config_dir
        .clone()
        .or_else(|| env.var("HYPER2KVM_CONFIG_DIR").filter(|s| !s.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR))
}

fn check_instance_name(name: &str, origin: &Origin) -> Result<(), ConfigError> {
    let ok = !name.starts_with('.')
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key: "INSTANCE_NAME",
            value: name.to_owned(),
            origin: origin.clone(),
            expected: "up to 64 letters, digits, '_', '-', '.' or '@', not starting with '.'".into(),
        })
    }
}

fn read_file_layer(path: &Path, values: &mut Layer, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
    };
    let assignments = envfile::parse(&text).map_err(|source| ConfigError::Syntax { path: path.to_owned(), source })?;
    for a in assignments {
        if !KNOWN_KEYS.contains(&a.key.as_str()) {
            warnings.push(format!("{}:{}: unknown key {} ignored", path.display(), a.line, a.key));
            continue;
        }
        if !a.value.is_empty() {
            let origin = Origin::File { path: path.to_owned(), line: a.line };
            values.insert(a.key, (a.value, origin));
        }
    }
    Ok(())
}

fn env_layer(env: &dyn Environment) -> Layer {
    KNOWN_KEYS
        .iter()
        .filter_map(|key| {
            let value = env.var(key).filter(|v| !v.is_empty())?;
            Some((key.to_string(), (value, Origin::Environment)))
        })
        .collect()
}

/// The prefix of the second, lower-ranked name of every key in the environment: what
/// HyperSDK's systemd units set (`HYPER2KVM_WATCH_DIR`, `HYPER2KVM_OUTPUT_DIR`).
pub const ENV_PREFIX: &str = "HYPER2KVM_";

fn prefixed_env_layer(env: &dyn Environment) -> Layer {
    KNOWN_KEYS
        .iter()
        .filter_map(|key| {
            let variable = format!("{ENV_PREFIX}{key}");
            let value = env.var(&variable).filter(|v| !v.is_empty())?;
            Some((key.to_string(), (value, Origin::PrefixedEnvironment(variable))))
        })
        .collect()
}

/// A `HYPER2KVM_<KEY>` that a file, the plain variable or a flag overrides with another value
/// is said once at start-up: whoever set it expects it to count.
fn warn_shadowed(prefixed: &Layer, values: &Layer, warnings: &mut Vec<String>) {
    for (key, (value, origin)) in prefixed {
        let Origin::PrefixedEnvironment(variable) = origin else { continue };
        if let Some((used, from)) = values.get(key).filter(|(used, from)| from != origin && used != value) {
            warnings.push(format!(
                "{variable}={value:?} in the environment is not used: {key}={used:?} from {from} ranks above it"
            ));
        }
    }
}

fn flag_layer(flags: &[(String, String)], warnings: &mut Vec<String>) -> Layer {
    let mut layer = Layer::new();
    for (key, value) in flags {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            warnings.push(format!("unknown key {key} on the command line ignored"));
        } else if !value.is_empty() {
            layer.insert(key.clone(), (value.clone(), Origin::Flag));
        }
    }
    layer
}

/// Turns raw strings into typed values, naming the key and origin of any bad one.
struct Resolver {
    values: Layer,
    warnings: Vec<String>,
}

impl Resolver {
    fn raw(&self, key: &str) -> Option<&(String, Origin)> {
        self.values.get(key)
    }

    fn parse<T>(
        &self,
        key: &'static str,
        default: T,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        match self.raw(key) {
            None => Ok(default),
            Some((value, origin)) => parse(value.trim()).ok_or_else(|| ConfigError::Invalid {
                key,
                value: value.clone(),
                origin: origin.clone(),
                expected: expected.to_owned(),
            }),
        }
    }

    fn string(&self, key: &str) -> Option<String> {
        self.raw(key).map(|(v, _)| v.clone())
    }

    fn seconds(&self, key: &'static str, default: f64, min: f64, max: f64) -> Result<Duration, ConfigError> {
        let expected = format!("a number of seconds from {min} to {max}");
        let secs =
            self.parse(key, default, &expected, |s| s.parse::<f64>().ok().filter(|v| (min..=max).contains(v)))?;
        Ok(Duration::from_secs_f64(secs))
    }

    /// Minutes, fractions allowed (tests use a few seconds).
    fn minutes(&self, key: &'static str, default: f64, min: f64, max: f64) -> Result<Duration, ConfigError> {
        let expected = format!("a number of minutes from {min} to {max}");
        let minutes =
            self.parse(key, default, &expected, |s| s.parse::<f64>().ok().filter(|v| (min..=max).contains(v)))?;
        Ok(Duration::from_secs_f64(minutes * 60.0))
    }

    fn integer(&self, key: &'static str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
        let expected = format!("a whole number from {min} to {max}");
        self.parse(key, default, &expected, |s| s.parse::<u64>().ok().filter(|v| (min..=max).contains(v)))
    }

    fn boolean(&self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.parse(key, default, "true or false (also yes/no, on/off, 1/0)", parse_bool)
    }

    fn resolve(mut self, instance: Option<String>) -> Result<Config, ConfigError> {
        let state_root = match &instance {
            Some(name) => Path::new(DEFAULT_STATE_ROOT).join(name),
            None => PathBuf::from(DEFAULT_STATE_ROOT),
        };
        let absolute = |s: &str| Some(PathBuf::from(s)).filter(|p| p.is_absolute());
        let watch_dir = self.parse("WATCH_DIR", state_root.join("queue"), "an absolute directory path", absolute)?;
        let output_dir = self.parse("OUTPUT_DIR", state_root.join("output"), "an absolute directory path", absolute)?;
        let temp_dir = self.parse(
            "TEMP_DIR",
            output_dir.join(crate::output_layout::DEFAULT_TEMP_DIR),
            "an absolute directory path",
            absolute,
        )?;
        let default_roots = default_source_roots(&watch_dir);
        let source_roots =
            self.parse("SOURCE_ROOTS", default_roots, "a colon-separated list of absolute directories", parse_roots)?;
        let max_concurrent = match self.integer("MAX_CONCURRENT", 2, 0, 256)? {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n as usize,
        };
        let convert_options = self.convert_options()?;
        let lease = self.seconds("LEASE_SECONDS", 90.0, 3.0, 86_400.0)?;
        let metrics_addr = self.parse("METRICS_ADDR", None, "an address such as 127.0.0.1:9109", |s| {
            s.parse::<SocketAddr>().ok().map(Some)
        })?;
        let libvirt_network = self.string("LIBVIRT_NETWORK");
        Ok(Config {
            log_level: self.parse(
                "LOG_LEVEL",
                LogLevel::Info,
                "one of trace, debug, info, warn, error",
                LogLevel::parse,
            )?,
            poll_interval: self.seconds("POLL_INTERVAL", 5.0, 0.05, 3600.0)?,
            settle: self.seconds("SETTLE_SECONDS", 2.0, 0.0, 3600.0)?,
            invalid_manifest_grace: self.seconds("INVALID_MANIFEST_GRACE", 60.0, 0.0, 86_400.0)?,
            max_concurrent,
            convert_options,
            compress_level: self.integer("COMPRESS_LEVEL", DEFAULT_COMPRESS_LEVEL.into(), 0, 9)? as u32,
            cleanup_source: self.boolean("CLEANUP_SOURCE", false)?,
            conversion_timeout: self.minutes("CONVERSION_TIMEOUT", 60.0, 0.01, 10_080.0)?,
            libvirt_integration: self.boolean("LIBVIRT_INTEGRATION", false)?,
            libvirt_uri: self.string("LIBVIRT_URI").unwrap_or_else(|| "qemu:///system".into()),
            libvirt_bridge: self.string("LIBVIRT_BRIDGE").unwrap_or_else(|| "virbr0".into()),
            libvirt_network,
            libvirt_pool: self.string("LIBVIRT_POOL").unwrap_or_else(|| "default".into()),
            libvirt_autostart: self.boolean("LIBVIRT_AUTOSTART", false)?,
            verbose_progress: self.boolean("VERBOSE_PROGRESS", false)?,
            retention_days: self.integer("RETENTION_DAYS", 7, 0, 36_500)? as u32,
            failed_retention_days: self.integer("FAILED_RETENTION_DAYS", 3, 0, 36_500)? as u32,
            drain_timeout: self.seconds("DRAIN_SECONDS", 600.0, 0.0, 86_400.0)?,
            use_inotify: self.boolean("USE_INOTIFY", true)?,
            min_free_bytes: self.integer("MIN_FREE_SPACE_MB", 64, 0, 1 << 30)? << 20,
            guest_tools_wrapper: self
                .string("GUEST_TOOLS_WRAPPER")
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            virtio_win: self.virtio_win()?,
            boot_check: self.parse("BOOT_CHECK", BootCheck::Off, "off, warn or require", BootCheck::parse)?,
            boot_check_seconds: self.seconds("BOOT_CHECK_SECONDS", 600.0, 10.0, 86_400.0)?,
            source_roots,
            lease,
            metrics_addr,
            temp_dir,
            watch_dir,
            output_dir,
            instance,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    /// VIRTIO_WIN, when set: an absolute path to an ISO or a directory that this process can
    /// read now, so that a typo fails at start-up rather than in a Windows guest's fix.
    fn virtio_win(&self) -> Result<Option<PathBuf>, ConfigError> {
        let Some((value, origin)) = self.raw("VIRTIO_WIN").filter(|(v, _)| !v.trim().is_empty()) else {
            return Ok(None);
        };
        let path = PathBuf::from(value.trim());
        let invalid = |why: String| ConfigError::Invalid {
            key: "VIRTIO_WIN",
            value: value.clone(),
            origin: origin.clone(),
            expected: format!("the absolute path of a readable virtio-win ISO or directory ({why})"),
        };
        if !path.is_absolute() {
            return Err(invalid("the path is relative".into()));
        }
        let readable =
            if path.is_dir() { std::fs::read_dir(&path).map(|_| ()) } else { std::fs::File::open(&path).map(|_| ()) };
        readable.map_err(|e| invalid(e.to_string()))?;
        Ok(Some(path))
    }

    fn convert_options(&mut self) -> Result<ConvertOptions, ConfigError> {
        let text = self.string("QEMU_CONVERT_OPTIONS").unwrap_or_else(|| "-O qcow2".into());
        let (options, ignored) = parse_convert_options(&text).map_err(|expected| ConfigError::Invalid {
            key: "QEMU_CONVERT_OPTIONS",
            value: text.clone(),
            origin: self.raw("QEMU_CONVERT_OPTIONS").map(|(_, o)| o.clone()).unwrap_or(Origin::Default),
            expected,
        })?;
        for option in ignored {
            self.warnings.push(format!("QEMU_CONVERT_OPTIONS: {option:?} is not honoured and is ignored"));
        }
        Ok(options)
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn parse_roots(s: &str) -> Option<Vec<PathBuf>> {
    let roots: Vec<PathBuf> = s.split(':').filter(|p| !p.is_empty()).map(PathBuf::from).collect();
    (!roots.is_empty() && roots.iter().all(|p| p.is_absolute())).then_some(roots)
}

/// The parent of WATCH_DIR (where producers put the exports beside the queue) and the
/// daemon's own state root.
fn default_source_roots(watch_dir: &Path) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(parent) = watch_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        roots.push(parent.to_owned());
    }
    let state = PathBuf::from(DEFAULT_STATE_ROOT);
    if !roots.contains(&state) {
        roots.push(state);
    }
    roots
}

/// `qemu-img convert` options, not honoured, whose argument is the next word.
const IGNORED_WITH_ARGUMENT: &[&str] = &["-f", "-F", "-B", "-s", "-l", "-S", "-t", "-T", "-m", "-r", "--object"];

/// Parses QEMU_CONVERT_OPTIONS into the honoured subset plus the tokens that were ignored.
/// An output format other than qcow2 is an error, since it would leave no `.qcow2` to publish.
pub fn parse_convert_options(text: &str) -> Result<(ConvertOptions, Vec<String>), String> {
    let mut options = ConvertOptions { compress: false, compression_type: CompressionType::Zlib, progress: false };
    let mut ignored = Vec::new();
    let mut tokens = text.split_whitespace();
    while let Some(token) = tokens.next() {
        match token {
            "-c" => options.compress = true,
            "-p" => options.progress = true,
            "-O" => match tokens.next() {
                Some("qcow2") => {}
                other => return Err(format!("-O qcow2 (hyper2kvm writes only qcow2), not -O {}", other.unwrap_or(""))),
            },
            "-o" => {
                let Some(list) = tokens.next() else {
                    return Err("an option list after -o, such as -o compression_type=zstd".into());
                };
                for item in list.split(',') {
                    match item {
                        "compression_type=zlib" => options.compression_type = CompressionType::Zlib,
                        "compression_type=zstd" => options.compression_type = CompressionType::Zstd,
                        other if other.starts_with("compression_type=") => {
                            return Err("compression_type=zlib or compression_type=zstd".into())
                        }
                        other => ignored.push(format!("-o {other}")),
                    }
                }
            }
            // An ignored option that takes an argument is ignored together with it.
            other if IGNORED_WITH_ARGUMENT.contains(&other) => match tokens.next() {
                Some(arg) => ignored.push(format!("{other} {arg}")),
                None => ignored.push(other.to_owned()),
            },
            other => ignored.push(other.to_owned()),
        }
    }
    Ok((options, ignored))
}

#[cfg(test)]
mod tests;
