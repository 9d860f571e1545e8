//! Whether guests can be inspected, fixed and boot-checked on this host (docs/GUEST.md): the
//! guest tools started the way the jobs start them (through GUEST_TOOLS_WRAPPER when it is
//! set), KVM tried with a real vCPU rather than assumed, and OVMF for UEFI guests.

use std::path::Path;
use std::process::Stdio;

use serde::Serialize;

use crate::guest::{boot_check, Tools};

/// The tools inspection and verification run: libguestfs' inspector, a guestfish session that
/// reads `/boot` and fstab back, and lsinitramfs for the initramfs' modules.
const INSPECT_TOOLS: [&str; 3] = ["virt-inspector", "guestfish", "lsinitramfs"];
/// What fixing adds: virt-v2v-in-place, which runs the disks through nbdkit.
const FIX_TOOLS: [&str; 2] = ["virt-v2v-in-place", "nbdkit"];
/// The boot check's emulator.
const BOOT_TOOL: &str = "qemu-system-x86_64";
/// OVMF where the boot check loads it from.
const OVMF_FILES: [&str; 2] = [boot_check::OVMF_CODE, boot_check::OVMF_VARS];

/// What this host can do with the guest inside the converted disks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestSupport {
    /// GUEST_TOOLS_WRAPPER as configured (joined again), when set: the tools were looked for
    /// behind it.
    pub tools_wrapper: Option<String>,
    /// Every tool looked for, found or not.
    pub tools: Vec<GuestTool>,
    /// Guests can be inspected and a fix verified (`inspect --guest`, `pipeline.inspect`).
    pub inspect: bool,
    /// Guests can be fixed (`fix`, `pipeline.fix`): inspection's tools and virt-v2v-in-place
    /// with nbdkit.
    pub fix: bool,
    /// A result can be booted once to check it (BOOT_CHECK, `fix --boot-check`).
    pub boot_check: bool,
    /// How libguestfs' appliance and the boot check run guests: `kvm` when a vCPU really ran
    /// on `/dev/kvm`, `tcg` (software emulation, minutes per guest) otherwise; absent when
    /// there is no qemu-system-x86_64 to try.
    pub accel: Option<&'static str>,
    /// OVMF (UEFI firmware) where the boot check loads it, found: UEFI guests can be
    /// boot-checked.
    pub ovmf: bool,
}

/// One guest tool.
#[derive(Debug, Clone, Serialize)]
pub struct GuestTool {
    /// The program's name (`virt-inspector`, `guestfish`, `virt-v2v-in-place`, `qemu-system-x86_64`, …).
    pub tool: &'static str,
    /// It started (behind the wrapper when one is set).
    pub found: bool,
    /// Why not, with the package to install.
    pub error: Option<String>,
}

/// Looks for every guest tool behind `tools`' wrapper, tries KVM when qemu-system-x86_64 is
/// there, and looks for OVMF where the tools see the file system.
pub fn probe(tools: &Tools) -> GuestSupport {
    let found: Vec<GuestTool> = INSPECT_TOOLS
        .iter()
        .chain(FIX_TOOLS.iter())
        .chain(std::iter::once(&BOOT_TOOL))
        .map(|&tool| match tools.check(tool) {
            Ok(()) => GuestTool { tool, found: true, error: None },
            Err(e) => GuestTool { tool, found: false, error: Some(e.to_string()) },
        })
        .collect();
    let has = |names: &[&str]| names.iter().all(|n| found.iter().any(|t| t.tool == *n && t.found));
    let inspect = has(&INSPECT_TOOLS);
    let fix = inspect && has(&FIX_TOOLS);
    let boot_check = has(&[BOOT_TOOL]);
    let accel = boot_check.then(|| if tools.kvm_usable() { "kvm" } else { "tcg" });
    let ovmf = boot_check && ovmf_present(tools);
    let tools_wrapper = (!tools.wrapper.is_empty()).then(|| tools.wrapper.join(" "));
    GuestSupport { tools_wrapper, tools: found, inspect, fix, boot_check, accel, ovmf }
}

/// OVMF's files on the host, or, behind a wrapper, in the root the tools run in (the wrapper
/// does not bind system directories such as /usr: the root has its own).
fn ovmf_present(tools: &Tools) -> bool {
    if tools.wrapper.is_empty() {
        return OVMF_FILES.iter().all(|f| Path::new(f).is_file());
    }
    let mut cmd = tools.command("test");
    for (i, file) in OVMF_FILES.iter().enumerate() {
        if i > 0 {
            cmd.arg("-a");
        }
        cmd.args(["-r", file]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.status().is_ok_and(|s| s.success())
}

/// The first missing tool's message among `names` (it names the package to install).
fn first_missing(g: &GuestSupport, names: &[&str]) -> String {
    g.tools
        .iter()
        .filter(|t| names.contains(&t.tool) && !t.found)
        .find_map(|t| t.error.clone())
        .unwrap_or_else(|| "a tool is missing".into())
}

/// What cannot be done with guests here, as [`super::Capabilities::warnings`] sentences.
pub fn warnings(g: &GuestSupport) -> Vec<String> {
    let mut warnings = Vec::new();
    if !g.fix {
        let all: Vec<&str> = INSPECT_TOOLS.iter().chain(FIX_TOOLS.iter()).copied().collect();
        let what = if g.inspect { "fixed" } else { "inspected or fixed" };
        warnings.push(format!("guests cannot be {what} here (pipeline.fix fails): {}", first_missing(g, &all)));
    }
    if !g.boot_check {
        warnings.push(format!("boot checks cannot run here (BOOT_CHECK): {}", first_missing(g, &[BOOT_TOOL])));
    } else if !g.ovmf {
        warnings.push("UEFI guests cannot be boot-checked here: OVMF is not installed (install ovmf)".into());
    }
    warnings
}

/// The lines of `hyper2kvm capabilities`' listing: inspection, fixing, the boot check and its
/// accelerator, UEFI.
pub fn render(g: &GuestSupport) -> String {
    let state = |ok: bool, names: &[&str]| {
        if ok {
            format!("yes ({})", names.join(", "))
        } else {
            format!("no: {}", first_missing(g, names))
        }
    };
    let fix_tools: Vec<&str> = INSPECT_TOOLS.iter().chain(FIX_TOOLS.iter()).copied().collect();
    let accel = match g.accel {
        Some("kvm") => "KVM (a vCPU ran on /dev/kvm)",
        Some(_) => "software emulation (TCG: KVM was tried and is not usable; minutes per guest)",
        None => "none (no qemu-system-x86_64)",
    };
    let uefi = match (g.boot_check, g.ovmf) {
        (true, true) => "yes (OVMF)".to_owned(),
        (true, false) => "no: OVMF is not installed (install ovmf)".to_owned(),
        (false, _) => "no: no boot check".to_owned(),
    };
    let wrapper = g.tools_wrapper.as_deref().map(|w| format!(" (through GUEST_TOOLS_WRAPPER={w})")).unwrap_or_default();
    format!(
        "guest tools:{wrapper}\n  guest inspection: {}\n  guest fixing: {}\n  boot check: {}\n  guests run on: {accel}\n  UEFI boot check: {uefi}\n",
        state(g.inspect, &INSPECT_TOOLS),
        state(g.fix, &fix_tools),
        state(g.boot_check, &[BOOT_TOOL]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tools behind a shell script standing in for the wrapper: the tool's name is `$0`, and
    /// the script answers 127 (a chroot's "not found") for the tools named in `missing`.
    fn wrapper_without(missing: &[&str], kvm: bool) -> Tools {
        let cases: String = missing.iter().map(|m| format!("{m}) exit 127;; ")).collect();
        let script = format!("case \"$0\" in {cases}*) exit 0;; esac");
        Tools::new(vec!["sh".into(), "-c".into(), script]).with_kvm(kvm)
    }

    #[test]
    fn every_tool_behind_the_wrapper_means_guests_can_be_fixed_and_booted() {
        let g = probe(&wrapper_without(&[], false));
        assert!(g.inspect && g.fix && g.boot_check, "{g:?}");
        assert_eq!(g.accel, Some("tcg"));
        // `test -r OVMF…` behind the wrapper: the script answers yes for it too.
        assert!(g.ovmf, "{g:?}");
        assert!(g.tools_wrapper.as_deref().is_some_and(|w| w.starts_with("sh -c ")), "{g:?}");
        assert_eq!(g.tools.len(), 6, "{g:?}");
        assert!(warnings(&g).is_empty(), "{:?}", warnings(&g));
        let text = render(&g);
        assert!(
            text.contains("  guest fixing: yes (virt-inspector, guestfish, lsinitramfs, virt-v2v-in-place, nbdkit)\n"),
            "{text}"
        );
        assert!(text.contains("  guests run on: software emulation (TCG"), "{text}");
        assert!(text.contains("  UEFI boot check: yes (OVMF)\n"), "{text}");
        let on_kvm = probe(&wrapper_without(&[], true));
        assert_eq!(on_kvm.accel, Some("kvm"));
        assert!(render(&on_kvm).contains("  guests run on: KVM (a vCPU ran on /dev/kvm)\n"));
    }

    #[test]
    fn without_virt_v2v_guests_are_inspected_but_not_fixed() {
        for missing in ["virt-v2v-in-place", "nbdkit"] {
            let g = probe(&wrapper_without(&[missing], false));
            assert!(g.inspect && !g.fix && g.boot_check, "{missing}: {g:?}");
            let tool = g.tools.iter().find(|t| t.tool == missing).unwrap();
            assert!(!tool.found && tool.error.as_deref().is_some_and(|e| e.contains("is not installed: install")));
            let warnings = warnings(&g);
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(
                warnings[0].starts_with(&format!(
                    "guests cannot be fixed here (pipeline.fix fails): {missing} is not installed: install "
                )),
                "{warnings:?}"
            );
            assert!(render(&g).contains(&format!("  guest fixing: no: {missing} is not installed")), "{}", render(&g));
        }
        let g = probe(&wrapper_without(&["nbdkit"], false));
        assert!(
            g.tools
                .iter()
                .any(|t| t.tool == "nbdkit" && t.error.as_deref().is_some_and(|e| e.contains("install nbdkit"))),
            "{g:?}"
        );
    }

    #[test]
    fn without_qemu_there_is_no_boot_check_and_no_accelerator() {
        let g = probe(&wrapper_without(&["qemu-system-x86_64"], true));
        assert!(g.fix && !g.boot_check && !g.ovmf && g.accel.is_none(), "{g:?}");
        let warnings = warnings(&g);
        assert_eq!(
            warnings,
            ["boot checks cannot run here (BOOT_CHECK): qemu-system-x86_64 is not installed: install qemu-system-x86 (Debian 12), or set GUEST_TOOLS_WRAPPER to run the guest tools from a root that has them"]
        );
        assert!(render(&g).contains("  guests run on: none (no qemu-system-x86_64)\n"));
    }

    #[test]
    fn without_ovmf_uefi_guests_are_not_boot_checked() {
        let script = "case \"$0\" in test) exit 1;; *) exit 0;; esac".to_owned();
        let g = probe(&Tools::new(vec!["sh".into(), "-c".into(), script]).with_kvm(false));
        assert!(g.boot_check && !g.ovmf, "{g:?}");
        assert_eq!(warnings(&g), ["UEFI guests cannot be boot-checked here: OVMF is not installed (install ovmf)"]);
        assert!(render(&g).contains("  UEFI boot check: no: OVMF is not installed (install ovmf)\n"));
    }

    #[test]
    fn a_wrapper_that_does_not_exist_finds_nothing() {
        let g = probe(&Tools::new(vec!["/nonexistent/hyper2kvm-guest-tools".into()]).with_kvm(false));
        assert!(!g.inspect && !g.fix && !g.boot_check && !g.ovmf && g.accel.is_none(), "{g:?}");
        assert!(g.tools.iter().all(|t| !t.found), "{g:?}");
        let warnings = warnings(&g);
        assert!(warnings[0].starts_with("guests cannot be inspected or fixed here (pipeline.fix fails): virt-inspector is not installed: install libguestfs-tools"), "{warnings:?}");
        assert!(render(&g).contains("  guest inspection: no: virt-inspector is not installed"), "{}", render(&g));
    }
}
