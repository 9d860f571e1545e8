//! The guest stage through the real daemon (issue 12): a manifest asking for
//! `pipeline.inspect` and `pipeline.fix`, and BOOT_CHECK.
//!
//! The error paths run anywhere, with GUEST_TOOLS_WRAPPER a script standing in for the tools
//! (a tool that fails, one that hangs past CONVERSION_TIMEOUT, one that is still running when
//! the job's lease is taken over) or with none at all (the host has no libguestfs). Each
//! publishes only the `.error` (or, for the lost lease, nothing), and the same daemon then
//! converts a good manifest.
//!
//! The real guest (tests/common/guest.rs: Debian 12 set up as a VMware guest, in an OVA, and
//! the tools from a Debian 12 root) needs root, debootstrap and the Debian mirror, and skips
//! without them. Under software emulation it costs minutes: docs/PERFORMANCE.md.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fixtures::*;
use common::guest::machine;
use common::*;
use serde_json::{json, Value};

/// A small VM whose disk holds no guest, asking for inspect and fix.
fn fix_manifest(s: &Session, vm: &str) -> Value {
    let dir = s.env.exports.join(vm);
    let raw = small_raw(&dir.join("disk.raw"));
    let vmdk = raw_to_vmdk(&raw, &dir.join("disk-0.vmdk"), "monolithicSparse");
    asking_for_fix(manifest(vm, vec![disk("disk-0", "vmdk", &vmdk)]), true)
}

fn asking_for_fix(mut m: Value, fix: bool) -> Value {
    m["pipeline"]["inspect"] = json!({ "enabled": true, "collect_guest_info": true });
    m["pipeline"]["fix"] = json!({
        "enabled": fix, "backup": false, "update_grub": true, "regen_initramfs": true,
        "fstab_mode": "stabilize-all", "remove_vmware_tools": true
    });
    m
}

/// A script standing in for every guest tool (GUEST_TOOLS_WRAPPER runs it with the tool's
/// name and arguments). Returns its path.
fn fake_tools(env: &Env, body: &str) -> String {
    let path = env.root.join("fake-guest-tools.sh");
    // The daemon's start-up probe (capabilities: `TOOL --help`, a short qemu for KVM, a look
    // for OVMF) is not a step of a job: answered at once, so that only the job's calls to the
    // libguestfs tools run `body`.
    let probes = "case \"$*\" in *--help) exit 0;; esac\n\
                  case \"$1\" in virt-inspector|guestfish|virt-v2v-in-place) ;; *) exit 1;; esac";
    fs::write(&path, format!("#!/bin/sh\n{probes}\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

/// Whether process `pid` is alive (a zombie is not).
fn alive(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with(['Z', 'X']))
}

fn read_pid(path: &Path) -> i32 {
    fs::read_to_string(path).unwrap_or_default().trim().parse().unwrap_or_else(|_| panic!("no pid in {path:?}"))
}

/// The daemon needs a PATH without libguestfs for "not installed": this host has none.
fn host_has(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

#[test]
fn guest_tools_missing_fails_the_job_saying_what_to_install() {
    if host_has("virt-inspector") {
        eprintln!("\n*** SKIPPED: this host has virt-inspector on PATH ***\n");
        return;
    }
    let mut s = Session::start(&[], &[]);
    let m = fix_manifest(&s, "no-tools-vm");
    let first = s.convert_err(&m, "no-tools-vm");
    assert!(
        first.starts_with(
            "virt-inspector is not installed: install libguestfs-tools (Debian 12), or set GUEST_TOOLS_WRAPPER"
        ),
        "{first}"
    );
    let text = fs::read_to_string(s.env.output.join("no-tools-vm.error")).unwrap();
    assert!(text.contains("\nstage: guest\n"), "{text}");
    let good = s.good_manifest("good-vm");
    s.convert_ok(&good);
    s.finish();
}

#[test]
fn a_failing_guest_tool_fails_the_job_and_its_log_is_kept() {
    let env = Env::new();
    let tools = fake_tools(&env, "echo \"$1: error: libguestfs error: could not create appliance\" >&2\nexit 3");
    let mut s = Session::start_in(env, &[("GUEST_TOOLS_WRAPPER", &tools)], &[]);
    let m = fix_manifest(&s, "failing-tool-vm");
    let first = s.convert_err(&m, "failing-tool-vm");
    assert!(first.starts_with("virt-inspector failed (exit status 3); its log is "), "{first}");
    // The log named is the copy kept beside the job's record, not the staging directory's.
    let log = first.split("its log is ").nth(1).and_then(|r| r.split("; last lines").next()).unwrap();
    assert!(log.contains("/.hyper2kvm/failed/") && log.ends_with("/inspect/virt-inspector.log"), "{first}");
    let kept = fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}"));
    assert!(kept.contains("could not create appliance"), "{kept}");
    let text = fs::read_to_string(s.env.output.join("failing-tool-vm.error")).unwrap();
    assert!(text.contains("cause: virt-inspector: error: libguestfs error: could not create appliance"), "{text}");
    assert!(text.contains("\nstage: guest\n"), "{text}");
    let good = s.good_manifest("good-vm");
    s.convert_ok(&good);
    s.finish();
}

#[test]
fn a_guest_tool_past_conversion_timeout_is_stopped_with_its_children() {
    let env = Env::new();
    let pid = env.root.join("tool.pid");
    let tools = fake_tools(&env, &format!("sleep 300 &\necho $! > {}\nwait", pid.display()));
    let mut s = Session::start_in(env, &[("GUEST_TOOLS_WRAPPER", &tools), ("CONVERSION_TIMEOUT", "0.1")], &[]);
    let m = fix_manifest(&s, "slow-tool-vm");
    let started = Instant::now();
    let first = s.convert_err(&m, "slow-tool-vm");
    assert!(first.starts_with("virt-inspector did not finish within "), "{first}");
    assert!(first.contains("and was stopped; raise CONVERSION_TIMEOUT or check the log "), "{first}");
    assert!(started.elapsed() < Duration::from_secs(60), "the 6 s timeout took {:?}", started.elapsed());
    let pid = read_pid(&pid);
    wait_for(&s.daemon, Duration::from_secs(5), "the tool's child to be killed", || !alive(pid));
    let good = s.good_manifest("good-vm");
    s.convert_ok(&good);
    s.finish();
}

/// The lock taken over as another daemon's takeover does it: the same job, a new generation.
fn take_over_lock(env: &Env) {
    let locks = env.queue.join(".hyper2kvm/locks");
    let lock = fs::read_dir(&locks).unwrap().flatten().map(|e| e.path()).next().expect("a lock file");
    let mut record: Value = serde_json::from_slice(&fs::read(&lock).unwrap()).unwrap();
    record["generation"] = json!(record["generation"].as_u64().unwrap() + 1);
    record["owner"]["host"] = json!("another-host");
    let tmp = locks.join(".takeover.tmp");
    fs::write(&tmp, serde_json::to_vec(&record).unwrap()).unwrap();
    fs::rename(&tmp, &lock).unwrap();
}

#[test]
fn a_lease_lost_during_the_guest_stage_stops_the_tool_and_publishes_nothing() {
    let env = Env::new();
    let pid = env.root.join("tool.pid");
    let tools = fake_tools(&env, &format!("sleep 300 &\necho $! > {}\nwait", pid.display()));
    let mut s = Session::start_in(env, &[("GUEST_TOOLS_WRAPPER", &tools)], &[]);
    let m = fix_manifest(&s, "taken-vm");
    hypersdk_submit(&s.daemon, &s.env, &m);
    wait_for(&s.daemon, RESULT_TIMEOUT, "the guest tool to start", || pid.exists() && read_pid(&pid) > 0);
    let pid = read_pid(&pid);
    assert!(alive(pid), "setup: the tool runs");
    take_over_lock(&s.env);
    wait_for(&s.daemon, Duration::from_secs(20), "the tool to be stopped", || !alive(pid));
    wait_for(&s.daemon, Duration::from_secs(10), "the job to be abandoned", || {
        s.daemon.log().contains("abandoning the job without")
    });
    for name in ["taken-vm.error", "taken-vm.qcow2", "taken-vm.json", "taken-vm.xml"] {
        assert!(!s.env.output.join(name).exists(), "{name} was published by a daemon that lost the job");
    }
    let good = s.good_manifest("good-vm");
    s.convert_ok(&good);
    s.finish();
}

// ---- the real guest ----

/// Waits (up to `limit`) for `vm.qcow2` or `vm.error`.
fn wait_result(s: &Session, vm: &str, limit: Duration) -> Result<PathBuf, String> {
    let started = Instant::now();
    let (qcow2, error) = (s.env.output.join(format!("{vm}.qcow2")), s.env.output.join(format!("{vm}.error")));
    loop {
        if qcow2.exists() {
            return Ok(qcow2);
        }
        if error.exists() {
            return Err(fs::read_to_string(&error).unwrap_or_default());
        }
        s.daemon.assert_running();
        if started.elapsed() > limit {
            s.daemon.fail(&format!("no {vm}.qcow2 or {vm}.error after {limit:?}"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn guest_not_recognised_when_fixing_a_disk_without_an_os() {
    let Some(m) = machine() else { return };
    let mut s = Session::start(&[("GUEST_TOOLS_WRAPPER", &m.wrapper)], &[]);
    let dir = s.env.exports.join("blank");
    create_raw(&dir.join("blank.raw"), 256 << 20);
    let manifest = asking_for_fix(manifest("blank-vm", vec![disk("disk-0", "raw", &dir.join("blank.raw"))]), true);
    let started = Instant::now();
    hypersdk_submit(&s.daemon, &s.env, &manifest);
    let text = wait_result(&s, "blank-vm", Duration::from_secs(900)).expect_err("a blank disk cannot be fixed");
    eprintln!("not recognised: {:.0} s", started.elapsed().as_secs_f64());
    let first = check_error_file(&s.daemon, "blank-vm", &text);
    assert!(first.starts_with("no operating system was recognised on the converted disks disk-0: "), "{first}");
    assert!(first.ends_with("check the disk list"), "{first}");
    s.expected.push("blank-vm.error".into());
    s.finish();
}

/// The fixture OVA through the daemon, fixed and not, with BOOT_CHECK=require: the fixed one
/// is published and boots to a login prompt with the devices of its V.xml; the unfixed one (a
/// disk-only migration: neither inspected nor fixed, so its domain has the virtio disk a
/// manifest for Linux gets) fails, saying the guest did not boot. One daemon, the two jobs side
/// by side. (Inspected but not fixed, the device choice would keep it on SATA, where it boots:
/// `libvirt::devices` tests that choice.)
#[test]
fn guest_fixed_by_the_daemon_boots_and_unfixed_does_not() {
    let Some(m) = machine() else { return };
    let cache = m.ova.parent().unwrap().to_string_lossy().into_owned();
    let env = Env::new();
    let roots = format!("{}:{cache}", env.exports.display());
    let settings = [
        ("GUEST_TOOLS_WRAPPER", m.wrapper.as_str()),
        ("SOURCE_ROOTS", &roots),
        ("BOOT_CHECK", "require"),
        ("BOOT_CHECK_SECONDS", "900"),
        ("MAX_CONCURRENT", "2"),
    ];
    let mut s = Session::start_in(env, &settings, &[]);
    let guest = |vm: &str, fix: bool| {
        let mut manifest = asking_for_fix(manifest(vm, vec![disk("disk-0", "ova", &m.ova)]), fix);
        manifest["vm"] =
            json!({ "cpu": 1, "mem_gb": 1, "firmware": "bios", "os_hint": "linux", "os_version": "debian12_64Guest" });
        manifest["pipeline"]["validate"] = json!({ "enabled": true, "check_image_integrity": true });
        manifest["pipeline"]["inspect"]["enabled"] = json!(fix);
        manifest
    };
    let started = Instant::now();
    hypersdk_submit(&s.daemon, &s.env, &guest("debian-fixed", true));
    hypersdk_submit(&s.daemon, &s.env, &guest("debian-unfixed", false));

    let text = wait_result(&s, "debian-unfixed", Duration::from_secs(2400)).expect_err("unfixed must not boot");
    eprintln!("unfixed: .error after {:.0} s", started.elapsed().as_secs_f64());
    let first = check_error_file(&s.daemon, "debian-unfixed", &text);
    assert!(first.starts_with("The guest did not boot in the boot check (its console showed \"ALERT!\")"), "{first}");
    assert!(text.contains("\nstage: validate\n"), "{text}");
    s.expected.push("debian-unfixed.error".into());

    let qcow2 = match wait_result(&s, "debian-fixed", Duration::from_secs(2400)) {
        Ok(path) => path,
        Err(text) => s.daemon.fail(&format!("the fixed guest failed:\n{text}")),
    };
    eprintln!("fixed: published after {:.0} s", started.elapsed().as_secs_f64());
    let report: Value = serde_json::from_slice(&fs::read(s.env.output.join("debian-fixed.json")).unwrap()).unwrap();
    let g = &report["guest"];
    eprintln!("{:#}", g["steps"]);
    assert_eq!(g["inspect"]["distro"], "debian", "{g:#}");
    assert_eq!(g["inspect"]["firmware"], "bios");
    assert_eq!(g["inspect"]["kernels"][0]["boots_on_virtio"], true, "judged after the fix: {g:#}");
    assert_eq!(g["fix"]["done"], true);
    assert_eq!(g["fix"]["verification"]["ok"], true, "{:#}", g["fix"]);
    assert_eq!(g["fix"]["options"][0]["done"], "always");
    assert_eq!(g["validate"]["image_integrity"][0]["ok"], true);
    assert_eq!(g["boot_check"]["outcome"], "booted", "{:#}", g["boot_check"]);
    assert_eq!(g["boot_check"]["signal"], "login:");
    assert_eq!(g["asked"]["boot_check"], "require");
    let steps: Vec<&str> = g["steps"].as_array().unwrap().iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(steps, ["inspect", "fix", "verify", "validate", "boot_check"]);
    // The boot check's devices are the domain's: virtio disk, q35.
    let xml = fs::read_to_string(s.env.output.join("debian-fixed.xml")).unwrap();
    assert!(xml.contains("<target dev='vda' bus='virtio'/>"), "{xml}");
    assert!(xml.contains("machine='q35'") || xml.contains("machine=\"q35\"") || xml.contains("q35"), "{xml}");
    // V.json's output check is the fixed file's (made again after the fix), not the converted one's.
    assert_eq!(report["disks"][0]["output_check"], "qemu-img check: no errors");
    assert_eq!(report["disks"][0]["output_bytes"], fs::metadata(&qcow2).unwrap().len());
    qemu_img_check(&s.daemon, &qcow2);
    // One event per step in the job's events.
    let events: String = files_under(&s.env.queue.join(".hyper2kvm/done"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    for step in ["inspect:", "fix: virt-v2v-in-place in", "verify:", "boot_check: booted"] {
        assert!(events.contains(step), "no {step} event: {events}");
    }
    s.expected.extend(["debian-fixed.qcow2", "debian-fixed.json", "debian-fixed.xml"].map(String::from));
    s.finish();
}
