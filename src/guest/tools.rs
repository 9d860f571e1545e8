//! Running the guest tools: the GUEST_TOOLS_WRAPPER prefix, libguestfs' environment, whether
//! KVM is usable (tried, not assumed), and a child that runs in its own process group under a
//! time limit and a cancellation check, its output kept in a log file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{GuestError, LOG_TAIL_LINES};

/// Asked every few hundred milliseconds while a tool runs; `true` stops it (job cancelled,
/// lease lost, daemon stopping).
pub type Cancel<'a> = &'a (dyn Fn() -> bool + Sync);

/// Never cancels.
pub fn never() -> bool {
    false
}

/// How the guest tools are started on this host.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    /// Command prefix (GUEST_TOOLS_WRAPPER split on whitespace); empty runs them from PATH.
    pub wrapper: Vec<String>,
    /// VIRTIO_WIN: the virtio-win ISO or directory for Windows guests' drivers.
    pub virtio_win: Option<PathBuf>,
    kvm: OnceLock<bool>,
}

/// The Debian 12 package each tool comes from, for the "install X" message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "virt-v2v-in-place" | "virt-v2v-inspector" => "virt-v2v and nbdkit",
        "nbdkit" => "nbdkit",
        "qemu-system-x86_64" => "qemu-system-x86",
        "lsinitramfs" => "initramfs-tools-core",
        _ => "libguestfs-tools",
    }
}

impl Tools {
    /// Tools behind `wrapper` (GUEST_TOOLS_WRAPPER, already split).
    pub fn new(wrapper: Vec<String>) -> Tools {
        Tools { wrapper, virtio_win: None, kvm: OnceLock::new() }
    }

    /// The tools as the configuration says: GUEST_TOOLS_WRAPPER and VIRTIO_WIN.
    pub fn for_config(config: &crate::config::Config) -> Tools {
        Tools { virtio_win: config.virtio_win.clone(), ..Tools::new(config.guest_tools_wrapper.clone()) }
    }

    /// The same tools with KVM's usability already known (not probed): for callers that
    /// probed it themselves, and tests.
    pub fn with_kvm(self, usable: bool) -> Tools {
        let kvm = OnceLock::new();
        let _ = kvm.set(usable);
        Tools { kvm, ..self }
    }

    /// A command for `program`, behind the wrapper, with libguestfs told to run its appliance
    /// directly (no libvirtd needed) and with TCG when KVM is not usable.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.env("LIBGUESTFS_BACKEND", "direct");
        if program != "qemu-system-x86_64" && !self.kvm_usable() {
            cmd.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
        }
        cmd
    }

    /// Whether qemu can run a guest on KVM here: `/dev/kvm` can exist and Debian 12's qemu
    /// still abort on it ("failed to set MSR 0x10a"), so a real vCPU is started once and
    /// the answer remembered. Still running after 3 seconds means it works.
    pub fn kvm_usable(&self) -> bool {
        *self.kvm.get_or_init(|| {
            let usable = self.try_kvm();
            tracing::info!(
                usable,
                "KVM probe: {}",
                if usable { "guests run on KVM" } else { "guests run under software emulation (TCG)" }
            );
            usable
        })
    }

    fn try_kvm(&self) -> bool {
        if File::options().read(true).write(true).open("/dev/kvm").is_err() {
            return false;
        }
        let mut cmd = self.command("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "64"])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let Ok(mut child) = cmd.spawn() else { return false };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        kill_group(&mut child);
        true
    }

    /// Whether `program` can be started (behind the wrapper): `--version`/`--help` answered.
    pub fn check(&self, program: &str) -> Result<(), GuestError> {
        let mut cmd = self.command(program);
        cmd.arg("--help").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0);
        match cmd.spawn().and_then(|child| wait_bounded(child, CHECK_LIMIT, program)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(self.missing(program)),
            Err(e) => Err(GuestError::Spawn { tool: program.into(), source: e }),
            // A wrapper's chroot says 127 for a program the root lacks.
            Ok(s) if s.code() == Some(127) => Err(self.missing(program)),
            Ok(_) => Ok(()),
        }
    }

    fn missing(&self, program: &str) -> GuestError {
        GuestError::ToolMissing { tool: program.into(), package: package_of(program) }
    }

    /// Runs `cmd` (made by [`Tools::command`] for `tool`) to the end with stdout and stderr in
    /// `log`, in its own process group so that a timeout or a cancel stops all of it.
    pub fn run_logged(
        &self,
        tool: &str,
        mut cmd: Command,
        log: &Path,
        limit: Duration,
        cancel: Cancel<'_>,
    ) -> Result<(), GuestError> {
        let io = |source| GuestError::Io { what: "cannot write the log", path: log.to_path_buf(), source };
        let out = File::create(log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let mut child = self.spawn(tool, &mut cmd)?;
        let status = wait_limited(&mut child, tool, limit, cancel, log)?;
        if status.success() {
            return Ok(());
        }
        if status.code() == Some(127) {
            return Err(self.missing(tool));
        }
        Err(GuestError::ToolFailed {
            tool: tool.into(),
            status: describe(status),
            log: log.to_path_buf(),
            tail: tail(log),
        })
    }

    /// Runs `cmd` to the end and returns its stdout; stderr goes to `log`.
    pub fn run_output(
        &self,
        tool: &str,
        mut cmd: Command,
        log: &Path,
        limit: Duration,
        cancel: Cancel<'_>,
    ) -> Result<String, GuestError> {
        let io = |source| GuestError::Io { what: "cannot write the log", path: log.to_path_buf(), source };
        let out_path = log.with_extension("out");
        let out = File::create(&out_path).map_err(io)?;
        let err = File::create(log).map_err(io)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let mut child = self.spawn(tool, &mut cmd)?;
        let status = wait_limited(&mut child, tool, limit, cancel, log)?;
        let text = std::fs::read(&out_path).map_err(|source| GuestError::Io {
            what: "cannot read the output",
            path: out_path.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&out_path);
        if status.code() == Some(127) {
            return Err(self.missing(tool));
        }
        if !status.success() {
            return Err(GuestError::ToolFailed {
                tool: tool.into(),
                status: describe(status),
                log: log.to_path_buf(),
                tail: tail(log),
            });
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// Starts `cmd`, turning "no such program" into [`GuestError::ToolMissing`].
    pub(crate) fn spawn(&self, tool: &str, cmd: &mut Command) -> Result<Child, GuestError> {
        cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => self.missing(tool),
            _ => GuestError::Spawn { tool: tool.into(), source: e },
        })
    }
}

/// Waits for `child`, killing its process group on timeout or cancel.
pub(crate) fn wait_limited(
    child: &mut Child,
    tool: &str,
    limit: Duration,
    cancel: Cancel<'_>,
    log: &Path,
) -> Result<ExitStatus, GuestError> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(source) => return Err(GuestError::Spawn { tool: tool.into(), source }),
        }
        if cancel() {
            kill_group(child);
            return Err(GuestError::Cancelled { tool: tool.into() });
        }
        if Instant::now() >= deadline {
            kill_group(child);
            return Err(GuestError::Timeout { tool: tool.into(), limit, log: log.to_path_buf() });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILL to the child's whole process group (it was started as the group's leader), then
/// reaps the child.
/// How long `TOOL --help` may take: the readiness probe (`hyper2kvm capabilities`) runs it
/// for every tool and has its own timeout of 20 s in the shipped manifests.
const CHECK_LIMIT: Duration = Duration::from_secs(5);

/// Waits for `child` at most `limit`; a tool that hangs (a wrapper stuck on a mount) is killed
/// with its group and reported as an error rather than hanging the caller.
fn wait_bounded(mut child: Child, limit: Duration, program: &str) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            kill_group(&mut child);
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("`{program} --help` did not answer within {} s", limit.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals the group; no memory is involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log, each cut to 300 characters; the file's last
/// 64 KiB at most are read.
pub(crate) fn tail(log: &Path) -> String {
    let Ok(mut file) = File::open(log) else { return "(no log)".into() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[start..]
        .iter()
        .map(|l| format!("  {}", l.chars().take(300).collect::<String>()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `path` made absolute against the working directory: the wrapper binds the directories of
/// absolute paths only, and the tools may run with another working directory.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tools whose "wrapper" is a shell script standing in for the real tool.
    fn fake(script: &str) -> Tools {
        Tools::new(vec!["sh".into(), "-c".into(), script.into()]).with_kvm(false)
    }

    #[test]
    fn a_tool_that_hangs_on_help_is_stopped_and_reported() {
        let started = Instant::now();
        let error = fake("sleep 60").check("virt-inspector").unwrap_err();
        assert!(started.elapsed() < CHECK_LIMIT + Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(error.to_string().contains("did not answer within"), "{error}");
    }

    #[test]
    fn a_missing_tool_says_what_to_install() {
        let tools = Tools::new(vec!["/nonexistent/hyper2kvm-wrapper".into()]).with_kvm(false);
        let dir = tempfile::tempdir().unwrap();
        let cmd = tools.command("virt-v2v-in-place");
        let e = tools.run_logged("virt-v2v-in-place", cmd, &dir.path().join("log"), Duration::from_secs(5), &never);
        let text = e.unwrap_err().to_string();
        assert!(text.starts_with("virt-v2v-in-place is not installed: install virt-v2v and nbdkit"), "{text}");
        // A wrapper's chroot answers 127 for a program the root lacks.
        let tools = fake("exit 127");
        let e = tools.run_logged(
            "guestfish",
            tools.command("guestfish"),
            &dir.path().join("log"),
            Duration::from_secs(5),
            &never,
        );
        assert!(matches!(e, Err(GuestError::ToolMissing { .. })), "{e:?}");
    }

    #[test]
    fn a_failed_tool_shows_the_last_lines_of_its_log() {
        let tools = fake("i=0; while [ $i -lt 50 ]; do echo line $i; i=$((i+1)); done; echo 'virt-v2v-in-place: error: inspection could not detect the source guest' >&2; exit 1");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fix.log");
        let e = tools.run_logged(
            "virt-v2v-in-place",
            tools.command("virt-v2v-in-place"),
            &log,
            Duration::from_secs(10),
            &never,
        );
        let text = e.unwrap_err().to_string();
        assert!(text.starts_with("virt-v2v-in-place failed (exit status 1); its log is"), "{text}");
        assert!(text.contains("inspection could not detect the source guest"), "{text}");
        assert!(!text.contains("line 30\n"), "capped to the last {LOG_TAIL_LINES} lines: {text}");
        assert_eq!(text.lines().count(), 1 + LOG_TAIL_LINES, "{text}");
    }

    #[test]
    fn a_tool_past_its_time_is_killed_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        // The grandchild is what must die too: the appliance's qemu under virt-v2v.
        let tools = fake(&format!("sleep 60 & echo $! > {}; wait", pidfile.display()));
        let started = Instant::now();
        let e = tools.run_logged(
            "virt-v2v-in-place",
            tools.command("virt-v2v-in-place"),
            &dir.path().join("log"),
            Duration::from_millis(800),
            &never,
        );
        assert!(matches!(e, Err(GuestError::Timeout { .. })), "{e:?}");
        assert!(e.unwrap_err().to_string().contains("did not finish within"));
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // Killed but not yet reaped by whoever adopted it is a zombie: dead.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with(['Z', 'X']));
        assert!(!alive, "the tool's child {pid} outlived the timeout");
    }

    #[test]
    fn a_cancel_stops_the_tool() {
        let tools = fake("sleep 60");
        let dir = tempfile::tempdir().unwrap();
        let e = tools.run_logged(
            "virt-v2v-in-place",
            tools.command("virt-v2v-in-place"),
            &dir.path().join("log"),
            Duration::from_secs(60),
            &|| true,
        );
        assert!(matches!(e, Err(GuestError::Cancelled { .. })), "{e:?}");
    }

    #[test]
    fn libguestfs_is_told_to_use_tcg_when_kvm_is_not_usable() {
        let tools = Tools::new(Vec::new()).with_kvm(false);
        let cmd = tools.command("guestfish");
        let envs: Vec<_> = cmd.get_envs().map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned()))).collect();
        assert!(envs.contains(&("LIBGUESTFS_BACKEND_SETTINGS".into(), Some("force_tcg".into()))));
        let tools = Tools::new(Vec::new()).with_kvm(true);
        assert!(!tools.command("guestfish").get_envs().any(|(k, _)| k == "LIBGUESTFS_BACKEND_SETTINGS"));
    }
}
