//! Logging: structured journald fields when systemd runs us (JOURNAL_STREAM is set), human
//! text on stderr otherwise, or JSON lines with `--log-format=json`.
//!
//! Span and event fields such as `instance`, `job_id`, `vm_name` and `stage` become the
//! journal fields `INSTANCE`, `JOB_ID`, `VM_NAME` and `STAGE`, so that
//! `journalctl -u hyper2kvm@vsphere JOB_ID=…` finds one job's lines.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// The journal when run by systemd, readable text on stderr otherwise.
    #[default]
    Auto,
    /// Readable text on stderr.
    Human,
    /// One JSON object per line on stderr.
    Json,
}

/// Installs the global subscriber. `RUST_LOG`, when set, refines the level.
pub fn init(level: LogLevel, format: LogFormat, instance: Option<&str>) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(level.as_str()));
    let registry = tracing_subscriber::registry().with(filter);
    if format == LogFormat::Auto && std::env::var_os("JOURNAL_STREAM").is_some() {
        let identifier = match instance {
            Some(name) => format!("hyper2kvm@{name}"),
            None => "hyper2kvm".to_owned(),
        };
        if let Ok(journald) = tracing_journald::layer() {
            registry.with(journald.with_field_prefix(None).with_syslog_identifier(identifier)).init();
            return;
        }
    }
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == LogFormat::Json {
        registry.with(stderr.json().flatten_event(true)).init();
    } else {
        registry.with(stderr).init();
    }
}
