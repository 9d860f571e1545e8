//! The `hyper2kvm` command: parses the command line and hands over to the library.
//! Exit codes: 0 success, 1 failure (message on stderr), 2 usage error; `run` adds its own
//! (docs/WORKER.md).
//!
//! It holds no behaviour: each command is one call into the module that owns it
//! (docs/ARCHITECTURE.md, "The binary: one call per command").

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use hyper2kvm::config::{self, CompressionType, Config, Overrides};
use hyper2kvm::convert::{oneshot, Compression};
use hyper2kvm::logging::LogFormat;
use hyper2kvm::SourceFormat;
use hyper2kvm::{capabilities, daemon, events, guest, status, submit, worker};

#[derive(Parser)]
#[command(
    name = "hyper2kvm",
    version,
    about = "Moves VMware and cloud VM exports onto KVM: queue daemon, qcow2 conversion, libvirt domains"
)]
struct Cli {
    /// Directory holding hyper2kvm.conf and hyper2kvm-INSTANCE.conf [env: HYPER2KVM_CONFIG_DIR] [default: /etc/hyper2kvm]
    #[arg(long, global = true, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// trace, debug, info, warn or error (an empty value means the configured one)
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// auto (journal under systemd, text otherwise), human or json
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch WATCH_DIR for manifests and convert them (what systemd runs)
    Daemon(DaemonArgs),
    /// Convert a disk image (or every disk of an OVA) to qcow2
    Convert {
        /// The image; `-`, a pipe or a FIFO is read in one pass (streamOptimized VMDK only)
        source: PathBuf,
        /// The qcow2 to create. The other disks of an OVA go beside it as DST-<disk id>.qcow2,
        /// and their paths are printed
        #[arg(short, long, value_name = "DST.qcow2")]
        output: PathBuf,
        /// Write compressed clusters (zlib unless zstd is named)
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "zlib", require_equals = true)]
        compress: Option<Codec>,
        /// Compression level, 0-9 as COMPRESS_LEVEL (zstd levels are mapped); qemu's is 6
        #[arg(long, requires = "compress", default_value_t = hyper2kvm::config::DEFAULT_COMPRESS_LEVEL, value_parser = clap::value_parser!(u32).range(0..=9))]
        level: u32,
        /// Source format; guessed from the file name when omitted, else from the first bytes
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Describe a disk image: format, subformat, sizes, extents, delta chain; an OVA's disks and hardware
    Inspect {
        source: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Inspect the guest inside the image (OS, boot loader, firmware, kernels and their
        /// virtio drivers, VMware tools) with libguestfs instead of the image itself
        #[arg(long, conflicts_with = "format")]
        guest: bool,
    },
    /// Fix the guest on IMAGE... (all of one VM's disks, first disk first) for KVM with
    /// virt-v2v-in-place, in place, then verify it from its own files (docs/GUEST.md)
    Fix {
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<PathBuf>,
        /// Then boot it once in a throwaway qemu (-snapshot) and wait for a login prompt
        #[arg(long)]
        boot_check: bool,
        /// How long the boot check waits for the login prompt
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        boot_check_seconds: u64,
        /// Where the tools' logs go [default: IMAGE.fix beside the first image]
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Print the evidence as JSON
        #[arg(long)]
        json: bool,
    },
    /// Drop a manifest into WATCH_DIR atomically (temporary name, then link)
    Submit {
        manifest: PathBuf,
        /// Name in WATCH_DIR (default: the manifest's file name)
        #[arg(long)]
        name: Option<String>,
        /// Submit even if the manifest does not validate
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Show the queue, claims and recent jobs, read from disk
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Show what this host can do; exits 1 when it cannot work (a readiness probe)
    Capabilities {
        #[arg(long)]
        json_output: bool,
        /// Free space TEMP_DIR and OUTPUT_DIR need for this worker to be ready, in MiB
        #[arg(long, value_name = "MIB", default_value_t = capabilities::DEFAULT_MIN_FREE_MIB)]
        min_free_mib: u64,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Run one Worker Job Protocol v1 job (inspect, convert) from a job spec; exit codes in docs/WORKER.md
    Run {
        /// The job spec (JSON)
        #[arg(value_name = "JOB.json")]
        spec: PathBuf,
    },
    /// Print a job's progress events (daemon jobs from WATCH_DIR, run jobs from --output-dir)
    Events {
        /// The job id (a daemon job's, as `status` shows it, or a run spec's job_id)
        job_id: String,
        /// Keep printing new events until the job ends
        #[arg(long)]
        follow: bool,
        /// Only events of this phase (claim, convert, publish, done, ...)
        #[arg(long, value_name = "PHASE")]
        phase: Option<String>,
        /// Print the events as JSON lines
        #[arg(long)]
        json: bool,
        /// How often --follow looks for new events, in seconds
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        poll: f64,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// `daemon`'s flags: the configuration's, and `--format`, which HyperSDK's units pass.
#[derive(Args)]
struct DaemonArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Output format: qcow2, the only one (an empty value counts as unset)
    #[arg(long, value_name = "FORMAT", value_parser = output_format)]
    format: Option<String>,
}

/// `--format` of `daemon`: qcow2 (any case) or empty; anything else is a usage error.
fn output_format(value: &str) -> Result<String, String> {
    if value.is_empty() || value.eq_ignore_ascii_case("qcow2") {
        Ok(value.to_owned())
    } else {
        Err("hyper2kvm daemon writes qcow2 only; pass --format qcow2 or leave --format out".to_owned())
    }
}

/// Flags that override configuration keys (empty values count as unset).
#[derive(Args, Default)]
struct ConfigArgs {
    /// WATCH_DIR: the queue directory
    #[arg(long, value_name = "DIR")]
    watch_dir: Option<String>,
    /// OUTPUT_DIR: where results appear
    #[arg(long, value_name = "DIR")]
    output_dir: Option<String>,
    /// INSTANCE_NAME: selects hyper2kvm-INSTANCE.conf and per-instance defaults
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// POLL_INTERVAL in seconds
    #[arg(long, value_name = "SECONDS")]
    poll_interval: Option<String>,
    /// MAX_CONCURRENT jobs (0 = number of CPUs)
    #[arg(long, value_name = "N")]
    max_concurrent: Option<String>,
    /// Any configuration key, as KEY=VALUE (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Codec {
    Zlib,
    Zstd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Vmdk,
    /// An OVF package: an OVA archive, or an OVF descriptor with its files beside it
    Ova,
    Raw,
    Qcow2,
    Vhd,
    Vhdx,
    Vdi,
}

impl From<Format> for SourceFormat {
    fn from(f: Format) -> SourceFormat {
        match f {
            Format::Vmdk => SourceFormat::Vmdk,
            Format::Ova => SourceFormat::Ova,
            Format::Raw => SourceFormat::Raw,
            Format::Qcow2 => SourceFormat::Qcow2,
            Format::Vhd => SourceFormat::Vhd,
            Format::Vhdx => SourceFormat::Vhdx,
            Format::Vdi => SourceFormat::Vdi,
        }
    }
}

impl Codec {
    fn with_level(self, level: u32) -> Compression {
        let kind = match self {
            Codec::Zlib => CompressionType::Zlib,
            Codec::Zstd => CompressionType::Zstd,
        };
        Compression { kind, level }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Rust ignores SIGPIPE, so `hyper2kvm status --json | head` would panic in println! when
    // head exits; a one-shot command exits quietly instead, as command-line tools do. Never
    // the daemon: a closed log stream must not kill it in the middle of a conversion.
    if !matches!(cli.command, Command::Daemon(_)) {
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Library errors already name their cause; the chain would repeat it.
            eprintln!("hyper2kvm: {e}");
            oneshot::raise_if_interrupted();
            ExitCode::FAILURE
        }
    }
}

/// Hands each command to the function of the module that owns it.
fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let load = |args: &ConfigArgs| load_config(&cli.config_dir, cli.log_level.clone(), args);
    match cli.command {
        Command::Daemon(DaemonArgs { config, format: _ }) => daemon::serve(load(&config)?, cli.log_format)?,
        Command::Convert { source, output, compress, level, format } => {
            let compression = compress.map(|codec| codec.with_level(level));
            oneshot::convert_command(&source, format.map(SourceFormat::from), &output, compression)?
        }
        Command::Inspect { source, json, guest: true, .. } => {
            guest::oneshot::inspect_command(&load(&ConfigArgs::default())?, &source, json)?
        }
        Command::Inspect { source, json, format, .. } => {
            oneshot::inspect_command(&source, format.map(SourceFormat::from), json)?
        }
        Command::Fix { images, boot_check, boot_check_seconds, work_dir, json } => {
            let boot = boot_check.then(|| Duration::from_secs(boot_check_seconds));
            guest::oneshot::fix(&load(&ConfigArgs::default())?, &images, work_dir, boot, json)?
        }
        Command::Submit { manifest, name, force, config } => {
            submit::command(&manifest, &load(&config)?, name.as_deref(), force)?
        }
        Command::Status { json, config } => status::command(&load(&config)?, cli.config_dir.clone(), json)?,
        Command::Capabilities { json_output, min_free_mib, config } => {
            capabilities::command(&load(&config)?, min_free_mib, json_output)?
        }
        Command::Run { spec } => return Ok(worker::run::command(&spec, cli.log_level.as_deref(), cli.log_format)),
        Command::Events { job_id, follow, phase, json, poll, config } => {
            events::command(&load(&config)?, &job_id, &events::Filter { phase, json }, follow, poll)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The configuration with the command line's flags on top.
fn load_config(config_dir: &Option<PathBuf>, log_level: Option<String>, args: &ConfigArgs) -> anyhow::Result<Config> {
    let mut flags = Vec::new();
    let named = [
        ("WATCH_DIR", &args.watch_dir),
        ("OUTPUT_DIR", &args.output_dir),
        ("INSTANCE_NAME", &args.instance),
        ("POLL_INTERVAL", &args.poll_interval),
        ("MAX_CONCURRENT", &args.max_concurrent),
        ("LOG_LEVEL", &log_level),
    ];
    for (key, value) in named {
        if let Some(value) = value {
            flags.push((key.to_owned(), value.clone()));
        }
    }
    // Paths typed on a command line are relative to where it was typed.
    let cwd = std::env::current_dir()?;
    for (key, value) in flags.iter_mut() {
        if matches!(key.as_str(), "WATCH_DIR" | "OUTPUT_DIR") && !value.is_empty() && !value.starts_with('/') {
            *value = cwd.join(&*value).display().to_string();
        }
    }
    for pair in &args.set {
        let (key, value) =
            pair.split_once('=').ok_or_else(|| anyhow::anyhow!("--set takes KEY=VALUE, got {pair:?}"))?;
        flags.push((key.to_owned(), value.to_owned()));
    }
    let overrides = Overrides { config_dir: config_dir.clone(), flags };
    Ok(Config::load(&overrides, &config::ProcessEnv)?)
}
