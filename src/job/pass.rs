//! The job's one pass over each source: the manifest's `sha256:` checksum and an OVA's `.mf`
//! digests are taken from the bytes the conversion reads ([`Tap`]), not in a read of their
//! own, and checked once the disks of that file are converted — before anything is
//! published. Design and numbers: docs/DECISIONS.md, "One pass over the source".
//!
//! Sources the native engine does not read (qemu-img's formats) and the small `.ovf` of an
//! unpacked export keep their separate pass (`Job::verify_checksum`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::failures::{self, convert_failure, source_failure};
use super::{Job, Stage, Stop};
use crate::convert::native::tap_window;
use crate::image::tap::{Tap, TapError};
use crate::image::{ova, ImageError, ReadAt};
use crate::manifest::DiskSpec;
use crate::report::DiskReport;

/// One source file read through a [`Tap`], with what its digests must match.
pub(super) struct SourcePass {
    /// The file, as confined (the `source_path` of the disks read from it).
    path: PathBuf,
    /// The manifest's disk that named the file, for messages.
    disk: DiskSpec,
    tap: Arc<Tap>,
    /// Manifest disks whose `checksum` is this file's, with the digest each expects.
    checks: Vec<(DiskSpec, [u8; 32])>,
    /// The OVA whose `.mf` digests this pass takes (its members' ranges are watched).
    ova: Option<ova::OvaPackage>,
}

/// Every pass of a job.
#[derive(Default)]
pub(super) struct SourcePasses(Vec<SourcePass>);

impl SourcePasses {
    /// The tap the conversion of a disk read from `path` reads through, if any.
    pub(super) fn tap_for(&self, path: &Path) -> Option<Arc<Tap>> {
        self.0.iter().find(|p| p.path == path).map(|p| p.tap.clone())
    }

    fn pass_for(&mut self, path: &Path) -> Option<&mut SourcePass> {
        self.0.iter_mut().find(|p| p.path == path)
    }
}

impl Job<'_> {
    /// Opens (confined) the tap of a disk's source file whose `expected` checksum the
    /// conversion's pass will take, or adds the check to the file's tap already open.
    pub(super) fn checksum_in_pass(
        &self,
        passes: &mut SourcePasses,
        disk: &DiskSpec,
        path: &Path,
        expected: [u8; 32],
    ) -> Result<(), Stop> {
        if let Some(pass) = passes.pass_for(path) {
            pass.checks.push((disk.clone(), expected));
            return Ok(());
        }
        let tap = self.open_tap(disk, path)?;
        let checks = vec![(disk.clone(), expected)];
        passes.0.push(SourcePass { path: path.to_owned(), disk: disk.clone(), tap, checks, ova: None });
        Ok(())
    }

    /// The pass over an OVA: its checksum (when the manifest gives one) and its `.mf` digests
    /// (when it has a `.mf`: a listed member it lacks is refused now, before converting).
    pub(super) fn ova_in_pass(
        &self,
        passes: &mut SourcePasses,
        disk: &DiskSpec,
        path: &Path,
        package: &ova::OvaPackage,
    ) -> Result<(), Stop> {
        if disk.sha256.is_none() && package.manifest.is_none() {
            return Ok(());
        }
        let tap = self.open_tap(disk, path)?;
        if package.manifest.is_some() {
            let ranges = ova::manifest_ranges(package).map_err(|e| failures::ova_manifest_mismatch(path, &e))?;
            for (range, algorithms) in ranges {
                tap.watch(range, &algorithms).map_err(|e| convert_failure(Stage::Checksum, disk, path, e.into()))?;
            }
        }
        let checks = disk.sha256.map(|expected| (disk.clone(), expected)).into_iter().collect();
        passes.0.push(SourcePass {
            path: path.to_owned(),
            disk: disk.clone(),
            tap,
            checks,
            ova: Some(package.clone()),
        });
        Ok(())
    }

    fn open_tap(&self, disk: &DiskSpec, path: &Path) -> Result<Arc<Tap>, Stop> {
        let file = self.ctx.roots.open(path).map_err(|e| source_failure(disk, &e))?.file;
        let tap =
            Tap::new(file, path, tap_window()).map_err(|e| convert_failure(Stage::Checksum, disk, path, e.into()))?;
        Ok(Arc::new(tap))
    }

    /// Ends every pass once the disks are converted: reads what the conversions left unread,
    /// then checks the digests. A mismatch, or a file written to meanwhile, fails the job
    /// (with the `.error` a separate pass gave) before anything is published; the staged
    /// disks go with the staging directory. `disks` of a checked file are marked verified.
    pub(super) fn finish_passes(&self, passes: SourcePasses, disks: &mut [DiskReport]) -> Result<(), Stop> {
        for pass in passes.0 {
            let failed = |e| convert_failure(Stage::Checksum, &pass.disk, &pass.path, e);
            self.control.check().map_err(failed)?;
            let digests = pass.tap.finish().map_err(|e| match e {
                TapError::Changed { path } => Stop::from(failures::source_changed(&pass.disk.id, &path)),
                TapError::Image(e) => failed(e.into()),
            })?;
            tracing::info!(
                stage = Stage::Checksum.as_str(),
                source = %pass.path.display(),
                bytes = pass.tap.len(),
                own_reads = digests.own_reads,
                "source hashed in the conversion's pass"
            );
            for (disk, expected) in &pass.checks {
                if *expected != digests.sha256 {
                    return Err(failures::checksum_mismatch(disk, expected, &digests.sha256).into());
                }
            }
            if let Some(package) = &pass.ova {
                if package.manifest.is_some() {
                    let mut given = |range: &std::ops::Range<u64>, algorithms: &[ova::DigestAlgorithm]| {
                        digests
                            .of_range(range, algorithms)
                            .map(<[String]>::to_vec)
                            .ok_or_else(|| ImageError::Internal(format!("no digest was taken of bytes {range:?}")))
                    };
                    ova::verify_manifest_by(package, &mut given)
                        .map_err(|e| failures::ova_manifest_mismatch(&pass.path, &e))?;
                }
            }
            if pass.ova.is_none() {
                disks.iter_mut().filter(|d| d.source_path == pass.path).for_each(|d| d.source_checksum_verified = true);
            }
        }
        Ok(())
    }
}
