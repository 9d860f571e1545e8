//! `hyper2kvm inspect --guest` and `hyper2kvm fix`: the module's functions with the
//! configuration's tools and time limit, scratch space, and the evidence printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::tools::never;
use super::{boot_check, repair, BootOutcome, BootSpec, Firmware, GuestError, GuestInfo, Tools};
use crate::config::Config;

/// Errors of the one-shot commands.
#[derive(Debug, thiserror::Error)]
pub enum OneShotError {
    /// Inspecting, fixing, verifying or boot-checking the guest failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The fix ran but the guest's files do not agree with a virtio disk.
    #[error("the fixed guest would not boot on virtio: {0}; see the evidence above and docs/GUEST.md")]
    NotRepaired(String),
    /// The boot check did not see a login prompt.
    #[error("the fixed guest did not boot ({0}); its console is {1}")]
    BootFailed(String, PathBuf),
    /// The result could not be serialised to JSON, which both output forms are made from.
    #[error("cannot print the result: {0}")]
    Print(#[from] serde_json::Error),
}

fn tools(config: &Config) -> Tools {
    Tools::for_config(config)
}

/// A scratch directory under the system's temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, GuestError> {
        let dir = std::env::temp_dir().join(format!("hyper2kvm-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(super::io_error("cannot create", &dir))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `hyper2kvm inspect --guest IMAGE`.
pub fn inspect(config: &Config, image: &Path) -> Result<GuestInfo, GuestError> {
    let scratch = Scratch::new()?;
    super::inspect::inspect(&tools(config), &[image.to_path_buf()], &scratch.0, config.conversion_timeout, &never)
}

/// `hyper2kvm inspect --guest IMAGE [--json]`: [`inspect`], printed as JSON or as
/// `key: value` lines.
pub fn inspect_command(config: &Config, image: &Path, json: bool) -> Result<(), OneShotError> {
    let info = inspect(config, image)?;
    Ok(crate::convert::fields::print(&info, json)?)
}

/// `hyper2kvm fix IMAGE... [--boot-check]`: fix, verify, optionally boot; prints the evidence
/// and fails when the guest does not agree with virtio or does not boot.
pub fn fix(
    config: &Config,
    images: &[PathBuf],
    work_dir: Option<PathBuf>,
    boot: Option<Duration>,
    json: bool,
) -> Result<(), OneShotError> {
    let tools = tools(config);
    let work = work_dir.unwrap_or_else(|| {
        let first = images.first().map(PathBuf::as_path).unwrap_or(Path::new("guest"));
        let mut name = first.file_name().unwrap_or_default().to_os_string();
        name.push(".fix");
        first.with_file_name(name)
    });
    let repaired = repair(&tools, images, &work, config.conversion_timeout, &never)?;
    let mut report =
        serde_json::json!({ "fix": repaired.fix, "mended": repaired.mended, "verification": repaired.verification });
    let mut outcome = Ok(());
    if !repaired.verification.ok {
        outcome = Err(OneShotError::NotRepaired(super::capped(&repaired.verification.problems, 3)));
    } else if let Some(budget) = boot {
        let firmware = if efi_boot(&work) { Firmware::Uefi } else { Firmware::Bios };
        let spec = BootSpec {
            images: images.to_vec(),
            firmware,
            memory_mib: 1024,
            console_log: work.join("boot-check.console.log"),
            budget,
            cancel: &never,
            devices: super::BootDevices::default(),
        };
        let booted = boot_check(&tools, &spec)?;
        if !matches!(booted.outcome, BootOutcome::Booted(_)) {
            let what = match &booted.outcome {
                BootOutcome::Failed(sign) => format!("its console showed {sign:?}"),
                _ => format!("no login prompt and no network packet within {} s", budget.as_secs()),
            };
            outcome = Err(OneShotError::BootFailed(what, booted.console_log.clone()));
        }
        report["boot_check"] = serde_json::to_value(&booted)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", summary(&report));
    }
    outcome
}

/// The evidence in a few lines for a person.
fn summary(report: &serde_json::Value) -> String {
    let fix = &report["fix"];
    let v = &report["verification"];
    let mut out = format!(
        "fixed: virt-v2v-in-place in {:.0} s ({}), log {}\n",
        fix["seconds"].as_f64().unwrap_or_default(),
        fix["accel"].as_str().unwrap_or("?"),
        fix["log"].as_str().unwrap_or("?")
    );
    out.push_str(&format!("mended after the tool: {}\n", report["mended"]));
    out.push_str(&format!("fstab root: {}\n", v["fstab_root"].as_str().unwrap_or("none")));
    out.push_str(&format!("boot loader root=: {}\n", v["boot_roots"]));
    for k in v["initramfs"].as_array().into_iter().flatten() {
        out.push_str(&format!("kernel {}: initramfs virtio {}\n", k["kernel"].as_str().unwrap_or("?"), k["virtio"]));
    }
    out.push_str(&format!("verified: {}\n", if v["ok"] == true { "yes" } else { "NO" }));
    for p in v["problems"].as_array().into_iter().flatten() {
        out.push_str(&format!("  problem: {}\n", p.as_str().unwrap_or_default()));
    }
    if let Some(b) = report.get("boot_check") {
        out.push_str(&format!(
            "boot check: {} {} after {:.0} s ({}), console {}\n",
            b["outcome"].as_str().unwrap_or("?"),
            b["signal"].as_str().unwrap_or(""),
            b["seconds"].as_f64().unwrap_or_default(),
            b["accel"].as_str().unwrap_or("?"),
            b["console_log"].as_str().unwrap_or("?")
        ));
    }
    out
}

/// Whether the verified guest has an EFI boot loader in its `/boot/efi` copy.
fn efi_boot(work: &Path) -> bool {
    work.join("verify/boot/boot/efi/EFI").is_dir()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Overrides;

    #[test]
    fn the_one_shot_tools_carry_virtio_win() {
        let dir = tempfile::tempdir().unwrap();
        let overrides = Overrides { config_dir: Some(dir.path().to_owned()), flags: Vec::new() };
        let env = BTreeMap::from([("VIRTIO_WIN".to_owned(), dir.path().display().to_string())]);
        let config = Config::load(&overrides, &env).unwrap();
        assert_eq!(tools(&config).virtio_win.as_deref(), Some(dir.path()));
    }
}
