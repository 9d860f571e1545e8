//! The `hyper2kvm` command: parses the command line and hands over to the library.
//! Exit codes: 0 success, 1 failure (message on stderr), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use hyper2kvm::config::{self, CompressionType, Config, Overrides};
use hyper2kvm::convert::{oneshot, Compression};
use hyper2kvm::logging::{self, LogFormat};
use hyper2kvm::manifest::SourceFormat;
use hyper2kvm::{capabilities, daemon, status, submit};

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
    Daemon(ConfigArgs),
    /// Convert one disk image to qcow2
    Convert {
        source: PathBuf,
        /// The qcow2 to create
        #[arg(short, long, value_name = "DST.qcow2")]
        output: PathBuf,
        /// Write compressed clusters (zlib unless zstd is named)
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "zlib", require_equals = true)]
        compress: Option<Codec>,
        /// Compression level, 0-9 as COMPRESS_LEVEL (zstd levels are mapped); qemu's is 6
        #[arg(long, requires = "compress", default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
        level: u32,
        /// Source format; guessed from the file name when omitted
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Describe a disk image: format, subformat, size, referenced files
    Inspect {
        source: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum)]
        format: Option<Format>,
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
    /// Show what this host can do
    Capabilities {
        #[arg(long)]
        json_output: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
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
            Format::Raw => SourceFormat::Raw,
            Format::Qcow2 => SourceFormat::Qcow2,
            Format::Vhd => SourceFormat::Vhd,
            Format::Vhdx => SourceFormat::Vhdx,
            Format::Vdi => SourceFormat::Vdi,
        }
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already name their cause; the chain would repeat it.
            eprintln!("hyper2kvm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let log_level = cli.log_level.clone();
    match cli.command {
        Command::Daemon(args) => {
            let config = load_config(&cli.config_dir, log_level, &args)?;
            logging::init(config.log_level, cli.log_format, config.instance.as_deref());
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(daemon::run(config))?;
            Ok(())
        }
        Command::Convert { source, output, compress, level, format } => {
            let format = format.map(SourceFormat::from).unwrap_or_else(|| oneshot::guess_format(&source));
            let compression = compress.map(|c| Compression {
                kind: match c {
                    Codec::Zlib => CompressionType::Zlib,
                    Codec::Zstd => CompressionType::Zstd,
                },
                level,
            });
            oneshot::convert(&source, format, &output, compression)?;
            Ok(())
        }
        Command::Inspect { source, json, format } => {
            let format = format.map(SourceFormat::from).unwrap_or_else(|| oneshot::guess_format(&source));
            let info = oneshot::inspect(&source, format)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_fields(&info, "");
            }
            Ok(())
        }
        Command::Submit { manifest, name, force, config } => {
            let config = load_config(&cli.config_dir, log_level, &config)?;
            let target = submit::submit(&manifest, &config.watch_dir, name.as_deref(), force)?;
            println!("{}", target.display());
            Ok(())
        }
        Command::Status { json, config } => {
            let config = load_config(&cli.config_dir, log_level, &config)?;
            let overrides = Overrides { config_dir: cli.config_dir.clone(), flags: Vec::new() };
            let status =
                status::with_instances(status::collect(&config), &config::config_dir(&overrides, &config::ProcessEnv));
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
            Ok(())
        }
        Command::Capabilities { json_output, config } => {
            let config = load_config(&cli.config_dir, log_level, &config)?;
            let caps = capabilities::probe(&config);
            if json_output {
                println!("{}", serde_json::to_string_pretty(&caps)?);
            } else {
                print!("{}", capabilities::render(&caps));
            }
            Ok(())
        }
    }
}

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

/// Prints a JSON description as indented `key: value` lines.
fn print_fields(value: &serde_json::Value, indent: &str) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                if v.is_object() || v.is_array() {
                    println!("{indent}{key}:");
                    print_fields(v, &format!("{indent}  "));
                } else if !v.is_null() {
                    println!("{indent}{key}: {}", v.as_str().map_or_else(|| v.to_string(), str::to_owned));
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                println!("{indent}- [{i}]");
                print_fields(item, &format!("{indent}  "));
            }
        }
        other => println!("{indent}{other}"),
    }
}
