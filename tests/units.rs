//! The unit lines HyperSDK's deployment and docs/OPERATIONS.md rely on: where the
//! configuration comes from and in which order, the daemon's command line, the notify
//! protocol, restarts, the watchdog, and the target that groups the daemons. An edit that
//! drops one of them passes every other test but breaks hosts.

use std::path::PathBuf;

/// `(section, key, value)` in file order; repeated keys stay repeated, as systemd reads them.
fn unit(name: &str) -> Vec<(String, String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "{name}: continuation lines would defeat these checks: {line}");
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{name}: not key=value: {line}"));
        entries.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
    }
    entries
}

fn values<'a>(entries: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    entries.iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.as_str()).collect()
}

/// The one value of `key`, failing when it is missing or given twice.
#[track_caller]
fn value<'a>(name: &str, entries: &'a [(String, String, String)], section: &str, key: &str) -> &'a str {
    match values(entries, section, key).as_slice() {
        [v] => v,
        other => panic!("{name}: [{section}] {key}= should be set once, found {other:?}"),
    }
}

/// What both daemon units must have for systemd to run the daemon as designed.
#[track_caller]
fn assert_daemon_unit(name: &str, entries: &[(String, String, String)]) {
    assert_eq!(value(name, entries, "Service", "Type"), "notify", "{name}: READY=1 is what ends the start");
    // The daemon itself sends the notifications; qemu-img children must not.
    assert_eq!(value(name, entries, "Service", "NotifyAccess"), "main", "{name}");
    assert_eq!(value(name, entries, "Service", "Restart"), "on-failure", "{name}");
    let watchdog = value(name, entries, "Service", "WatchdogSec");
    let seconds: u64 =
        watchdog.parse().unwrap_or_else(|e| panic!("{name}: WatchdogSec={watchdog} is not plain seconds: {e}"));
    assert!(seconds > 0, "{name}: WatchdogSec=0 turns the watchdog off");
    assert_eq!(value(name, entries, "Unit", "PartOf"), "hyper2kvm.target", "{name}: stop/restart of the target");
    assert_eq!(value(name, entries, "Install", "WantedBy"), "hyper2kvm.target", "{name}: enable hooks into it");
    assert_eq!(value(name, entries, "Install", "Also"), "hyper2kvm.target", "{name}: enable enables the target too");
    assert_resource_limits(name, entries);
}

/// `MemoryHigh=1G` and the like, in bytes.
fn bytes(name: &str, size: &str) -> u64 {
    let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len()));
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        other => panic!("{name}: a size in plain K, M or G, not {size} ({other})"),
    };
    digits.parse::<u64>().unwrap_or_else(|e| panic!("{name}: {size}: {e}")) << shift
}

/// The limits are sized from measured figures (docs/OPERATIONS.md, "Resource limits"): an
/// edit that loses one, or shrinks it below what the default configuration needs, is caught.
#[track_caller]
fn assert_resource_limits(name: &str, entries: &[(String, String, String)]) {
    const MIB: u64 = 1 << 20;
    let high = bytes(name, value(name, entries, "Service", "MemoryHigh"));
    let max = bytes(name, value(name, entries, "Service", "MemoryMax"));
    // Two jobs at the 80 MiB measured on 2 CPUs, at 40 MiB + 16 MiB per CPU on 16.
    assert!(high >= 2 * (40 + 16 * 16) * MIB, "{name}: MemoryHigh={high} is below two jobs on 16 CPUs");
    assert!(max > high, "{name}: MemoryMax must leave room to throttle before it kills");
    for key in ["CPUWeight", "IOWeight"] {
        let weight: u32 = value(name, entries, "Service", key).parse().unwrap();
        assert!((1..100).contains(&weight), "{name}: {key}={weight}: conversions yield to default services");
    }
    let tasks: u32 = value(name, entries, "Service", "TasksMax").parse().unwrap();
    assert!(tasks >= 512, "{name}: TasksMax={tasks}");
    // Every extent of a VMDK stays open while it converts: two jobs of the largest the reader takes.
    let files: usize = value(name, entries, "Service", "LimitNOFILE").parse().unwrap();
    let extents = hyper2kvm::internals::image::vmdk::Limits::default().max_extents;
    assert!(files >= 2 * extents + 1024, "{name}: LimitNOFILE={files} is below two jobs of {extents} extents");
}

#[test]
fn the_instance_unit_reads_the_shared_conf_then_its_own_and_passes_them_on() {
    let name = "hyper2kvm@.service";
    let entries = unit(name);
    // Later files win: the instance's conf must come after the shared one.
    assert_eq!(
        values(&entries, "Service", "EnvironmentFile"),
        ["-/etc/hyper2kvm/hyper2kvm.conf", "-/etc/hyper2kvm/hyper2kvm-%i.conf"],
        "{name}"
    );
    let exec = value(name, &entries, "Service", "ExecStart");
    assert!(exec.starts_with("/usr/bin/hyper2kvm "), "{name}: the packages install the binary there: {exec}");
    // The same arguments, expanded empty, are run by tests/cli_config.rs.
    assert!(
        exec.contains(
            "daemon --instance=%i --watch-dir=${WATCH_DIR} --output-dir=${OUTPUT_DIR} --log-level=${LOG_LEVEL}"
        ),
        "{name}: {exec}"
    );
    assert_daemon_unit(name, &entries);
}

#[test]
fn the_single_unit_reads_the_shared_conf_only_and_has_no_instance() {
    let name = "hyper2kvm.service";
    let entries = unit(name);
    assert_eq!(values(&entries, "Service", "EnvironmentFile"), ["-/etc/hyper2kvm/hyper2kvm.conf"], "{name}");
    let exec = value(name, &entries, "Service", "ExecStart");
    assert!(exec.starts_with("/usr/bin/hyper2kvm "), "{name}: {exec}");
    assert!(
        exec.contains("daemon --watch-dir=${WATCH_DIR} --output-dir=${OUTPUT_DIR} --log-level=${LOG_LEVEL}"),
        "{name}: {exec}"
    );
    assert!(!exec.contains("--instance"), "{name}: {exec}");
    assert_daemon_unit(name, &entries);
}

/// Guest fixing runs libguestfs' appliance (supermin, then qemu under TCG where KVM is not
/// usable) inside the daemon's sandbox; the system test launches it under the installed unit.
/// Each unit carries the few relaxations it needs (docs/OPERATIONS.md, "Guest fixing"), and
/// the rest of the hardening is not loosened with them.
#[test]
fn the_units_let_libguestfs_run_and_keep_the_rest_of_the_sandbox() {
    for name in ["hyper2kvm@.service", "hyper2kvm.service"] {
        let entries = unit(name);
        let service = |key| value(name, &entries, "Service", key);
        assert_eq!(service("MemoryDenyWriteExecute"), "no", "{name}: TCG writes the code it runs");
        assert_eq!(service("ProtectKernelModules"), "no", "{name}: supermin copies /usr/lib/modules");
        assert_eq!(service("BindPaths"), "-/dev/kvm", "{name}: KVM into the private /dev, where present");
        assert_eq!(service("DeviceAllow"), "/dev/kvm rw", "{name}: and through the device policy");
        assert_eq!(service("CacheDirectory"), "hyper2kvm", "{name}: the appliance's cache survives restarts");
        let environment = values(&entries, "Service", "Environment").join(" ");
        for variable in ["LIBGUESTFS_CACHEDIR=%C/hyper2kvm", "TMPDIR=/var/tmp"] {
            assert!(environment.split_whitespace().any(|v| v == variable), "{name}: {variable} in {environment}");
        }
        for (key, kept) in [
            ("PrivateDevices", "yes"),
            ("PrivateTmp", "yes"),
            ("NoNewPrivileges", "yes"),
            ("CapabilityBoundingSet", ""),
            ("ProtectSystem", "strict"),
            ("ProtectKernelTunables", "yes"),
            ("RestrictNamespaces", "yes"),
            ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
            ("LockPersonality", "yes"),
        ] {
            assert_eq!(service(key), kept, "{name}: {key}= is not needed off for guest fixing");
        }
        assert_eq!(values(&entries, "Service", "SystemCallFilter"), ["@system-service", "~@privileged"], "{name}");
    }
}

/// The target only starts what is enabled into it; it must itself be wanted at boot.
#[test]
fn the_target_is_started_at_boot() {
    let name = "hyper2kvm.target";
    let entries = unit(name);
    assert_eq!(value(name, &entries, "Install", "WantedBy"), "multi-user.target", "{name}");
    // Wants= on instances here would start them without `systemctl enable`, against the docs.
    assert!(values(&entries, "Unit", "Wants").is_empty(), "{name}");
    assert!(values(&entries, "Unit", "Requires").is_empty(), "{name}");
}

/// docs/CONFIG.md is where the units' users are sent for the keys (OPERATIONS.md, README.md):
/// its table must name every key the daemon reads, and the shipped conf file list each one.
#[test]
fn every_key_is_documented_in_config_md_and_the_shipped_conf() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config_md = std::fs::read_to_string(root.join("docs/CONFIG.md")).unwrap();
    let conf = std::fs::read_to_string(root.join("conf.d/hyper2kvm.conf")).unwrap();
    let rows: Vec<&str> = config_md.lines().filter_map(|l| l.strip_prefix("| ")?.split(" |").next()).collect();
    for key in hyper2kvm::config::KNOWN_KEYS {
        assert!(rows.contains(key), "docs/CONFIG.md has no table row for {key}");
        assert!(conf.lines().any(|l| l.starts_with(&format!("#{key}="))), "conf.d/hyper2kvm.conf does not list {key}");
    }
}
