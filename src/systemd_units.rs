//! The hyper2kvm daemons systemd knows on this host, for `hyper2kvm status`: every
//! `hyper2kvm@INSTANCE.service` and, when installed, the plain `hyper2kvm.service`; their unit
//! state, pid, uptime and the WATCH_DIR / OUTPUT_DIR their conf files give them.
//!
//! Everything here is best effort. Where systemctl is missing, fails (no systemd as PID 1, a
//! container, a non-Linux host) or hangs, the answer is an empty list and no error: `status`
//! reads the queue from disk and must keep working from any host that mounts it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, Overrides};

/// The template's name without `@`; instance units are `hyper2kvm@NAME.service`.
const UNIT_PREFIX: &str = "hyper2kvm@";
const UNIT_SUFFIX: &str = ".service";

/// The single daemon without an instance name (systemd/hyper2kvm.service).
pub(crate) const PLAIN_UNIT: &str = "hyper2kvm.service";

/// How long one systemctl call may take: `status` is interactive, and a wedged D-Bus or PID 1
/// must not hang it.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(5);

/// The `systemctl show` properties read for each instance.
/// `ExecMainStartTimestampMonotonic` is a plain number of microseconds on every systemd version
/// (the wall-clock timestamps are formatted for people, in the local zone).
const PROPERTIES: &[&str] = &[
    "Id",
    "LoadState",
    "ActiveState",
    "SubState",
    "UnitFileState",
    "MainPID",
    "ExecMainStartTimestampMonotonic",
    "StatusText",
];

/// One daemon unit (`hyper2kvm@NAME.service` or `hyper2kvm.service`) as systemd and its conf
/// files describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceView {
    /// The instance name (`%i`), e.g. `vsphere`; none for `hyper2kvm.service`.
    pub name: Option<String>,
    /// The unit, e.g. `hyper2kvm@vsphere.service`.
    pub unit: String,
    /// `loaded`, `not-found`, `masked`, …
    pub load_state: String,
    /// `active`, `inactive`, `failed`, `activating`, `deactivating`, …
    pub active_state: String,
    /// `running`, `dead`, `failed`, `stop-sigterm`, …
    pub sub_state: String,
    /// `enabled`, `disabled`, `static`, … when systemd says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_file_state: Option<String>,
    /// The daemon's pid while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub main_pid: Option<u32>,
    /// Seconds since the running daemon was started (this run, not the unit's first start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    /// The daemon's last `STATUS=` line ("2 running, 5 queued, …").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_text: Option<String>,
    /// WATCH_DIR as `hyper2kvm.conf` and `hyper2kvm-NAME.conf` set it (or its default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_dir: Option<String>,
    /// OUTPUT_DIR, likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
    /// Why the conf files could not be read for this instance (the daemon would not start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
}

/// A row of `systemctl list-units --all --plain --no-legend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnitRow {
    /// `hyper2kvm@NAME.service`.
    pub unit: String,
    /// The LOAD column: `loaded`, `not-found`, …
    pub load: String,
    /// The ACTIVE column: `active`, `failed`, …
    pub active: String,
    /// The SUB column: `running`, `auto-restart`, …
    pub sub: String,
}

/// The daemon units systemd knows, with their directories read from the conf files in
/// `config_dir`. Empty when systemctl cannot be asked.
///
/// Candidates are `hyper2kvm.service` (kept when installed), the loaded instance units
/// (running, failed, or merely referenced), instance units with a unit file of their own,
/// instances enabled into `hyper2kvm.target`, and every `hyper2kvm-NAME.conf` in `config_dir`
/// (configured, perhaps never started); one `systemctl show` then gives each its state.
pub(crate) fn instances(config_dir: &Path) -> Vec<InstanceView> {
    let Some(listed) = systemctl(&["list-units", "--all", "--plain", "--no-legend", "hyper2kvm@*"]) else {
        return Vec::new();
    };
    let rows = parse_list_units(&listed);
    let mut units: BTreeSet<String> = rows.iter().map(|r| r.unit.clone()).collect();
    if let Some(files) = systemctl(&["list-unit-files", "--plain", "--no-legend", "hyper2kvm@*"]) {
        units.extend(parse_list_unit_files(&files));
    }
    if let Some(wants) = systemctl(&["show", "--property=Wants", "--value", "hyper2kvm.target"]) {
        units.extend(wants.split_whitespace().filter(|u| instance_name(u).is_some()).map(str::to_owned));
    }
    units.extend(configured_instances(config_dir).iter().map(|name| unit_name(name)));
    units.insert(PLAIN_UNIT.to_owned());

    let mut show_args: Vec<String> = vec!["show".into()];
    show_args.extend(PROPERTIES.iter().map(|p| format!("--property={p}")));
    show_args.extend(units.iter().cloned());
    let shown = systemctl(&show_args.iter().map(String::as_str).collect::<Vec<_>>())
        .map(|text| parse_show(&text))
        .unwrap_or_default();
    let rows: BTreeMap<&str, &UnitRow> = rows.iter().map(|r| (r.unit.as_str(), r)).collect();
    let now = monotonic_now_us();
    units
        .iter()
        .filter_map(|unit| {
            let props = shown.iter().find(|p| p.get("Id").map(String::as_str) == Some(unit.as_str()));
            let mut view = unit_view(unit, props, rows.get(unit.as_str()).copied(), now)?;
            add_directories(&mut view, config_dir);
            Some(view)
        })
        .collect()
}

/// The view of `unit` from its `systemctl show` block and `list-units` row; `None` for a unit
/// that is not ours, and for `hyper2kvm.service` when it is not installed. `now` is
/// CLOCK_MONOTONIC in microseconds, the clock of systemd's `…TimestampMonotonic` properties.
fn unit_view(
    unit: &str,
    props: Option<&BTreeMap<String, String>>,
    row: Option<&UnitRow>,
    now: Option<u64>,
) -> Option<InstanceView> {
    let name = if unit == PLAIN_UNIT { None } else { Some(instance_name(unit)?) };
    let prop = |key: &str| props.and_then(|p| p.get(key)).filter(|v| !v.is_empty()).cloned();
    let state = |key: &str, from_row: Option<&String>| {
        prop(key).or_else(|| from_row.cloned()).unwrap_or_else(|| "unknown".to_owned())
    };
    let load_state = state("LoadState", row.map(|r| &r.load));
    if name.is_none() && load_state != "loaded" {
        return None;
    }
    let main_pid = prop("MainPID").and_then(|p| p.parse().ok()).filter(|&p: &u32| p != 0);
    let started = prop("ExecMainStartTimestampMonotonic").and_then(|t| t.parse::<u64>().ok()).filter(|&t| t != 0);
    // The start time stays set after the daemon exits: an uptime only while it runs.
    let uptime_seconds = match (main_pid, started, now) {
        (Some(_), Some(started), Some(now)) => Some(now.saturating_sub(started) / 1_000_000),
        _ => None,
    };
    Some(InstanceView {
        load_state,
        active_state: state("ActiveState", row.map(|r| &r.active)),
        sub_state: state("SubState", row.map(|r| &r.sub)),
        unit_file_state: prop("UnitFileState"),
        main_pid,
        uptime_seconds,
        status_text: prop("StatusText"),
        watch_dir: None,
        output_dir: None,
        config_error: None,
        unit: unit.to_owned(),
        name,
    })
}

/// CLOCK_MONOTONIC now, in microseconds.
fn monotonic_now_us() -> Option<u64> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given, which lives on this stack.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let (secs, nanos) = (u64::try_from(now.tv_sec).ok()?, u64::try_from(now.tv_nsec).ok()?);
    (rc == 0).then(|| secs * 1_000_000 + nanos / 1000)
}

/// `3d 4h`, `4h 12m`, `12m 5s`, `5s`: the two largest units, as people read an uptime.
pub(crate) fn human_duration(seconds: u64) -> String {
    let parts = [(seconds / 86_400, "d"), (seconds / 3600 % 24, "h"), (seconds / 60 % 60, "m"), (seconds % 60, "s")];
    let first = parts.iter().position(|(n, _)| *n != 0).unwrap_or(3);
    parts[first..].iter().take(2).map(|(n, unit)| format!("{n}{unit}")).collect::<Vec<_>>().join(" ")
}

/// Fills in the directories the unit's daemon uses: the conf files as systemd reads them
/// (`EnvironmentFile=`), and `--instance=%i`; no process environment, which the unit does not see.
fn add_directories(view: &mut InstanceView, config_dir: &Path) {
    let flags = view.name.iter().map(|name| ("INSTANCE_NAME".to_owned(), name.clone())).collect();
    let overrides = Overrides { config_dir: Some(config_dir.to_owned()), flags };
    match Config::load(&overrides, &BTreeMap::<String, String>::new()) {
        Ok(config) => {
            view.watch_dir = Some(config.watch_dir.display().to_string());
            view.output_dir = Some(config.output_dir.display().to_string());
        }
        Err(e) => view.config_error = Some(e.to_string()),
    }
}

/// Instance names that have a `hyper2kvm-NAME.conf` in `config_dir`.
fn configured_instances(config_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(config_dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let name = file.strip_prefix("hyper2kvm-")?.strip_suffix(".conf")?;
            valid_instance(name).then(|| name.to_owned())
        })
        .collect();
    names.sort();
    names
}

/// Whether `name` can be an instance of ours: what `INSTANCE_NAME` accepts, and what a unit
/// name can carry without escaping.
fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

/// `hyper2kvm@NAME.service` for an instance name.
fn unit_name(instance: &str) -> String {
    format!("{UNIT_PREFIX}{instance}{UNIT_SUFFIX}")
}

/// The instance of `hyper2kvm@NAME.service`, unescaped as `%i` is (`\x2d` → `-`); `None` for
/// the template itself and for other units.
pub(crate) fn instance_name(unit: &str) -> Option<String> {
    let escaped = unit.strip_prefix(UNIT_PREFIX)?.strip_suffix(UNIT_SUFFIX)?;
    let name = unescape(escaped);
    valid_instance(&name).then_some(name)
}

/// Undoes systemd's `\xNN` escapes (systemd-escape(1)).
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 2..i + 4).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], bytes.get(i + 1), hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'\\', Some(b'x'), Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `systemctl list-units --all --plain --no-legend`: `UNIT LOAD ACTIVE SUB DESCRIPTION…`
/// per line. A leading status mark (`●`, `*`), which some versions print for failed or
/// not-found units even with `--plain`, is skipped; rows that are not our instances are dropped.
pub(crate) fn parse_list_units(text: &str) -> Vec<UnitRow> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip_while(|w| matches!(*w, "●" | "*" | "○" | "×"));
            let unit = words.next()?;
            instance_name(unit)?;
            Some(UnitRow {
                unit: unit.to_owned(),
                load: words.next()?.to_owned(),
                active: words.next()?.to_owned(),
                sub: words.next()?.to_owned(),
            })
        })
        .collect()
}

/// Parses `systemctl list-unit-files --plain --no-legend`: `UNIT STATE [PRESET]` per line.
/// Returns the instance units (the template `hyper2kvm@.service` is not an instance).
pub(crate) fn parse_list_unit_files(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|unit| instance_name(unit).is_some())
        .map(str::to_owned)
        .collect()
}

/// Parses `systemctl show` of several units: blocks of `KEY=VALUE` lines separated by blank
/// lines, one block per unit.
pub(crate) fn parse_show(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut blocks = Vec::new();
    let mut current = BTreeMap::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                blocks.push(std::mem::take(&mut current));
            }
        } else if let Some((key, value)) = line.split_once('=') {
            current.insert(key.to_owned(), value.to_owned());
        }
    }
    if !current.is_empty() {
        blocks.push(current);
    }
    blocks
}

/// Runs `systemctl ARGS…` and returns its standard output, or `None` when systemctl is
/// missing, exits non-zero, or takes longer than [`SYSTEMCTL_TIMEOUT`] (then it is killed).
fn systemctl(args: &[&str]) -> Option<String> {
    let mut child = Command::new("systemctl")
        .arg("--no-pager")
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Read on a thread so that a chatty systemctl cannot block on a full pipe while we wait.
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let deadline = Instant::now() + SYSTEMCTL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let text = reader.join().ok()?.ok()?;
    status.filter(|s| s.success()).map(|_| text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from systemd 252 (Debian bookworm, `--plain --no-legend`): an instance in its
    /// restart loop, one enabled but stopped, one running. The `●` row is how other versions
    /// mark a not-found unit, and the last row is not an instance: both must be handled.
    const LIST_UNITS: &str = "\
hyper2kvm@bad.service     loaded activating auto-restart hyper2kvm VM import daemon (instance bad)
hyper2kvm@gone.service    loaded inactive   dead         hyper2kvm VM import daemon (instance gone)
hyper2kvm@vsphere.service loaded active     running      hyper2kvm VM import daemon (instance vsphere)
● hyper2kvm@old.service   not-found inactive dead        hyper2kvm@old.service
hyper2kvm.service         loaded inactive   dead         hyper2kvm VM import daemon
";

    /// Captured from systemd 252: enabled instances do not have unit files of their own; a
    /// `systemctl link`ed one does.
    const LIST_UNIT_FILES: &str = "\
hyper2kvm@.service indirect enabled
hyper2kvm@linked.service linked enabled
";

    /// `systemctl show` with our properties, in systemd 252's format (the first three blocks
    /// captured, the start times and the plain unit's blocks added in the same form; the system
    /// test checks the parse against a real systemd): one unit in its restart loop (its last
    /// start time kept), one running since 9 812 345 678 µs after boot, one never started, the
    /// plain unit installed, and the plain unit not installed.
    const SHOW: &str = "\
MainPID=0
ExecMainStartTimestampMonotonic=4061299318
StatusText=
Id=hyper2kvm@bad.service
LoadState=loaded
ActiveState=activating
SubState=auto-restart
UnitFileState=disabled

MainPID=135
ExecMainStartTimestampMonotonic=9812345678
StatusText=0 running, 0 queued, 1 done, 0 failed; last: web01 ok
Id=hyper2kvm@vsphere.service
LoadState=loaded
ActiveState=active
SubState=running
UnitFileState=enabled

MainPID=0
ExecMainStartTimestampMonotonic=0
StatusText=
Id=hyper2kvm@nothere.service
LoadState=loaded
ActiveState=inactive
SubState=dead
UnitFileState=disabled

MainPID=0
ExecMainStartTimestampMonotonic=0
StatusText=
Id=hyper2kvm.service
LoadState=loaded
ActiveState=inactive
SubState=dead
UnitFileState=disabled

MainPID=0
ExecMainStartTimestampMonotonic=0
StatusText=
Id=hyper2kvm.service
LoadState=not-found
ActiveState=inactive
SubState=dead
UnitFileState=
";

    #[test]
    fn list_units_rows_are_parsed_and_foreign_units_dropped() {
        let row = |unit: &str, load: &str, active: &str, sub: &str| UnitRow {
            unit: unit.into(),
            load: load.into(),
            active: active.into(),
            sub: sub.into(),
        };
        assert_eq!(
            parse_list_units(LIST_UNITS),
            vec![
                row("hyper2kvm@bad.service", "loaded", "activating", "auto-restart"),
                row("hyper2kvm@gone.service", "loaded", "inactive", "dead"),
                row("hyper2kvm@vsphere.service", "loaded", "active", "running"),
                row("hyper2kvm@old.service", "not-found", "inactive", "dead"),
            ]
        );
        assert!(parse_list_units("").is_empty());
        assert!(parse_list_units("hyper2kvm@short.service loaded\n").is_empty(), "truncated rows are skipped");
    }

    #[test]
    fn list_unit_files_keeps_instances_not_the_template() {
        assert_eq!(parse_list_unit_files(LIST_UNIT_FILES), vec!["hyper2kvm@linked.service".to_owned()]);
    }

    #[test]
    fn show_blocks_are_split_per_unit() {
        let blocks = parse_show(SHOW);
        assert_eq!(blocks.len(), 5);
        assert_eq!(blocks[0]["Id"], "hyper2kvm@bad.service");
        assert_eq!(blocks[0]["StatusText"], "");
        assert_eq!(blocks[0]["SubState"], "auto-restart");
        assert_eq!(blocks[1]["MainPID"], "135");
        assert_eq!(blocks[1]["StatusText"], "0 running, 0 queued, 1 done, 0 failed; last: web01 ok");
        assert_eq!(blocks[2]["Id"], "hyper2kvm@nothere.service");
    }

    #[test]
    fn views_carry_the_uptime_of_a_running_daemon_and_the_plain_unit_when_installed() {
        let blocks = parse_show(SHOW);
        // 3 h 12 min 9.5 s after the vsphere daemon started.
        let now = Some(9_812_345_678 + 11_529_500_000);
        let view = |i: usize, unit: &str| unit_view(unit, Some(&blocks[i]), None, now);

        let running = view(1, "hyper2kvm@vsphere.service").unwrap();
        assert_eq!(running.name.as_deref(), Some("vsphere"));
        assert_eq!((running.main_pid, running.uptime_seconds), (Some(135), Some(11_529)));
        assert_eq!(human_duration(11_529), "3h 12m");
        // Restarting or stopped: systemd keeps the last start time, but nothing runs.
        assert_eq!(view(0, "hyper2kvm@bad.service").unwrap().uptime_seconds, None);
        assert_eq!(view(2, "hyper2kvm@nothere.service").unwrap().uptime_seconds, None);
        // No clock, no uptime (rather than a wrong one).
        assert_eq!(unit_view("hyper2kvm@vsphere.service", Some(&blocks[1]), None, None).unwrap().uptime_seconds, None);

        let plain = view(3, PLAIN_UNIT).expect("installed: listed");
        assert_eq!((plain.name, plain.active_state.as_str(), plain.sub_state.as_str()), (None, "inactive", "dead"));
        assert_eq!(plain.unit_file_state.as_deref(), Some("disabled"));
        assert!(view(4, PLAIN_UNIT).is_none(), "not installed: not listed");
        assert!(unit_view(PLAIN_UNIT, None, None, now).is_none(), "systemctl show failed: not listed");
        assert!(unit_view("sshd.service", Some(&blocks[1]), None, now).is_none());
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(61), "1m 1s");
        assert_eq!(human_duration(3600), "1h 0m");
        assert_eq!(human_duration(2 * 86_400 + 5 * 3600 + 7), "2d 5h");
        assert_eq!(human_duration(u64::MAX), "213503982334601d 7h", "no overflow");
    }

    #[test]
    fn the_monotonic_clock_is_read() {
        let (a, b) = (monotonic_now_us().unwrap(), monotonic_now_us().unwrap());
        assert!(a > 0 && b >= a, "{a} {b}");
    }

    #[test]
    fn instance_names_are_unescaped_and_checked() {
        assert_eq!(instance_name("hyper2kvm@vsphere.service").as_deref(), Some("vsphere"));
        assert_eq!(instance_name("hyper2kvm@eu\\x2dwest.service").as_deref(), Some("eu-west"));
        assert_eq!(instance_name("hyper2kvm@.service"), None);
        assert_eq!(instance_name("hyper2kvm.service"), None);
        assert_eq!(instance_name("hyper2kvm@a.timer"), None);
        assert_eq!(instance_name("hyper2kvm@\\x2e.service"), None, "a leading dot is not an instance");
        assert_eq!(unescape("a\\x4"), "a\\x4", "a truncated escape stays as it is");
    }

    #[test]
    fn configured_instances_come_from_conf_file_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["hyper2kvm.conf", "hyper2kvm-vsphere.conf", "hyper2kvm-aws.conf", "hyper2kvm-.conf", "other.conf"]
        {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(configured_instances(dir.path()), vec!["aws".to_owned(), "vsphere".to_owned()]);
        assert!(configured_instances(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn directories_follow_the_conf_files_of_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hyper2kvm-nfs.conf"), "WATCH_DIR=/mnt/q\nOUTPUT_DIR=/mnt/out\n").unwrap();
        std::fs::write(dir.path().join("hyper2kvm-bad.conf"), "POLL_INTERVAL=soon\n").unwrap();
        let view = |name: &str| {
            let mut v = InstanceView {
                name: (!name.is_empty()).then(|| name.to_owned()),
                unit: unit_name(name),
                load_state: String::new(),
                active_state: String::new(),
                sub_state: String::new(),
                unit_file_state: None,
                main_pid: None,
                uptime_seconds: None,
                status_text: None,
                watch_dir: None,
                output_dir: None,
                config_error: None,
            };
            add_directories(&mut v, dir.path());
            v
        };
        let nfs = view("nfs");
        assert_eq!(nfs.watch_dir.as_deref(), Some("/mnt/q"));
        assert_eq!(nfs.output_dir.as_deref(), Some("/mnt/out"));
        let plain = view("vsphere");
        assert_eq!(plain.watch_dir.as_deref(), Some("/var/lib/hyper2kvm/vsphere/queue"));
        assert_eq!(plain.output_dir.as_deref(), Some("/var/lib/hyper2kvm/vsphere/output"));
        // hyper2kvm.service reads hyper2kvm.conf only, and has no instance directory.
        std::fs::write(dir.path().join("hyper2kvm-.conf"), "WATCH_DIR=/not/read\n").unwrap();
        let single = view("");
        assert_eq!(single.watch_dir.as_deref(), Some("/var/lib/hyper2kvm/queue"));
        assert_eq!(single.output_dir.as_deref(), Some("/var/lib/hyper2kvm/output"));
        let bad = view("bad");
        assert!(bad.config_error.as_deref().is_some_and(|e| e.contains("POLL_INTERVAL")), "{bad:?}");
    }

    #[test]
    fn without_systemd_there_are_no_instances_and_no_error() {
        // This host (and CI) does not run systemd as PID 1: systemctl fails, or is missing.
        if Path::new("/run/systemd/system").exists() {
            return;
        }
        assert!(instances(Path::new("/nonexistent")).is_empty());
        assert_eq!(systemctl(&["list-units"]), None);
    }
}
