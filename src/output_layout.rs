//! Where results live: OUTPUT_DIR, what HyperSDK polls, and TEMP_DIR, where a job stages them
//! (on the same filesystem, so publishing is a rename). The one place that names result files
//! and the daemon's directories under OUTPUT_DIR and TEMP_DIR; it does no I/O (creating,
//! renaming and checking are `publish`'s).
//!
//! ```text
//! OUTPUT_DIR/
//!   <vm>.qcow2                          boot disk; published last, its appearance means success
//!   <vm>-<disk id>.qcow2                each other disk
//!   <vm>.xml                            libvirt domain XML
//!   <vm>.json                           job report
//!   <vm>.error                          failure result (instead of <vm>.qcow2)
//!   .hyper2kvm-superseded/<job>/<file>  earlier results moved aside by a newer job (kept)
//!   .hyper2kvm-unregistered/<job>/      disks and XML of a job whose libvirt registration failed
//!   .hyper2kvm-error-<job>/             stages a .error when TEMP_DIR cannot be used
//! TEMP_DIR/                             default OUTPUT_DIR/.hyper2kvm-tmp
//!   <job>.g<generation>/                one claim generation's staging directory
//! ```

use std::path::{Path, PathBuf};

/// TEMP_DIR's default directory under OUTPUT_DIR.
pub(crate) const DEFAULT_TEMP_DIR: &str = ".hyper2kvm-tmp";

/// Directory under OUTPUT_DIR where results replaced by a newer job are kept.
pub(crate) const SUPERSEDED_DIR: &str = ".hyper2kvm-superseded";

/// Directory under OUTPUT_DIR where the converted disks of a job whose libvirt registration
/// failed are kept (`<dir>/<job>/V.qcow2` …), out of the poller's sight.
pub(crate) const UNREGISTERED_DIR: &str = ".hyper2kvm-unregistered";

/// Paths of OUTPUT_DIR's results and of TEMP_DIR's staging directories.
#[derive(Debug, Clone)]
pub struct OutputLayout {
    dir: PathBuf,
    temp_dir: PathBuf,
}

impl OutputLayout {
    /// The layout of `dir` (OUTPUT_DIR) staging in `temp_dir` (TEMP_DIR).
    pub fn new(dir: &Path, temp_dir: &Path) -> OutputLayout {
        OutputLayout { dir: dir.to_owned(), temp_dir: temp_dir.to_owned() }
    }

    /// OUTPUT_DIR.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// TEMP_DIR.
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }

    /// The result file `name` (one of this module's file names) in OUTPUT_DIR.
    pub fn result(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `OUTPUT_DIR/V.qcow2`.
    pub fn boot_disk(&self, vm_name: &str) -> PathBuf {
        self.result(&boot_disk_file(vm_name))
    }

    /// `OUTPUT_DIR/V-<disk id>.qcow2`.
    pub fn data_disk(&self, vm_name: &str, disk_id: &str) -> PathBuf {
        self.result(&data_disk_file(vm_name, disk_id))
    }

    /// `OUTPUT_DIR/V.json`.
    pub fn report(&self, vm_name: &str) -> PathBuf {
        self.result(&report_file(vm_name))
    }

    /// `OUTPUT_DIR/V.error`.
    pub fn error(&self, vm_name: &str) -> PathBuf {
        self.result(&error_file(vm_name))
    }

    /// `OUTPUT_DIR/V.xml`.
    pub fn domain_xml(&self, vm_name: &str) -> PathBuf {
        self.result(&domain_xml_file(vm_name))
    }

    /// `OUTPUT_DIR/.hyper2kvm-superseded`, holding one directory per job that moved results.
    pub fn superseded_root(&self) -> PathBuf {
        self.dir.join(SUPERSEDED_DIR)
    }

    /// Where job `job_id` moves the earlier results it replaces.
    pub fn superseded(&self, job_id: &str) -> PathBuf {
        self.superseded_root().join(job_id)
    }

    /// Where job `job_id` keeps its disks when libvirt refused them.
    pub fn unregistered(&self, job_id: &str) -> PathBuf {
        self.dir.join(UNREGISTERED_DIR).join(job_id)
    }

    /// The staging directory of generation `generation` of job `job_id`, in TEMP_DIR.
    pub fn staging(&self, job_id: &str, generation: u64) -> PathBuf {
        self.temp_dir.join(staging_name(job_id, generation))
    }
}

/// Name of a claim generation's staging directory: `<job>.g<generation>`. Each generation
/// stages apart, so a daemon that took a job over never writes into its predecessor's files.
pub(crate) fn staging_name(job_id: &str, generation: u64) -> String {
    format!("{job_id}.g{generation}")
}

/// Whether `name`, in TEMP_DIR, is the staging directory of some generation of job `job_id`.
pub(crate) fn is_staging_of(name: &str, job_id: &str) -> bool {
    name.strip_prefix(job_id).is_some_and(|rest| rest.starts_with(".g"))
}

/// Name of the directory in OUTPUT_DIR where a job stages its `.error` when it could not
/// create its staging directory in TEMP_DIR, so the poller still gets an answer.
pub(crate) fn error_staging_name(job_id: &str) -> String {
    format!(".hyper2kvm-error-{job_id}")
}

/// File name of the boot disk result: `V.qcow2`. Its appearance means success.
pub fn boot_disk_file(vm_name: &str) -> String {
    format!("{vm_name}.qcow2")
}

/// File name of a non-boot disk result: `V-<disk id>.qcow2`.
pub fn data_disk_file(vm_name: &str, disk_id: &str) -> String {
    format!("{vm_name}-{disk_id}.qcow2")
}

/// File name of the failure result: `V.error`.
pub(crate) fn error_file(vm_name: &str) -> String {
    format!("{vm_name}.error")
}

/// File name of the job report: `V.json`.
pub(crate) fn report_file(vm_name: &str) -> String {
    format!("{vm_name}.json")
}

/// File name of the domain XML: `V.xml`.
pub(crate) fn domain_xml_file(vm_name: &str) -> String {
    format!("{vm_name}.xml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_the_names_hypersdk_polls_for() {
        let layout = OutputLayout::new(Path::new("/out"), Path::new("/out/.hyper2kvm-tmp"));
        assert_eq!(layout.boot_disk("web 1"), Path::new("/out/web 1.qcow2"));
        assert_eq!(layout.data_disk("web 1", "disk-1"), Path::new("/out/web 1-disk-1.qcow2"));
        assert_eq!(layout.error("web 1"), Path::new("/out/web 1.error"));
        assert_eq!(layout.report("web 1"), Path::new("/out/web 1.json"));
        assert_eq!(layout.domain_xml("web 1"), Path::new("/out/web 1.xml"));
        assert_eq!(layout.superseded("j1"), Path::new("/out/.hyper2kvm-superseded/j1"));
        assert_eq!(layout.unregistered("j1"), Path::new("/out/.hyper2kvm-unregistered/j1"));
        assert_eq!(layout.staging("j1", 3), Path::new("/out/.hyper2kvm-tmp/j1.g3"));
    }

    #[test]
    fn staging_directories_of_a_job_are_told_from_others() {
        assert!(is_staging_of(&staging_name("j1", 2), "j1"));
        assert!(!is_staging_of(&staging_name("j10", 2), "j1"));
        assert!(!is_staging_of("j1", "j1"));
    }
}
