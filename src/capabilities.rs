//! `hyper2kvm capabilities`: what this host can do, for operators and for HyperSDK's checks,
//! and whether this worker can do its job at all — the readiness probe of a Kubernetes
//! worker (`capabilities --json-output` exits 1 with the reasons when it cannot).
//!
//! What makes a worker not ready ([`Capabilities::problems`]): WATCH_DIR missing or not
//! writable, TEMP_DIR or OUTPUT_DIR not writable or with less free space than the threshold,
//! libvirt unreachable while LIBVIRT_INTEGRATION is on. What only limits it
//! ([`Capabilities::warnings`]): no qemu-img (vhd, vhdx, vdi and qcow2 sources fail), no guest
//! tools (guests cannot be fixed or boot-checked: [`guest`]).

pub mod guest;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde::Serialize;

use crate::config::Config;
use crate::libvirt;

/// The free space TEMP_DIR and OUTPUT_DIR need by default for a worker to be ready, in MiB.
pub const DEFAULT_MIN_FREE_MIB: u64 = 1024;

/// What was found on this host.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    /// This build's version (`CARGO_PKG_VERSION`).
    pub version: &'static str,
    /// Whether this worker can do its job: `problems` is empty.
    pub ready: bool,
    /// Why it cannot (each a sentence saying what to fix).
    pub problems: Vec<String>,
    /// What it cannot do, although it can work.
    pub warnings: Vec<String>,
    /// `host`, `container` or `privileged_container`.
    pub execution_mode: &'static str,
    /// How the container was recognised (`podman`, `docker`, `kubernetes`, a `container`
    /// variable's value, `cgroup`), in a container.
    pub container: Option<String>,
    /// `qemu-img --version`'s first line, when it runs.
    pub qemu_img: Option<String>,
    /// Source disk formats jobs accept here: vhd, vhdx, vdi and qcow2 only when qemu-img runs.
    pub input_formats: Vec<&'static str>,
    /// Formats the converted disks are written in.
    pub output_formats: Vec<&'static str>,
    /// Compressions of qcow2 clusters this build can write.
    pub compression: Vec<&'static str>,
    /// This build can register domains with libvirt (LIBVIRT_INTEGRATION).
    pub libvirt_registration: bool,
    /// LIBVIRT_INTEGRATION as configured: jobs register their domain.
    pub libvirt_integration: bool,
    /// LIBVIRT_URI as configured.
    pub libvirt_uri: String,
    /// A connection to LIBVIRT_URI could be opened just now.
    pub libvirt_reachable: bool,
    /// libvirt's version at LIBVIRT_URI, when reachable.
    pub libvirt_version: Option<String>,
    /// Why LIBVIRT_URI is not reachable, when it is not.
    pub libvirt_error: Option<String>,
    /// UEFI firmware descriptors for libvirt's auto-selection were found.
    pub uefi_firmware: bool,
    /// `/dev/kvm`, as this process can use it.
    pub kvm: Kvm,
    /// The nbd kernel module is loaded (`/sys/module/nbd`) or an `/dev/nbd*` device exists.
    pub nbd: bool,
    /// Loop devices can be set up (`/dev/loop-control` exists).
    pub loop_devices: bool,
    /// This process may mount filesystems (CAP_SYS_ADMIN in its effective set).
    pub mount: bool,
    /// WATCH_DIR, OUTPUT_DIR and TEMP_DIR as found.
    pub directories: Vec<Directory>,
    /// The host's memory (`/proc/meminfo`) and the container's limit.
    pub memory: Memory,
    /// Whether guests can be inspected, fixed and boot-checked here, and on what.
    pub guest: guest::GuestSupport,
}

/// `/dev/kvm`, as this process can use it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Kvm {
    /// The device exists.
    pub present: bool,
    /// It opened for reading and writing, and answered KVM_GET_API_VERSION.
    pub usable: bool,
    /// KVM's API version (12 on every Linux since 2.6.22).
    pub api_version: Option<i32>,
    /// Why it is not usable, when present.
    pub error: Option<String>,
}

/// One of the directories a worker writes.
#[derive(Debug, Clone, Serialize)]
pub struct Directory {
    /// The configuration key.
    pub key: &'static str,
    /// The configured path.
    pub path: PathBuf,
    /// It exists and is a directory.
    pub exists: bool,
    /// A file could be created in it (in its nearest existing parent when it does not exist
    /// yet and the daemon would create it).
    pub writable: bool,
    /// Free bytes for this user on its filesystem.
    pub free_bytes: Option<u64>,
    /// Why it is not writable.
    pub error: Option<String>,
}

/// Memory of the host, and the container's limit (cgroup v2 `memory.max`) when there is one.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// `MemTotal` of `/proc/meminfo`, in bytes.
    pub total_bytes: Option<u64>,
    /// `MemAvailable` of `/proc/meminfo`, in bytes.
    pub available_bytes: Option<u64>,
    /// cgroup v2 `memory.max` in bytes; `None` outside a cgroup limit (`max`) or without cgroup v2.
    pub limit_bytes: Option<u64>,
}

/// Probes the host, and libvirt at the configured LIBVIRT_URI, with the default free-space
/// threshold.
pub fn probe(config: &Config) -> Capabilities {
    probe_with(config, DEFAULT_MIN_FREE_MIB << 20)
}

/// Probes the host; TEMP_DIR and OUTPUT_DIR need `min_free_bytes` free for the worker to be
/// ready.
pub fn probe_with(config: &Config, min_free_bytes: u64) -> Capabilities {
    let qemu_img = Command::new("qemu-img")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned));
    let libvirt = libvirt::probe(&config.libvirt_uri);
    let container = detect_container();
    let mount = has_cap_sys_admin();
    let execution_mode = match (&container, mount) {
        (None, _) => "host",
        (Some(_), false) => "container",
        (Some(_), true) => "privileged_container",
    };
    let directories = vec![
        directory("WATCH_DIR", &config.watch_dir, false),
        directory("OUTPUT_DIR", &config.output_dir, true),
        directory("TEMP_DIR", &config.temp_dir, true),
    ];
    let mut caps = Capabilities {
        version: env!("CARGO_PKG_VERSION"),
        ready: false,
        problems: Vec::new(),
        warnings: Vec::new(),
        execution_mode,
        container,
        input_formats: if qemu_img.is_some() {
            vec!["vmdk", "ova", "raw", "qcow2", "vhd", "vhdx", "vdi"]
        } else {
            vec!["vmdk", "ova", "raw"]
        },
        qemu_img,
        output_formats: vec!["qcow2"],
        compression: vec!["zlib", "zstd"],
        libvirt_registration: true,
        libvirt_integration: config.libvirt_integration,
        libvirt_uri: config.libvirt_uri.clone(),
        libvirt_reachable: libvirt.is_ok(),
        libvirt_version: libvirt.as_ref().ok().cloned(),
        libvirt_error: libvirt.err().map(|e| e.with_libvirt_message()),
        uefi_firmware: Path::new("/usr/share/qemu/firmware").is_dir() || Path::new("/usr/share/OVMF").is_dir(),
        kvm: probe_kvm(Path::new("/dev/kvm")),
        nbd: Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists(),
        loop_devices: Path::new("/dev/loop-control").exists(),
        mount,
        directories,
        memory: memory(),
        guest: guest::probe(&crate::guest::Tools::for_config(config)),
    };
    judge(&mut caps, min_free_bytes);
    caps
}

/// Fills `problems`, `warnings` and `ready`.
fn judge(caps: &mut Capabilities, min_free_bytes: u64) {
    let mut problems = Vec::new();
    for dir in &caps.directories {
        let path = dir.path.display();
        let key = dir.key;
        if key == "WATCH_DIR" && !dir.exists {
            problems.push(format!("WATCH_DIR {path} does not exist; mount the queue volume or create it"));
        } else if !dir.writable {
            let why = dir.error.as_deref().unwrap_or("not writable");
            problems.push(format!("{key} {path} is not writable ({why}); fix the mount or its permissions"));
        } else if key != "WATCH_DIR" && dir.free_bytes.is_some_and(|free| free < min_free_bytes) {
            problems.push(format!(
                "{key} {path} has {} MiB free, below the {} MiB this worker needs; free space or give it a larger volume",
                dir.free_bytes.unwrap_or(0) >> 20,
                min_free_bytes >> 20
            ));
        }
    }
    if caps.libvirt_integration && !caps.libvirt_reachable {
        problems.push(format!(
            "LIBVIRT_INTEGRATION is on but libvirt at {} is not reachable; start libvirtd or fix LIBVIRT_URI",
            caps.libvirt_uri
        ));
    }
    if caps.qemu_img.is_none() {
        caps.warnings
            .push("qemu-img is not installed: vhd, vhdx, vdi and qcow2 sources will fail (install qemu-utils)".into());
    }
    caps.warnings.extend(guest::warnings(&caps.guest));
    caps.ready = problems.is_empty();
    caps.problems = problems;
}

/// How the process is contained, if it is: the marker files podman and docker leave, the
/// `container` variable (systemd-nspawn, podman, LXC), Kubernetes' service variables, or a
/// container runtime's name in the cgroup path.
fn detect_container() -> Option<String> {
    if Path::new("/run/.containerenv").exists() {
        return Some("podman".into());
    }
    if Path::new("/.dockerenv").exists() {
        return Some("docker".into());
    }
    if let Some(value) = std::env::var("container").ok().filter(|v| !v.is_empty()) {
        return Some(value);
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Some("kubernetes".into());
    }
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    ["kubepods", "docker", "containerd", "libpod", "lxc", "crio"]
        .iter()
        .find(|runtime| cgroup.contains(*runtime))
        .map(|runtime| format!("cgroup ({runtime})"))
}

/// CAP_SYS_ADMIN (bit 21) in this process's effective capabilities: what mounting, loop and
/// nbd setup need, and what a privileged container has.
fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Opens the KVM device for reading and writing and asks its API version.
fn probe_kvm(device: &Path) -> Kvm {
    /// `_IO(KVMIO, 0x00)`.
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    if !device.exists() {
        return Kvm::default();
    }
    let file = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(device) {
        Ok(file) => file,
        Err(e) => return Kvm { present: true, error: Some(e.to_string()), ..Kvm::default() },
    };
    // SAFETY: an ioctl without argument on a descriptor owned by `file`.
    let version = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), KVM_GET_API_VERSION as _) };
    if version < 0 {
        let error = std::io::Error::last_os_error().to_string();
        return Kvm { present: true, error: Some(format!("KVM_GET_API_VERSION: {error}")), ..Kvm::default() };
    }
    Kvm { present: true, usable: true, api_version: Some(version), error: None }
}

/// Checks a directory: whether it exists, a file can be created in it (in its nearest
/// existing parent when `may_create` and it does not exist), and its free space.
fn directory(key: &'static str, path: &Path, may_create: bool) -> Directory {
    let exists = path.is_dir();
    let probe_dir = if exists || !may_create { Some(path.to_owned()) } else { nearest_existing(path) };
    let (writable, error) = match &probe_dir {
        Some(dir) if dir.is_dir() => match try_write(dir) {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        },
        Some(dir) if dir.exists() => (false, Some("it is not a directory".to_owned())),
        _ => (false, Some("it does not exist".to_owned())),
    };
    let free_bytes = probe_dir.as_deref().and_then(free_space);
    Directory { key, path: path.to_owned(), exists, writable, free_bytes, error }
}

fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors().skip(1).find(|p| p.exists()).map(Path::to_owned)
}

/// Creates and removes a hidden file (the queue's scanner ignores hidden names): the only
/// test of writability that a read-only mount, root squashing and ACLs all answer truly.
fn try_write(dir: &Path) -> std::io::Result<()> {
    let name = format!(".hyper2kvm-probe-{}-{}", std::process::id(), crate::host::random_hex());
    let path = dir.join(name);
    OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&path)?;
    std::fs::remove_file(&path)
}

fn free_space(path: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
}

fn memory() -> Memory {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|t| t.trim().parse().ok());
    Memory { total_bytes: field("MemTotal:"), available_bytes: field("MemAvailable:"), limit_bytes: limit }
}

/// The labels of `hyper2kvm_worker_capability_info`: a few yes/no facts, no paths.
pub fn metric_labels(c: &Capabilities) -> Vec<(String, String)> {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    vec![
        ("execution_mode".into(), c.execution_mode.to_owned()),
        ("qemu_img".into(), yes_no(c.qemu_img.is_some())),
        ("kvm".into(), yes_no(c.kvm.usable)),
        ("libvirt".into(), yes_no(c.libvirt_reachable)),
        ("nbd".into(), yes_no(c.nbd)),
        ("loop".into(), yes_no(c.loop_devices)),
        ("mount".into(), yes_no(c.mount)),
        ("ready".into(), yes_no(c.ready)),
    ]
}

/// Probes on a thread of its own (libvirt and qemu-img may take a moment) and sets
/// `hyper2kvm_worker_capability_info` when done.
pub fn publish_metric(config: Arc<Config>, metrics: Arc<crate::metrics::Metrics>) {
    let spawned = std::thread::Builder::new().name("capabilities".into()).spawn(move || {
        metrics.set_capabilities(metric_labels(&probe(&config)));
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not probe the capabilities for the metrics");
    }
}

/// Why `hyper2kvm capabilities` exits 1.
#[derive(Debug, thiserror::Error)]
pub enum CapabilitiesError {
    /// The first of the [`Capabilities::problems`], and how many more there are.
    #[error("this worker is not ready: {first}{}", more(*.count))]
    NotReady {
        /// The first problem, a sentence saying what to fix.
        first: String,
        /// How many problems there are in all.
        count: usize,
    },
    /// The capabilities could not be serialised as JSON for `--json-output`.
    #[error("cannot print the capabilities: {0}")]
    Print(#[from] serde_json::Error),
}

/// ` (and N more)` after the first of `count` problems.
fn more(count: usize) -> String {
    if count > 1 {
        format!(" (and {} more)", count - 1)
    } else {
        String::new()
    }
}

/// `hyper2kvm capabilities`: [`probe_with`] `min_free_mib`, printed as JSON or as [`render`]'s
/// lines; an error (exit status 1, the readiness probe's answer) when the worker is not ready.
pub fn command(config: &Config, min_free_mib: u64, json: bool) -> Result<(), CapabilitiesError> {
    let caps = probe_with(config, min_free_mib.saturating_mul(1 << 20));
    if json {
        println!("{}", serde_json::to_string_pretty(&caps)?);
    } else {
        print!("{}", render(&caps));
    }
    match caps.problems.first() {
        None => Ok(()),
        Some(first) => Err(CapabilitiesError::NotReady { first: first.clone(), count: caps.problems.len() }),
    }
}

/// A readable listing.
pub fn render(c: &Capabilities) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut text = format!(
        "hyper2kvm {}\nready: {}\nexecution mode: {}{}\nqemu-img: {}\ninput formats: {}\noutput formats: {}\ncompression: {}\nlibvirt registration: {} (LIBVIRT_INTEGRATION={})\nlibvirt: {}\nUEFI firmware: {}\nKVM: {}\nnbd: {}, loop devices: {}, mount: {}\n",
        c.version,
        yes_no(c.ready),
        c.execution_mode,
        c.container.as_deref().map(|how| format!(" ({how})")).unwrap_or_default(),
        c.qemu_img.as_deref().unwrap_or("not found (install qemu-utils)"),
        c.input_formats.join(", "),
        c.output_formats.join(", "),
        c.compression.join(", "),
        yes_no(c.libvirt_registration),
        c.libvirt_integration,
        libvirt_line(c),
        yes_no(c.uefi_firmware),
        kvm_line(&c.kvm),
        yes_no(c.nbd),
        yes_no(c.loop_devices),
        yes_no(c.mount),
    );
    for dir in &c.directories {
        let free = dir.free_bytes.map(|f| format!(", {} MiB free", f >> 20)).unwrap_or_default();
        let state = if dir.writable { "writable" } else { "NOT writable" };
        text.push_str(&format!("{}: {} ({state}{free})\n", dir.key, dir.path.display()));
    }
    if let Some(total) = c.memory.total_bytes {
        let available = c.memory.available_bytes.map(|a| format!(", {} MiB available", a >> 20)).unwrap_or_default();
        let limit = c.memory.limit_bytes.map(|l| format!(", limited to {} MiB", l >> 20)).unwrap_or_default();
        text.push_str(&format!("memory: {} MiB{available}{limit}\n", total >> 20));
    }
    text.push_str(&guest::render(&c.guest));
    for line in
        c.problems.iter().map(|p| format!("problem: {p}\n")).chain(c.warnings.iter().map(|w| format!("warning: {w}\n")))
    {
        text.push_str(&line);
    }
    text
}

fn kvm_line(kvm: &Kvm) -> String {
    match (kvm.present, kvm.api_version, &kvm.error) {
        (false, ..) => "no /dev/kvm".to_owned(),
        (true, Some(version), _) => format!("usable (API version {version})"),
        (true, None, error) => format!("present but not usable ({})", error.as_deref().unwrap_or("unknown")),
    }
}

fn libvirt_line(c: &Capabilities) -> String {
    match (&c.libvirt_version, &c.libvirt_error) {
        (Some(version), _) => format!("reachable at {} (libvirt {version})", c.libvirt_uri),
        (None, Some(error)) => error.clone(),
        (None, None) => format!("not reachable at {}", c.libvirt_uri),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Overrides;

    fn config_with_uri(uri: &str) -> Config {
        config_with(&[("LIBVIRT_URI", uri)])
    }

    fn config_with(flags: &[(&str, &str)]) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let overrides = Overrides {
            config_dir: Some(dir.path().to_owned()),
            flags: flags.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        };
        Config::load(&overrides, &BTreeMap::<String, String>::new()).unwrap()
    }

    #[test]
    fn guest_tools_are_looked_for_behind_the_configured_wrapper() {
        let wrapper = "/nonexistent/guest-tools-run.sh /nonexistent/root --";
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().to_str().unwrap();
        let output = dir.path().join("out");
        let config = config_with(&[
            ("LIBVIRT_URI", "test:///default"),
            ("WATCH_DIR", queue),
            ("OUTPUT_DIR", output.to_str().unwrap()),
            ("GUEST_TOOLS_WRAPPER", wrapper),
        ]);
        let caps = probe_with(&config, 0);
        assert_eq!(caps.guest.tools_wrapper.as_deref(), Some(wrapper), "{:?}", caps.guest);
        assert!(!caps.guest.fix && !caps.guest.boot_check, "{:?}", caps.guest);
        // Missing guest tools limit the worker; they do not make it unready.
        assert!(caps.problems.is_empty(), "{:?}", caps.problems);
        assert!(
            caps.warnings
                .iter()
                .any(|w| w.starts_with("guests cannot be inspected or fixed here (pipeline.fix fails): ")),
            "{:?}",
            caps.warnings
        );
        let text = render(&caps);
        assert!(text.contains(&format!("guest tools: (through GUEST_TOOLS_WRAPPER={wrapper})\n")), "{text}");
        assert!(text.contains("\n  guest fixing: no: virt-inspector is not installed"), "{text}");
        let json = serde_json::to_value(&caps).unwrap();
        for key in ["tools_wrapper", "tools", "inspect", "fix", "boot_check", "accel", "ovmf"] {
            assert!(json["guest"].get(key).is_some(), "guest.{key} in {json}");
        }
        assert_eq!(json["guest"]["tools"][0]["tool"], "virt-inspector", "{json}");
    }

    #[test]
    fn kvm_is_usable_only_when_it_answers_its_api_version() {
        let missing = probe_kvm(Path::new("/nonexistent/kvm"));
        assert!(!missing.present && !missing.usable);
        // A device that opens read-write but is not KVM.
        let null = probe_kvm(Path::new("/dev/null"));
        assert!(null.present && !null.usable && null.api_version.is_none(), "{null:?}");
        assert!(null.error.as_deref().is_some_and(|e| e.starts_with("KVM_GET_API_VERSION: ")), "{null:?}");
    }

    #[test]
    fn directories_are_judged_by_writing_in_them() {
        let dir = tempfile::tempdir().unwrap();
        let watch = directory("WATCH_DIR", dir.path(), false);
        assert!(watch.exists && watch.writable && watch.free_bytes.is_some_and(|f| f > 0), "{watch:?}");
        let missing = directory("WATCH_DIR", &dir.path().join("q"), false);
        assert!(!missing.exists && !missing.writable, "{missing:?}");
        // OUTPUT_DIR and TEMP_DIR are created by the daemon: their parent counts.
        let temp = directory("TEMP_DIR", &dir.path().join("out/.hyper2kvm-tmp"), true);
        assert!(!temp.exists && temp.writable, "{temp:?}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let not_dir = directory("WATCH_DIR", &file, false);
        assert_eq!(not_dir.error.as_deref(), Some("it is not a directory"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the probes left files behind");
    }

    #[test]
    fn libvirt_reachability_is_probed_at_the_configured_uri() {
        let caps = probe(&config_with_uri("test:///default"));
        assert!(caps.libvirt_registration);
        assert!(caps.libvirt_reachable, "{caps:?}");
        assert!(caps.libvirt_version.is_some() && caps.libvirt_error.is_none(), "{caps:?}");
        assert!(render(&caps).contains("libvirt: reachable at test:///default (libvirt "), "{}", render(&caps));

        let uri = "qemu+unix:///system?socket=/nonexistent/sock";
        let caps = probe(&config_with_uri(uri));
        assert!(!caps.libvirt_reachable);
        let error = caps.libvirt_error.as_deref().unwrap_or_default();
        assert!(error.starts_with(&format!("libvirt at {uri} is not reachable: is libvirtd running? (")), "{error}");
        let json = serde_json::to_value(&caps).unwrap();
        for key in ["libvirt_registration", "libvirt_integration", "libvirt_uri", "libvirt_reachable", "uefi_firmware"]
        {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
    }
}
