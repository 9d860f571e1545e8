//! The command line and configuration as an operator meets them (contract §1–§2): invalid
//! values are fatal and say where they came from, unknown keys only warn, systemd's empty
//! `--flag=` expansions fall back to the configuration, and exit codes are 0/1/2.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn hyper2kvm(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(vars.iter().copied())
        .arg("--config-dir")
        .arg(&env.etc)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hyper2kvm")
}

#[test]
fn an_invalid_value_is_fatal_and_names_key_file_line_and_range() {
    let env = Env::new();
    std::fs::write(env.etc.join("hyper2kvm.conf"), "# base\nPOLL_INTERVAL=soon\n").unwrap();
    let out = hyper2kvm(&env, &["daemon", "--watch-dir", env.queue.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("POLL_INTERVAL"), "{stderr}");
    assert!(stderr.contains("hyper2kvm.conf:2"), "names the file and line: {stderr}");
    assert!(stderr.contains("seconds from"), "names the accepted range: {stderr}");
}

#[test]
fn an_invalid_instance_file_value_names_that_file() {
    let env = Env::new();
    std::fs::write(env.etc.join("hyper2kvm-vsphere.conf"), "MAX_CONCURRENT=lots\n").unwrap();
    let out = hyper2kvm(&env, &["daemon", "--instance=vsphere"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MAX_CONCURRENT") && stderr.contains("hyper2kvm-vsphere.conf:1"), "{stderr}");
}

#[test]
fn unknown_keys_warn_and_empty_systemd_expansions_fall_back_to_the_conf() {
    let env = Env::new();
    let conf = format!(
        "WATCH_DIR={}\nOUTPUT_DIR={}\nPOLL_INTERVAL=0.2\nSETTLE_SECONDS=0.2\nFROBNICATE=yes\nLOG_LEVEL=debug\n",
        env.queue.display(),
        env.output.display()
    );
    std::fs::write(env.etc.join("hyper2kvm.conf"), conf).unwrap();
    // Exactly what systemd runs when WATCH_DIR, OUTPUT_DIR and LOG_LEVEL are not in its environment.
    let child = Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SOURCE_ROOTS", &env.exports)
        .args(["--config-dir", env.etc.to_str().unwrap()])
        .args(["daemon", "--instance=t2", "--watch-dir=", "--output-dir=", "--log-level="])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(env.queue.is_dir() && env.output.is_dir()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(env.queue.is_dir() && env.output.is_dir(), "the conf's directories are used and created");
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("FROBNICATE").count(), 1, "one warning for the unknown key: {stderr}");
    assert!(stderr.contains("DEBUG"), "LOG_LEVEL=debug from the conf applies: {stderr}");
}

#[test]
fn exit_codes_and_version() {
    let env = Env::new();
    let version = hyper2kvm(&env, &["--version"], &[]);
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("hyper2kvm "));
    let usage = hyper2kvm(&env, &["daemon", "--no-such-flag"], &[]);
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
    let missing = hyper2kvm(&env, &["inspect", "/nonexistent/disk.vmdk"], &[]);
    assert_eq!(missing.status.code(), Some(1), "failures exit 1");
    assert!(!missing.stderr.is_empty());
}

#[test]
fn log_levels_are_case_insensitive_and_warning_is_accepted() {
    let env = Env::new();
    for level in ["WARNING", "Info", "error", "trace"] {
        let out = hyper2kvm(&env, &["status", "--log-level", level, "--watch-dir", env.queue.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{level}: {out:?}");
    }
    let out = hyper2kvm(&env, &["status", "--log-level", "loud"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOG_LEVEL"));
}

/// `hyper2kvm status --json | head -1`: a reader that goes away ends the command quietly (as
/// SIGPIPE ends other tools), never with Rust's "failed printing to stdout" panic.
#[test]
fn a_closed_pipe_ends_a_one_shot_command_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new();
    let (queue, output) = (env.queue.to_str().unwrap(), env.output.to_str().unwrap());
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("--config-dir")
        .arg(&env.etc)
        .args(["status", "--json", "--watch-dir", queue, "--output-dir", output])
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run hyper2kvm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
}

/// Starts `hyper2kvm daemon ARGS` with `vars` as its whole environment (plus PATH and
/// SOURCE_ROOTS), waits until `ready` holds, then stops it with SIGTERM; returns its stderr.
fn run_daemon_until(env: &Env, args: &[&str], vars: &[(&str, &std::path::Path)], ready: impl Fn() -> bool) -> String {
    let child = Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SOURCE_ROOTS", &env.exports)
        .envs(vars.iter().copied())
        .args(["--config-dir", env.etc.to_str().unwrap(), "daemon"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let became_ready = ready();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(became_ready, "the daemon did not get ready: {stderr}");
    assert!(out.status.success(), "{out:?}");
    stderr
}

/// Issue 10: the unit of HyperSDK's integration guide runs `hyper2kvm daemon … --format qcow2`
/// with HYPER2KVM_WATCH_DIR and HYPER2KVM_OUTPUT_DIR set; both are understood.
#[test]
fn hypersdk_units_format_flag_and_prefixed_variables_are_accepted() {
    let env = Env::new();
    let vars = [("HYPER2KVM_WATCH_DIR", env.queue.as_path()), ("HYPER2KVM_OUTPUT_DIR", env.output.as_path())];
    run_daemon_until(&env, &["--format", "qcow2", "--log-level=info"], &vars, || {
        env.queue.join(".hyper2kvm").is_dir() && env.output.is_dir()
    });

    // Plain WATCH_DIR wins over HYPER2KVM_WATCH_DIR, and the daemon says so.
    let plain = env.root.join("plain-queue");
    let prefixed = env.root.join("prefixed-queue");
    let vars = [
        ("HYPER2KVM_WATCH_DIR", prefixed.as_path()),
        ("WATCH_DIR", plain.as_path()),
        ("HYPER2KVM_OUTPUT_DIR", env.output.as_path()),
    ];
    let stderr = run_daemon_until(&env, &["--format=QCOW2"], &vars, || plain.join(".hyper2kvm").is_dir());
    assert!(!prefixed.exists(), "the prefixed WATCH_DIR that lost is not used");
    assert!(stderr.contains("HYPER2KVM_WATCH_DIR") && stderr.contains("not used"), "{stderr}");
}

#[test]
fn a_format_other_than_qcow2_is_a_usage_error() {
    let env = Env::new();
    let out = hyper2kvm(&env, &["daemon", "--format", "raw"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("'raw'") && stderr.contains("qcow2 only"), "{stderr}");
    // systemd's expansion of an unset ${FORMAT}: unset, not an error.
    // (An invalid POLL_INTERVAL stops it at once, with 1: the command line itself was fine.)
    let out = hyper2kvm(&env, &["daemon", "--format=", "--poll-interval", "soon"], &[]);
    assert_eq!(out.status.code(), Some(1), "an empty --format is accepted: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("POLL_INTERVAL"), "{out:?}");
}
