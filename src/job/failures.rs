//! Every `.error` first line a job writes, and the `.error` file's text around it.
//!
//! Owns the operator-facing sentences of the job's own stages: one plain sentence a person can
//! act on, then the causes. Every string literal in this file (outside the tests) that ends
//! with a full stop is such a first line, and the test below checks each against the table of
//! `.error` first lines in docs/OPERATIONS.md, so a sentence added here without a row there
//! fails the build's tests. What it must not do: decide anything about the job (which stage
//! failed, whether to retry) or touch the filesystem; it only words what it is given.
//! Sentences of other modules that reach an `.error` (the manifest's own checks, libvirt's
//! errors) are worded where they are found.

use std::path::Path;

use super::{Failure, Stage, Stop};
use crate::checksum;
use crate::convert::ConvertError;
use crate::guest::{BootOutcome, BootReport, GuestError};
use crate::host::Identity;
use crate::image::ImageError;
use crate::libvirt::LibvirtError;
use crate::manifest::DiskSpec;
use crate::source::SourceError;

/// The `.error` file: one sentence a person can act on, then the details.
pub(super) fn error_text(identity: &Identity, job_id: &str, failure: &Failure, record_path: &Path) -> String {
    let mut text = format!("{}\njob: {job_id}\nstage: {}\n", failure.summary, failure.stage.as_str());
    text.push_str(&format!("host: {}\n", identity.host));
    if let Some(instance) = &identity.instance {
        text.push_str(&format!("instance: {instance}\n"));
    }
    for cause in &failure.causes {
        text.push_str(&format!("cause: {cause}\n"));
    }
    text.push_str(&format!("record: {}\n", record_path.display()));
    text
}

/// A panic in the job's work: a bug, whatever the input.
pub(super) fn internal(message: &str) -> Failure {
    Failure::new(
        Stage::Internal,
        "hyper2kvm hit an internal error (a bug) on this job; report it with the lines below and the job's record.",
    )
    .because(format!("panic: {message}"))
}

/// TEMP_DIR could not take the job's staging directory.
pub(super) fn staging_failure(temp_dir: &Path, error: std::io::Error) -> Stop {
    Failure::new(
        Stage::Publish,
        format!(
            "Could not create a staging directory in TEMP_DIR ({}); check that it exists and is writable.",
            temp_dir.display()
        ),
    )
    .because(error)
    .into()
}

/// OUTPUT_DIR could not take a result.
pub(super) fn publish_failure(out: &Path, error: std::io::Error) -> Stop {
    Failure::new(
        Stage::Publish,
        format!(
            "Could not publish the results in OUTPUT_DIR ({}); check that it is writable and has space.",
            out.display()
        ),
    )
    .because(error)
    .into()
}

/// An earlier job's results for this VM could not be moved out of the poller's sight.
pub(super) fn move_aside_failure(vm_name: &str, out: &Path, error: std::io::Error) -> Failure {
    Failure::new(
        Stage::Publish,
        format!(
            "Could not move the earlier results of {vm_name} aside in OUTPUT_DIR ({}); check that it is writable.",
            out.display()
        ),
    )
    .because(error)
}

/// A result name of this job is another VM's: `live` when that VM's job is converting now
/// rather than published; `aside` where this job's own `V.qcow2` was moved, if it was.
pub(super) fn taken_name(name: &str, vm_name: &str, other: &str, live: bool, aside: Option<&Path>) -> Failure {
    let summary = if live {
        format!(
            "Result file {name} of VM {vm_name} will be a result of VM {other}, which another job is converting now; rename one of the two VMs, or the disk, so that their result files differ, and submit the manifest again."
        )
    } else {
        format!(
            "Result file {name} of VM {vm_name} is a result of VM {other} ({other}.json lists it); rename one of the two VMs, or the disk, so that their result files differ, and submit the manifest again."
        )
    };
    let failure = Failure::new(Stage::Manifest, summary);
    match aside {
        Some(aside) => failure.because(format!(
            "{name} was moved to {} so that it cannot answer this job's poller; VM {other}'s domain may need it back",
            aside.display()
        )),
        None => failure,
    }
}

/// A disk id of the manifest is also the id of a disk inside one of its OVAs.
pub(super) fn ova_disk_id_clash(id: &str) -> Failure {
    Failure::new(
        Stage::Manifest,
        format!("Disk id {id:?} is used both by the manifest and by a disk inside an OVA; rename the manifest's disk."),
    )
}

/// The disk's source file itself refused by confinement; nothing of it was read.
pub(super) fn source_failure(disk: &DiskSpec, error: &SourceError) -> Failure {
    let path = disk.local_path.display();
    let summary = match error {
        SourceError::Missing { .. } => format!(
            "Disk {} source file {path} does not exist; check that the export finished and that the path is visible on this host.",
            disk.id
        ),
        SourceError::Outside { roots, .. } => format!(
            "Disk {} is at {path}, which is outside SOURCE_ROOTS ({roots}); move the export under one of them or add its directory to SOURCE_ROOTS.",
            disk.id,
        ),
        SourceError::Results { area, .. } => format!(
            "Disk {} is at {path}, which is inside {area}, where hyper2kvm keeps results and queue state; point local_path at the exported disk, not at a converted one.",
            disk.id
        ),
        SourceError::NotAFile { .. } => format!("Disk {} source {path} is not a regular file; point local_path at the disk image file.", disk.id),
        SourceError::Unreadable { .. } => format!("Disk {} source file {path} cannot be read; check its permissions and the mount.", disk.id),
    };
    Failure::new(Stage::Source, summary).because(error)
}

/// A file the disk names (extent, parent, backing or data file) refused by confinement, at
/// `stage`; nothing of it was read.
pub(super) fn reference_failure(stage: Stage, disk: &DiskSpec, error: &SourceError) -> Failure {
    let referenced = error.path().display();
    let summary = match error {
        SourceError::Missing { .. } => format!(
            "Disk {} ({}) needs {referenced}, which does not exist; copy every extent and parent disk of the export.",
            disk.id,
            disk.local_path.display(),
        ),
        SourceError::Results { area, .. } => format!(
            "Disk {} ({}) refers to {referenced}, which is inside {area}, where hyper2kvm keeps results and queue state; export the disk again with its own extents and parents.",
            disk.id,
            disk.local_path.display(),
        ),
        SourceError::NotAFile { .. } => format!(
            "Disk {} ({}) refers to {referenced}, which is not a regular file; keep every extent and parent disk of the export as plain files.",
            disk.id,
            disk.local_path.display(),
        ),
        SourceError::Outside { roots, .. } => format!(
            "Disk {} ({}) refers to {referenced}, which is outside SOURCE_ROOTS ({roots}); keep every extent and parent disk of the export under SOURCE_ROOTS.",
            disk.id,
            disk.local_path.display(),
        ),
        SourceError::Unreadable { .. } => format!(
            "Disk {} ({}) refers to {referenced}, which cannot be read; check its permissions and the mount.",
            disk.id,
            disk.local_path.display(),
        ),
    };
    Failure::new(stage, summary).because(error)
}

/// A conversion (or inspection, or hashing) of the disk at `path` that did not succeed; a
/// cancellation or a lost lock is no failure but a [`Stop`] of its own.
pub(super) fn convert_failure(stage: Stage, disk: &DiskSpec, path: &Path, error: ConvertError) -> Stop {
    let format = disk.source_format.as_str();
    let summary = match &error {
        ConvertError::Source(refused) if refused.path() == path || refused.path() == disk.local_path => {
            return source_failure(disk, refused).into()
        }
        ConvertError::Source(refused) => return reference_failure(stage, disk, refused).into(),
        ConvertError::Cancelled => return Stop::Cancelled,
        ConvertError::LockLost => return Stop::LostLock,
        ConvertError::TimedOut => {
            "The job took longer than CONVERSION_TIMEOUT; raise CONVERSION_TIMEOUT or check the speed of the source and output storage.".to_owned()
        }
        ConvertError::Corrupt(detail) => {
            format!("Disk {} ({}) is not a readable {format} image ({detail}); export it again.", disk.id, path.display())
        }
        ConvertError::Unsupported(detail) => {
            format!("Disk {} ({}) cannot be converted: {detail}.", disk.id, path.display())
        }
        ConvertError::NoSpace(_) => format!(
            "The output filesystem ran out of space while converting disk {}; free space in OUTPUT_DIR and submit the manifest again.",
            disk.id
        ),
        ConvertError::Spawn { tool, .. } => format!("{tool} could not be run; install it (package qemu-utils) on this host."),
        ConvertError::Failed(_) | ConvertError::Io(_) => {
            format!("Disk {} ({}) could not be converted; see the causes below.", disk.id, path.display())
        }
    };
    Stop::Failed(Failure::new(stage, summary).because(error))
}

/// The disk's bytes are not those its manifest's checksum names.
pub(super) fn checksum_mismatch(disk: &DiskSpec, expected: &[u8; 32], actual: &[u8; 32]) -> Failure {
    Failure::new(
        Stage::Checksum,
        format!(
            "Disk {} does not match its checksum (expected {}, found {}); the export is damaged or incomplete, export it again.",
            disk.id,
            checksum::format_sha256(expected),
            checksum::format_sha256(actual)
        ),
    )
}

/// The file at `path` that disk `disk_id` is read from was written to while the job read it
/// (its size, mtime or ctime moved between the start of the conversion and the end of the
/// pass that hashed it): what was converted may not be what was hashed.
pub(super) fn source_changed(disk_id: &str, path: &Path) -> Failure {
    Failure::new(
        Stage::Checksum,
        format!(
            "Disk {disk_id} source file {} changed while it was being converted; submit the manifest again once the export is complete and left alone.",
            path.display()
        ),
    )
}

/// The OVA at `path` cannot be read as one.
pub(super) fn ova_unreadable(disk: &DiskSpec, path: &Path, error: &ImageError) -> Failure {
    Failure::new(
        Stage::Inspect,
        format!("Disk {} ({}) is not a readable OVA ({error}); export it again.", disk.id, path.display()),
    )
}

/// The OVA at `path` does not match its own `.mf`.
pub(super) fn ova_manifest_mismatch(path: &Path, error: &ImageError) -> Failure {
    Failure::new(
        Stage::Checksum,
        format!(
            "The OVA {} does not match its .mf manifest ({error}); the export is damaged, export it again.",
            path.display()
        ),
    )
}

/// The OVA at `path` describes no disk with a file behind it.
pub(super) fn ova_without_disks(path: &Path) -> Failure {
    Failure::new(
        Stage::Inspect,
        format!("The OVA {} holds no disk to convert; check that the export included its disks.", path.display()),
    )
}

/// The unpacked OVF export at `path` (its descriptor) cannot be read as one.
pub(super) fn ovf_unreadable(stage: Stage, disk: &DiskSpec, path: &Path, error: &ImageError) -> Failure {
    Failure::new(
        stage,
        format!("Disk {} ({}) is not a readable OVF export ({error}); export it again.", disk.id, path.display()),
    )
}

/// The unpacked OVF export at `path` does not match its own `.mf`.
pub(super) fn ovf_manifest_mismatch(path: &Path, error: &ImageError) -> Failure {
    Failure::new(
        Stage::Checksum,
        format!(
            "The OVF export {} does not match its .mf manifest ({error}); the export is damaged, export it again.",
            path.display()
        ),
    )
}

/// The unpacked OVF export at `path` describes no disk with a file behind it.
pub(super) fn ovf_without_disks(path: &Path) -> Failure {
    Failure::new(
        Stage::Inspect,
        format!("The OVF export {} has no disk to convert; check that the export included its disks.", path.display()),
    )
}

/// libvirt refused the registration: its own sentence, then where the converted disks
/// (`names`) were kept in `dir`, or why they could not be.
pub(super) fn unregistered(error: &LibvirtError, kept: &std::io::Result<()>, names: &[&str], dir: &Path) -> Failure {
    let summary = match kept {
        Ok(()) => {
            format!("{} The converted disks ({}) are kept in {}.", sentence(error), names.join(", "), dir.display())
        }
        Err(e) => format!(
            "{} Keeping the converted disks in {} failed ({e}); submit the manifest again once libvirt is fixed.",
            sentence(error),
            dir.display()
        ),
    };
    let mut failure = Failure::new(Stage::Libvirt, summary);
    failure.causes = error.causes();
    failure
}

/// A guest tool's error (`GuestError`, whose first line is already the sentence): the first
/// line is the summary, the lines after it (a log's last lines) the causes. The logs under
/// `work` (the staging directory's `guest/`) are kept with the job's record.
pub(super) fn guest_failure(stage: Stage, error: &GuestError, work: &Path) -> Stop {
    let text = error.to_string();
    let mut lines = text.lines();
    let mut failure = Failure::new(stage, lines.next().unwrap_or_default().trim_end_matches(':'));
    failure.causes = lines.map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect();
    failure.logs = Some(work.to_owned());
    failure.into()
}

/// CONVERSION_TIMEOUT ran out before a guest step could start.
pub(super) fn guest_time_out() -> Stop {
    Failure::new(
        Stage::Guest,
        "The job took longer than CONVERSION_TIMEOUT before its guest stage could finish; raise CONVERSION_TIMEOUT (fixing a guest takes minutes without KVM).",
    )
    .into()
}

/// `fix.backup`: a copy of a staged disk could not be made.
pub(super) fn backup_failed(path: &Path, error: std::io::Error) -> Stop {
    Failure::new(
        Stage::Guest,
        format!(
            "Could not back up the staged disks before fixing the guest ({}); check the space in TEMP_DIR, or leave pipeline.fix.backup off.",
            path.display()
        ),
    )
    .because(error)
    .into()
}

/// The fix ran, and the guest's own files still do not agree with virtio disks.
pub(super) fn not_repaired(problems: &[String], log: &Path, work: &Path) -> Stop {
    let mut failure = Failure::new(
        Stage::Guest,
        format!(
            "The fixed guest would still not boot on virtio ({}); read the fix log {} and docs/GUEST.md.",
            crate::guest::capped(problems, 3),
            log.display()
        ),
    );
    failure.causes = problems.iter().take(10).cloned().collect();
    failure.logs = Some(work.to_owned());
    failure.into()
}

/// BOOT_CHECK=require and the guest did not reach a login prompt.
pub(super) fn boot_failed(booted: &BootReport, work: &Path) -> Stop {
    let what = match &booted.outcome {
        BootOutcome::Failed(sign) => format!("its console showed {sign:?}"),
        _ => format!("no login prompt and no network packet within {:.0} s", booted.seconds),
    };
    let mut failure = Failure::new(
        Stage::Validate,
        format!(
            "The guest did not boot in the boot check ({what}); its console is {}, fix the guest (pipeline.fix) or set BOOT_CHECK=warn.",
            booted.console_log.display()
        ),
    );
    failure.causes = booted.console_tail.iter().rev().take(8).rev().map(|l| format!("console: {l}")).collect();
    failure.logs = Some(work.to_owned());
    failure.into()
}

/// `pipeline.validate.check_image_integrity`: qemu-img check could not judge an output.
pub(super) fn integrity_unchecked(output: &str, error: &GuestError, work: &Path) -> Stop {
    let mut failure = Failure::new(
        Stage::Validate,
        format!("qemu-img check could not be run on the converted disk {output}; install qemu-utils on this host."),
    )
    .because(error);
    failure.logs = Some(work.to_owned());
    failure.into()
}

/// `pipeline.validate.check_image_integrity`: qemu-img check found the output damaged.
pub(super) fn integrity_failed(output: &str, result: &serde_json::Value) -> Stop {
    let count = |key: &str| result.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Failure::new(
        Stage::Validate,
        format!(
            "The converted disk {output} failed qemu-img check ({} corruptions, {} check errors); the output is damaged, submit the manifest again and report it if it happens again.",
            count("corruptions"),
            count("check-errors")
        ),
    )
    .because(result.to_string().chars().take(500).collect::<String>())
    .into()
}

/// An error's text as a sentence that another may follow.
fn sentence(error: &impl std::fmt::Display) -> String {
    let text = error.to_string();
    if text.ends_with(['.', '?', '!']) {
        text
    } else {
        format!("{text}.")
    }
}

#[cfg(test)]
mod tests {
    //! The sentences of this file against docs/OPERATIONS.md's table of `.error` first lines.
    //!
    //! A template is a string literal of this file (outside the tests) ending with a full
    //! stop, its `{…}` placeholders read as "any text". A row of the table documents it when
    //! one of the row's backticked first lines matches it, read as a pattern in which `…` and
    //! `<…>` are "any text" and whose end is abridged, and when that first line holds the
    //! template's fixed pieces before its first `;`, word for word and in order.

    const DOC: &str = include_str!("../../docs/OPERATIONS.md");
    const SOURCE: &str = include_str!("failures.rs");
    const ANY: char = '\u{0}';

    /// The string literals of this file's code (not its comments or tests) that end a sentence.
    fn templates() -> Vec<String> {
        let code = SOURCE.split("#[cfg(test)]").next().unwrap_or_default();
        let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let mut literals = Vec::new();
        let mut chars = code.chars();
        while let Some(c) = chars.next() {
            if c != '"' {
                continue;
            }
            let mut literal = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => literal.extend(chars.next()),
                    '"' => break,
                    c => literal.push(c),
                }
            }
            literals.push(literal);
        }
        literals.into_iter().filter(|l| l.trim_end().ends_with('.')).collect()
    }

    /// `text` with each `{…}` placeholder replaced by [`ANY`].
    fn pattern_of_template(text: &str) -> Vec<char> {
        let mut out = Vec::new();
        let mut depth = 0;
        for c in text.chars() {
            match c {
                '{' => {
                    depth += 1;
                    out.push(ANY);
                }
                '}' => depth -= 1,
                c if depth == 0 => out.push(c),
                _ => {}
            }
        }
        out
    }

    /// `text` with each `…` and `<…>` replaced by [`ANY`], and an abridged end.
    fn pattern_of_doc(text: &str) -> Vec<char> {
        let mut out = Vec::new();
        let mut in_angle = false;
        // The spaces around an ellipsis belong to it: `does not exist …` abridges `does not
        // exist; check …` too.
        let any = |out: &mut Vec<char>| {
            while out.last() == Some(&' ') {
                out.pop();
            }
            out.push(ANY);
        };
        for c in text.chars() {
            match c {
                '…' => any(&mut out),
                '<' => {
                    in_angle = true;
                    any(&mut out);
                }
                '>' if in_angle => in_angle = false,
                ' ' if out.last() == Some(&ANY) => {}
                c if !in_angle => out.push(c),
                _ => {}
            }
        }
        any(&mut out);
        out
    }

    /// Whether some text is an instance of both patterns.
    fn overlap(a: &[char], b: &[char]) -> bool {
        let mut memo = vec![None; (a.len() + 1) * (b.len() + 1)];
        fn go(a: &[char], b: &[char], i: usize, j: usize, memo: &mut [Option<bool>]) -> bool {
            let key = i * (b.len() + 1) + j;
            if let Some(known) = memo[key] {
                return known;
            }
            let result = match (a.get(i), b.get(j)) {
                (None, None) => true,
                (Some(&ANY), _) => go(a, b, i + 1, j, memo) || (j < b.len() && go(a, b, i, j + 1, memo)),
                (_, Some(&ANY)) => go(a, b, i, j + 1, memo) || (i < a.len() && go(a, b, i + 1, j, memo)),
                (Some(x), Some(y)) => x == y && go(a, b, i + 1, j + 1, memo),
                _ => false,
            };
            memo[key] = Some(result);
            result
        }
        go(a, b, 0, 0, &mut memo)
    }

    /// The template's fixed pieces before its first `;`, without their edge punctuation.
    fn key_pieces(template: &str) -> Vec<String> {
        let head = template.split(';').next().unwrap_or_default();
        let pattern: String = pattern_of_template(head).into_iter().collect();
        pattern
            .split(ANY)
            .map(|piece| piece.trim_matches(|c: char| !c.is_alphanumeric()))
            .filter(|piece| !piece.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Whether `line` holds every piece, in order.
    fn holds_in_order(line: &str, pieces: &[String]) -> bool {
        let mut rest = line;
        pieces.iter().all(|piece| match rest.find(piece.as_str()) {
            Some(at) => {
                rest = &rest[at + piece.len()..];
                true
            }
            None => false,
        })
    }

    /// The backticked first lines of the rows of the `.error` table.
    fn documented_first_lines() -> Vec<&'static str> {
        let section = DOC.split("### A job failed: `<vm_name>.error`").nth(1).unwrap_or_default();
        let section = section.split("\n### ").next().unwrap_or_default();
        section
            .lines()
            .filter(|line| line.starts_with('|'))
            .filter_map(|row| row.split('|').nth(2))
            .flat_map(|cell| cell.split('`').skip(1).step_by(2))
            .collect()
    }

    fn undocumented(templates: &[String], documented: &[&str]) -> Vec<String> {
        templates
            .iter()
            .filter(|template| {
                let pieces = key_pieces(template);
                let pattern = pattern_of_template(template);
                !documented.iter().any(|line| holds_in_order(line, &pieces) && overlap(&pattern, &pattern_of_doc(line)))
            })
            .cloned()
            .collect()
    }

    #[test]
    fn every_error_first_line_here_has_a_row_in_operations_md() {
        let templates = templates();
        // As many as this file words today: fewer means the reading of the file broke.
        assert!(templates.len() >= 30, "found only {} sentences: {templates:#?}", templates.len());
        let documented = documented_first_lines();
        assert!(documented.len() >= 40, "found only {} documented first lines", documented.len());
        let missing = undocumented(&templates, &documented);
        assert!(
            missing.is_empty(),
            "add a row to the table of .error first lines in docs/OPERATIONS.md for: {missing:#?}"
        );
    }

    #[test]
    fn a_sentence_without_a_row_is_found() {
        let documented = documented_first_lines();
        let new = ["Disk {} ({}) is haunted; call an exorcist.".to_owned()];
        assert_eq!(undocumented(&new, &documented), new);
        // A documented sentence with a changed ending is found too.
        let changed = ["Disk {} source file {path} does not exist; check the moon phase.".to_owned()];
        assert!(undocumented(&changed, &documented).is_empty(), "the doc abridges after the key phrase");
        let reworded = ["Disk {} source file {path} is absent; check the mount.".to_owned()];
        assert_eq!(undocumented(&reworded, &documented), reworded);
    }
}
