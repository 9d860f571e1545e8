//! The real guest's setup for the daemon tests: the Debian 12 tools root
//! (scripts/guest-tools-root.sh) and the VMware-style fixture OVA (scripts/guest-fixture.sh),
//! both cached under /var/cache, with the same skip rules as tests/guest.rs: without root,
//! debootstrap or loop devices the test says why and skips; with them a failing setup fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The tools root (as a GUEST_TOOLS_WRAPPER) and the fixture OVA.
pub struct Machine {
    pub wrapper: String,
    pub ova: PathBuf,
}

impl Machine {
    /// `hyper2kvm convert` of the fixture OVA to `dir/vm.qcow2`; a failure fails the test.
    pub fn converted(&self, dir: &Path) -> PathBuf {
        let out = dir.join("vm.qcow2");
        let started = Instant::now();
        let status = Command::new(env!("CARGO_BIN_EXE_hyper2kvm"))
            .args(["--config-dir", "/nonexistent", "convert"])
            .arg(&self.ova)
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "hyper2kvm convert of the fixture OVA failed");
        eprintln!("convert: {:.1} s", started.elapsed().as_secs_f64());
        out
    }
}

fn skip(reason: &str) -> Option<Machine> {
    eprintln!("\n*** SKIPPED: {reason} ***\n");
    None
}

/// Builds (or finds cached) the tools root and the fixture, or says why this machine cannot.
pub fn machine() -> Option<Machine> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("the real guest fixture needs root (debootstrap, loop devices, chroot)");
    }
    if !Path::new("/usr/sbin/debootstrap").exists() {
        return skip("debootstrap is not installed (scripts/install-deps.sh installs it)");
    }
    if !Path::new("/dev/loop-control").exists() {
        return skip("no loop devices (/dev/loop-control) to build the guest disk on");
    }
    // Test processes run in parallel: one builds, the others wait for its cache.
    let lock = std::fs::File::create("/var/cache/hyper2kvm-guest-tests.lock").expect("create the build lock");
    // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    let root = script("guest-tools-root.sh");
    let ova = PathBuf::from(script("guest-fixture.sh"));
    drop(lock);
    assert!(ova.is_file(), "guest-fixture.sh printed {ova:?}, which is not a file");
    Some(Machine { wrapper: format!("{REPO}/scripts/guest-tools-run.sh {root} --"), ova })
}

/// Runs a cached-build script and returns the path it prints; a failure fails the test.
fn script(name: &str) -> String {
    let started = Instant::now();
    let out = Command::new(format!("{REPO}/scripts/{name}")).output().expect("start the script");
    assert!(out.status.success(), "{name} failed (setup): {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
