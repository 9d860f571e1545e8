//! The stages of a job, as methods of [`Job`], in the order [`Job::execute`] runs them:
//! `prepare` (earlier results aside, the staging directory), then the manifest's parse,
//! `expand_ova_disks`, `move_aside_stale`, `prepare_sources` (confine, the checksum — in the
//! conversion's pass (`pass.rs`) or `verify_checksum` — and inspect), `convert_disk` for each
//! disk and `finish_passes`, the guest stage (`guest.rs`), `register_domain`
//! (LIBVIRT_INTEGRATION), `new_report` and `publish_results`.
//!
//! What it must not do: end the job. A stage returns its result or a [`Stop`]; recording,
//! publishing an `.error`, releasing or abandoning the claim are `mod.rs`'s, and every
//! sentence a person reads is `failures.rs`'s.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tracing::{info, warn};

use super::failures::{self, convert_failure, reference_failure, source_failure};
use super::pass::SourcePasses;
use super::{Failure, Job, Stage, Stop};
use crate::checksum;
use crate::config::{Config, DEFAULT_COMPRESS_LEVEL};
use crate::convert::qemu_img::{OutputCheck, QemuImg};
use crate::convert::{Compression, ConversionRequest, ConvertError, Converter};
use crate::guest::GuestInfo;
use crate::image::tap::Tap;
use crate::image::vmdk;
use crate::image::{ova, ImageError, SourceInfo};
use crate::libvirt::domain_xml::{self, Acceleration, Devices, DomainDisk, NetworkAttachment};
use crate::libvirt::pool::{DefaultPool, DiskFile, DISK_MODE};
use crate::libvirt::register::{self, Registration, Request};
use crate::libvirt::{Connection, LibvirtError};
use crate::manifest::{self, DiskSpec, DiskType, JobSpec, SourceFormat};
use crate::names;
use crate::output_layout::{self, OutputLayout};
use crate::publish::{self, Staging};
use crate::queue::{Claim, Layout};
use crate::report::{DiskReport, GuestReport, Report};

impl Job<'_> {
    /// Moves an earlier job's results for this VM aside, so that they cannot answer this job's
    /// poller whatever happens next, and creates the job's staging directory.
    pub(super) fn prepare(&self) -> Result<Staging, Stop> {
        let Job { ctx, claim, .. } = self;
        if self.safe_name {
            self.move_aside_stale(&self.vm_name, &[])?;
        }
        Staging::create(&ctx.config.temp_dir, &output_layout::staging_name(claim.job_id(), claim.record().generation))
            .map_err(|e| failures::staging_failure(&ctx.config.temp_dir, e))
    }

    /// Everything from the manifest's parse to the published results: the job's stages in order.
    pub(super) fn execute(&self, staging: &Staging) -> Result<(JobSpec, Report), Stop> {
        let Job { ctx, manifest, control, events, .. } = self;
        let started_at = Utc::now();
        let clock = Instant::now();
        let (spec, pipeline, mut warnings) =
            manifest.parse_job().map_err(|e| Failure::new(Stage::Manifest, e.to_string()))?;
        for warning in &warnings {
            warn!(stage = Stage::Manifest.as_str(), "{warning}");
            events.append(Stage::Manifest.as_str(), warning, None);
        }
        let mut passes = SourcePasses::default();
        let spec = self.expand_ova_disks(spec, &mut passes)?;
        let disk_ids: Vec<&str> = spec.disks.iter().map(|d| d.id.as_str()).collect();
        self.move_aside_stale(&spec.vm_name, &disk_ids)?;

        let sources = self.prepare_sources(&spec, &mut warnings, &mut passes)?;

        let compression = compression_for(&ctx.config, &spec, &mut warnings, ctx.converter.as_ref());
        let mut disks = Vec::with_capacity(sources.len());
        for (index, source) in sources.iter().enumerate() {
            events.append(
                Stage::Convert.as_str(),
                &format!("converting {}", source.disk.id),
                control.progress.percent(),
            );
            // Per disk, so that the daemon's byte counters add up the whole job.
            control.progress.start_disk(source.info.virtual_size);
            let tap = passes.tap_for(&source.path).filter(|_| ctx.converter.reads_natively(source.disk.source_format));
            let convert = || self.convert_disk(&spec, index, source, staging, compression, tap.clone());
            disks.push(crate::events::with_progress_events(events, control, &source.disk.id, convert)?);
        }
        self.finish_passes(passes, &mut disks)?;

        let images: Vec<PathBuf> = staged_disks(&spec, staging).into_iter().map(|d| d.staged).collect();
        let guest = self.guest_stage(&spec, &pipeline, &images, staging, &mut warnings)?;
        if guest.report.fix.is_some() {
            // The fix changed the staged disks in place: V.json names what is published.
            self.refresh_outputs(&spec, &mut disks, &images)?;
        }
        let info = guest.info.as_ref();
        let registration =
            if ctx.config.libvirt_integration { Some(self.register_domain(&spec, staging, info)?) } else { None };
        let xml = match &registration {
            Some(registration) => registration.xml.clone(),
            None => build_domain_xml(&ctx.config, &spec, &output_paths(&ctx.config, &spec), Acceleration::Kvm, info),
        };
        let mut report = self.new_report(&spec, disks, warnings, registration.as_ref(), info);
        report.guest = guest.report;
        report.started_at = started_at;
        report.seconds = clock.elapsed().as_secs_f64();
        events.append(Stage::Publish.as_str(), "publishing", Some(100.0));
        self.publish_results(&spec, &xml, &report, staging)?;
        if let Some(warning) = registration.as_ref().and_then(Registration::after_publish) {
            warn!(stage = Stage::Libvirt.as_str(), "{warning}");
        }
        Ok((spec, report))
    }

    /// Replaces each `source_format: "ova"` disk by the archive's disks (the first in its place,
    /// so an OVA that is the boot disk gives `V.qcow2`; the others `V-<ovf disk id>.qcow2`), after
    /// confining the OVA, verifying its checksum and its `.mf`. OVF hardware fills whatever the
    /// manifest's `vm` block and `nics` leave out. A `local_path` that is an OVF descriptor (an
    /// unpacked export) is replaced by its disk files instead ([`Job::open_verified_ovf`]).
    fn expand_ova_disks(&self, mut spec: JobSpec, passes: &mut SourcePasses) -> Result<JobSpec, Stop> {
        let Job { ctx, events, .. } = self;
        if !spec.disks.iter().any(|d| d.source_format == SourceFormat::Ova) {
            return Ok(spec);
        }
        let mut disks = Vec::new();
        for disk in std::mem::take(&mut spec.disks) {
            if disk.source_format != SourceFormat::Ova {
                disks.push(disk);
                continue;
            }
            let path = ctx.roots.confine(&disk.local_path).map_err(|e| source_failure(&disk, &e))?;
            let in_pass = ctx.converter.reads_natively(SourceFormat::Ova) && !ova::unpacked::is_ovf_descriptor(&path);
            if let (Some(expected), false) = (disk.sha256, in_pass) {
                events.append(Stage::Checksum.as_str(), &format!("verifying {}", disk.id), None);
                self.verify_checksum(&disk, &path, &expected)?;
            }
            if ova::unpacked::is_ovf_descriptor(&path) {
                let package = self.open_verified_ovf(&disk, &path)?;
                fill_hardware(&mut spec, &package.hardware);
                disks.extend(package.disks.into_iter().enumerate().map(|(index, file)| DiskSpec {
                    id: file.disk_id,
                    source_format: file.source_format,
                    local_path: file.path,
                    bytes: None,
                    sha256: None,
                    boot_order_hint: disk.boot_order_hint,
                    label: Some(file.ovf_disk_id),
                    disk_type: if index == 0 { disk.disk_type } else { DiskType::Data },
                    ova_disk: None,
                }));
                continue;
            }
            let package = if in_pass {
                let package = open_ova(&disk, &path)?;
                self.ova_in_pass(passes, &disk, &path, &package)?;
                package
            } else {
                open_verified_ova(&disk, &path)?
            };
            fill_hardware(&mut spec, &package.hardware);
            for (index, member) in package.disks.iter().enumerate() {
                disks.push(DiskSpec {
                    id: member.disk_id.clone(),
                    source_format: SourceFormat::Ova,
                    local_path: disk.local_path.clone(),
                    bytes: None,
                    sha256: None,
                    boot_order_hint: disk.boot_order_hint,
                    label: Some(member.ovf_disk_id.clone()),
                    disk_type: if index == 0 { disk.disk_type } else { DiskType::Data },
                    ova_disk: Some(index),
                });
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(clash) = disks.iter().find(|d| !seen.insert(d.id.clone())) {
            return Err(failures::ova_disk_id_clash(&clash.id).into());
        }
        for disk in &disks {
            manifest::check_result_name(&spec.vm_name, &disk.id)
                .map_err(|e| Failure::new(Stage::Manifest, e.to_string()))?;
        }
        spec.disks = disks;
        Ok(spec)
    }

    /// An unpacked OVF export (`local_path` is its `.ovf`): every file it reads besides the
    /// descriptor — the `.mf`, the disks, what the `.mf` lists — confined to SOURCE_ROOTS before
    /// it is opened, the `.mf` verified. A refused file fails the job as any refused extent does.
    fn open_verified_ovf(&self, disk: &DiskSpec, path: &Path) -> Result<ova::unpacked::UnpackedOvf, Stop> {
        let ctx = self.ctx;
        let refused = std::cell::RefCell::new(None);
        let confine = |file: &Path| {
            ctx.roots.confine(file).map_err(|e| {
                let message = ImageError::Corrupt(e.to_string());
                refused.replace(Some((file.to_owned(), e)));
                message
            })
        };
        let failure = |stage: Stage, e: ImageError| -> Stop {
            if let Some((_, e)) = refused.take() {
                return reference_failure(stage, disk, &e).into();
            }
            match stage {
                Stage::Checksum => failures::ovf_manifest_mismatch(path, &e).into(),
                _ => failures::ovf_unreadable(stage, disk, path, &e).into(),
            }
        };
        let limits = ova::Limits::default();
        let package = ova::unpacked::open(path, &limits, &confine).map_err(|e| failure(Stage::Inspect, e))?;
        if package.manifest.is_some() {
            ova::unpacked::verify_manifest(&package, &confine).map_err(|e| failure(Stage::Checksum, e))?;
        }
        if package.disks.is_empty() {
            return Err(failures::ovf_without_disks(path).into());
        }
        Ok(package)
    }

    /// Moves the results of an earlier job for this VM (including this job's own disk names) out
    /// of the poller's sight. Fenced before each move: a daemon frozen since its claim must not
    /// move aside what the job's new owner has published meanwhile. `disk_ids` are the job's disks,
    /// boot disk first (none before the manifest is parsed).
    ///
    /// A result name of another VM (VM `web`'s disk `disk-1` and VM `web-disk-1` share
    /// `web-disk-1.qcow2`) is never reused: the job is refused (docs/DECISIONS.md). Such a file is
    /// left in place, unless it is this job's own `V.qcow2`, which HyperSDK checks before
    /// `V.error` and would take for this job's success: that one is moved aside too.
    fn move_aside_stale(&self, vm_name: &str, disk_ids: &[&str]) -> Result<(), Stop> {
        let Job { ctx, claim, .. } = self;
        let boot = output_layout::boot_disk_file(vm_name);
        let mut stale = vec![
            boot.clone(),
            output_layout::error_file(vm_name),
            output_layout::report_file(vm_name),
            output_layout::domain_xml_file(vm_name),
        ];
        stale.extend(disk_ids.iter().map(|id| output_layout::data_disk_file(vm_name, id)));
        let layout = ctx.config.output_layout();
        let out = layout.dir();
        let taken = self.taken_name(vm_name, disk_ids);
        let failure = |e| failures::move_aside_failure(vm_name, out, e);
        let mut moved = 0;
        // Only files that are there: each move costs a fence (a lock round trip on NFS).
        let movable = stale.iter().filter(|name| **name == boot || taken.as_ref().is_none_or(|t| t.name != **name));
        for name in movable.filter(|name| std::fs::symlink_metadata(layout.result(name)).is_ok()) {
            self.fence()?;
            moved += usize::from(publish::move_aside(&layout, name, claim.job_id()).map_err(failure)?.is_some());
        }
        if moved > 0 {
            info!(stage = "claim", moved, "moved earlier results aside");
        }
        match taken {
            Some(taken) => Err(Stop::Failed(taken.refusal(&layout, claim, vm_name))),
            None => Ok(()),
        }
    }

    /// The first name this job would publish (`V.qcow2`, `V-<id>.qcow2` of each data disk) that
    /// another VM's published report lists or, failing that, that an older claim of another VM —
    /// a job converting now, which has not published its report yet — will publish.
    fn taken_name(&self, vm_name: &str, disk_ids: &[&str]) -> Option<TakenName> {
        let ctx = self.ctx;
        let publishes: Vec<String> = std::iter::once(output_layout::boot_disk_file(vm_name))
            .chain(disk_ids.iter().skip(1).map(|id| output_layout::data_disk_file(vm_name, id)))
            .collect();
        let layout = ctx.config.output_layout();
        let published = publishes.iter().find_map(|name| {
            let other_vm = names::other_vms_result(&layout, name, vm_name)?;
            Some(TakenName { name: name.clone(), other_vm, live: false })
        });
        published.or_else(|| self.older_claim_publishing(vm_name, &publishes))
    }

    /// An older claim (by job id, which every daemon orders alike, so that of two colliding jobs
    /// exactly one is refused) of another VM that will publish one of `publishes`. OVA disks are
    /// known only once a job expands them, so only the manifest's own disks are compared.
    fn older_claim_publishing(&self, vm_name: &str, publishes: &[String]) -> Option<TakenName> {
        let Job { ctx, claim, .. } = self;
        let claimed = Layout::new(&ctx.config.watch_dir).claimed_dir();
        std::fs::read_dir(claimed).ok()?.flatten().find_map(|entry| {
            let file_name = entry.file_name();
            let job_id = file_name.to_str()?.strip_suffix(".json")?;
            if !crate::queue::lock::is_job_id(job_id) || job_id >= claim.job_id() {
                return None;
            }
            let spec = manifest::parse(&publish::read_small(&entry.path()).ok()?, "claimed.json").ok()?;
            if spec.vm_name == vm_name {
                return None;
            }
            let name = (0..spec.disks.len()).map(|i| output_name(&spec, i)).find(|n| publishes.contains(n))?;
            Some(TakenName { name, other_vm: spec.vm_name, live: true })
        })
    }

    /// Confines, verifies and inspects every disk before any conversion starts, so that a bad
    /// disk fails the job in seconds rather than after the others were converted. A checksum of
    /// a natively read disk is the exception: it is taken in the conversion's own pass and
    /// checked after it ([`Job::finish_passes`]), so that the source is read once.
    fn prepare_sources<'s>(
        &self,
        spec: &'s JobSpec,
        warnings: &mut Vec<String>,
        passes: &mut SourcePasses,
    ) -> Result<Vec<PreparedSource<'s>>, Stop> {
        let Job { ctx, control, events, .. } = self;
        let mut prepared = Vec::with_capacity(spec.disks.len());
        for disk in &spec.disks {
            let path = ctx.roots.confine(&disk.local_path).map_err(|e| source_failure(disk, &e))?;
            if let (Some(expected), Ok(meta)) = (disk.bytes, std::fs::metadata(&path)) {
                if expected != meta.len() {
                    warnings.push(format!(
                        "disk {}: manifest says {expected} bytes, the file has {}",
                        disk.id,
                        meta.len()
                    ));
                }
            }
            let verified = match disk.sha256 {
                // Taken in the conversion's own pass, checked before anything is published.
                Some(expected) if ctx.converter.reads_natively(disk.source_format) => {
                    self.checksum_in_pass(passes, disk, &path, expected)?;
                    false
                }
                Some(expected) => {
                    events.append(Stage::Checksum.as_str(), &format!("verifying {}", disk.id), None);
                    self.verify_checksum(disk, &path, &expected)?;
                    true
                }
                None => false,
            };
            let info = match disk.ova_disk {
                Some(index) => inspect_ova_disk(&path, index),
                None => ctx.converter.inspect(&path, disk.source_format, &ctx.roots, control),
            }
            .map_err(|e| convert_failure(Stage::Inspect, disk, &path, e))?;
            for referenced in &info.referenced_files {
                ctx.roots.confine(referenced).map_err(|e| reference_failure(Stage::Inspect, disk, &e))?;
            }
            if !ctx.converter.reads_natively(disk.source_format) {
                check_structure(disk, &path, &info.referenced_files)?;
            }
            prepared.push(PreparedSource { disk, path, info, verified });
        }
        Ok(prepared)
    }

    /// Hashes the source through its confinement, in a read of its own (a source qemu-img
    /// converts; the others are hashed in the conversion's pass): a name swapped since it was
    /// confined cannot have an outside file's digest shown in the `.error`.
    fn verify_checksum(&self, disk: &DiskSpec, path: &Path, expected: &[u8; 32]) -> Result<(), Stop> {
        let Job { ctx, control, .. } = self;
        let file = ctx.roots.open(path).map_err(|e| source_failure(disk, &e))?.file;
        let actual = checksum::sha256_of(file, control).map_err(|e| convert_failure(Stage::Checksum, disk, path, e))?;
        if &actual != expected {
            return Err(failures::checksum_mismatch(disk, expected, &actual).into());
        }
        Ok(())
    }

    fn convert_disk(
        &self,
        spec: &JobSpec,
        index: usize,
        source: &PreparedSource<'_>,
        staging: &Staging,
        compression: Option<Compression>,
        tap: Option<Arc<Tap>>,
    ) -> Result<DiskReport, Stop> {
        let Job { ctx, control, .. } = self;
        let disk = source.disk;
        let clock = Instant::now();
        let staged = staging.path(&staged_disk(disk));
        let request = ConversionRequest {
            source: &source.path,
            format: disk.source_format,
            destination: &staged,
            compression,
            ova_disk: disk.ova_disk,
            inspected_files: Some(&source.info.referenced_files),
            roots: &ctx.roots,
            tap,
        };
        info!(stage = "convert", disk = %disk.id, source = %source.path.display(), "converting");
        ctx.converter.convert(&request, control).map_err(|e| convert_failure(Stage::Convert, disk, &source.path, e))?;
        let io_failure = |e: std::io::Error| convert_failure(Stage::Convert, disk, &source.path, ConvertError::Io(e));
        // libvirt's qemu user must read the disk wherever it is published or placed; the daemon's
        // umask must not decide that.
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(DISK_MODE)).map_err(io_failure)?;
        publish::fsync_file(&staged).map_err(io_failure)?;
        let output_check =
            output_check(&staged, control).map_err(|e| convert_failure(Stage::Convert, disk, &source.path, e))?;
        let output_bytes = std::fs::metadata(&staged).map_err(io_failure)?.len();
        control.progress.add_output_bytes(output_bytes);
        Ok(DiskReport {
            id: disk.id.clone(),
            boot: index == 0,
            source_path: source.path.clone(),
            source_format: disk.source_format,
            detected_format: source.info.format.clone(),
            subformat: source.info.subformat.clone(),
            virtual_size: source.info.virtual_size,
            allocated_bytes: source.info.allocated_bytes,
            chain: source.info.chain.clone(),
            ddb: source.info.ddb.clone(),
            source_bytes: std::fs::metadata(&source.path).map(|m| m.len()).unwrap_or(0),
            output: output_name(spec, index),
            output_format: "qcow2",
            output_bytes,
            source_checksum_verified: source.verified,
            output_check,
            seconds: clock.elapsed().as_secs_f64(),
        })
    }

    /// The `libvirt` stage: places the disks in LIBVIRT_POOL and defines the domain. On failure
    /// the converted disks are kept in OUTPUT_DIR/.hyper2kvm-unregistered/<job>/ and the failure
    /// says so.
    fn register_domain(
        &self,
        spec: &JobSpec,
        staging: &Staging,
        guest: Option<&GuestInfo>,
    ) -> Result<Registration, Stop> {
        let Job { ctx, claim, events, .. } = self;
        let config = &ctx.config;
        let (domain_name, uuid) = (names::domain_name(&spec.vm_name), domain_xml::domain_uuid(spec));
        events.append(Stage::Libvirt.as_str(), &format!("registering domain {domain_name}"), Some(100.0));
        self.fence()?;
        let disks = staged_disks(spec, staging);
        let tag = output_layout::staging_name(claim.job_id(), claim.record().generation);
        let default_pool = DefaultPool::virt_install();
        let request = Request {
            domain_name: &domain_name,
            uuid: &uuid,
            pool: &config.libvirt_pool,
            default_pool: &default_pool,
            output: &config.output_layout(),
            autostart: config.libvirt_autostart,
            tag: &tag,
            disks: &disks,
        };
        let registered = Connection::open(&config.libvirt_uri).and_then(|conn| {
            register::register(&conn, &request, |paths, accel| build_domain_xml(config, spec, paths, accel, guest))
        });
        let registration = registered.map_err(|e| self.keep_unregistered(spec, staging, &disks, &e, guest))?;
        info!(
            stage = Stage::Libvirt.as_str(),
            domain = %registration.name,
            uuid = %registration.uuid,
            uri = %registration.uri,
            autostart = registration.autostart,
            redefined = registration.redefined,
            pool = %registration.pool,
            pool_created = registration.pool_created,
            placement = ?registration.placement,
            "registered domain"
        );
        for warning in &registration.warnings {
            warn!(stage = Stage::Libvirt.as_str(), "{warning}");
        }
        Ok(registration)
    }

    /// A registration failed: the converted disks (and a `V.xml` for them in OUTPUT_DIR) are
    /// moved where no poller looks, and the failure names that place.
    fn keep_unregistered(
        &self,
        spec: &JobSpec,
        staging: &Staging,
        disks: &[DiskFile],
        error: &LibvirtError,
        guest: Option<&GuestInfo>,
    ) -> Stop {
        let Job { ctx, claim, .. } = self;
        if !claim.still_owned() {
            return Stop::LostLock;
        }
        let dir = ctx.config.output_layout().unregistered(claim.job_id());
        let xml = build_domain_xml(&ctx.config, spec, &output_paths(&ctx.config, spec), Acceleration::Kvm, guest);
        let kept = publish::keep(&dir, disks.iter().map(|d| (d.staged.as_path(), d.name.as_str())))
            .and_then(|()| staging.write_new("unregistered.xml", xml.as_bytes()))
            .and_then(|_| staging.publish("unregistered.xml", &dir, &output_layout::domain_xml_file(&spec.vm_name)));
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        Stop::Failed(failures::unregistered(error, &kept.map(|_| ()), &names, &dir))
    }

    /// The job's report, finished now; the caller sets when it started and its duration.
    fn new_report(
        &self,
        spec: &JobSpec,
        disks: Vec<DiskReport>,
        mut warnings: Vec<String>,
        registration: Option<&Registration>,
        guest: Option<&GuestInfo>,
    ) -> Report {
        let Job { ctx, claim, .. } = self;
        if let Some(registration) = registration {
            warnings.extend(registration.warnings.iter().cloned());
        }
        let now = Utc::now();
        Report {
            job_id: claim.job_id().to_owned(),
            vm_name: spec.vm_name.clone(),
            instance: ctx.identity.instance.clone(),
            host: ctx.identity.host.clone(),
            converter: ctx.converter.name(),
            started_at: now,
            finished_at: now,
            seconds: 0.0,
            disks,
            domain_name: names::domain_name(&spec.vm_name),
            domain_uuid: domain_xml::domain_uuid(spec),
            domain_disks: registration.map_or_else(|| output_paths(&ctx.config, spec), |r| r.disk_paths.clone()),
            libvirt_uri: registration.map(|r| r.uri.clone()),
            libvirt_pool: registration.map(|r| r.pool.clone()),
            libvirt_pool_created: registration.is_some_and(|r| r.pool_created),
            domain_xml: output_layout::domain_xml_file(&spec.vm_name),
            devices: domain_devices(&ctx.config, spec, guest),
            guest: GuestReport::default(),
            warnings,
        }
    }

    /// Publishes data disks, `V.xml`, `V.json`, then the boot disk last. The lock is re-checked
    /// before each rename: a daemon that lost its job must not publish.
    fn publish_results(&self, spec: &JobSpec, xml: &str, report: &Report, staging: &Staging) -> Result<(), Stop> {
        let ctx = self.ctx;
        let out = &ctx.config.output_dir;
        let failure = |e: std::io::Error| failures::publish_failure(out, e);
        let report_json = serde_json::to_vec_pretty(report).map_err(|e| failure(std::io::Error::other(e)))?;
        staging.write_new("domain.xml", xml.as_bytes()).map_err(failure)?;
        staging.write_new("report.json", &report_json).map_err(failure)?;
        let mut renames: Vec<(String, String)> = spec
            .disks
            .iter()
            .enumerate()
            .skip(1)
            .map(|(index, disk)| (staged_disk(disk), output_name(spec, index)))
            .collect();
        renames.push(("domain.xml".to_owned(), output_layout::domain_xml_file(&spec.vm_name)));
        renames.push(("report.json".to_owned(), output_layout::report_file(&spec.vm_name)));
        for (staged, name) in &renames {
            // Each rename fenced on its own: on a hard NFS mount any one of them may stall past
            // the lease, and the job's new owner may be publishing by then.
            self.fence()?;
            staging.publish(staged, out, name).map_err(failure)?;
        }
        publish::fsync_dir(out).map_err(failure)?;
        self.fence()?;
        staging.publish(&staged_disk(spec.boot_disk()), out, &output_name(spec, 0)).map_err(failure)?;
        publish::fsync_dir(out).map_err(failure)?;
        Ok(())
    }

    /// The checks and sizes of staged disks the guest stage changed in place, made durable
    /// first as the conversion made them.
    fn refresh_outputs(&self, spec: &JobSpec, disks: &mut [DiskReport], images: &[PathBuf]) -> Result<(), Stop> {
        let control = self.control;
        for ((disk, report), staged) in spec.disks.iter().zip(disks.iter_mut()).zip(images) {
            let failure = |e| convert_failure(Stage::Guest, disk, staged, e);
            publish::fsync_file(staged).map_err(|e| failure(ConvertError::Io(e)))?;
            report.output_check = output_check(staged, control).map_err(failure)?;
            report.output_bytes = std::fs::metadata(staged).map_err(|e| failure(ConvertError::Io(e)))?.len();
        }
        Ok(())
    }

    /// Whether the job is still this daemon's: checked before every step another owner could see.
    pub(super) fn fence(&self) -> Result<(), Stop> {
        if self.claim.still_owned() {
            Ok(())
        } else {
            Err(Stop::LostLock)
        }
    }
}

/// Instead of a digest of the output, which would read it all back: its metadata checked.
fn output_check(staged: &Path, control: &crate::convert::JobControl) -> Result<&'static str, ConvertError> {
    match QemuImg::default().check(staged, control)? {
        OutputCheck::Clean => Ok("qemu-img check: no errors"),
        OutputCheck::NoQemuImg => Ok("not made: qemu-img was not found"),
    }
}

/// The staged disks with their final names, boot disk first.
fn staged_disks(spec: &JobSpec, staging: &Staging) -> Vec<DiskFile> {
    (0..spec.disks.len())
        .map(|i| DiskFile { staged: staging.path(&staged_disk(&spec.disks[i])), name: output_name(spec, i) })
        .collect()
}

/// The OVA at `path`, indexed, its `.mf` not checked yet (the conversion's pass will).
fn open_ova(disk: &DiskSpec, path: &Path) -> Result<ova::OvaPackage, Stop> {
    let package = ova::open(path, &ova::Limits::default()).map_err(|e| failures::ova_unreadable(disk, path, &e))?;
    if package.disks.is_empty() {
        return Err(failures::ova_without_disks(path).into());
    }
    Ok(package)
}

/// [`open_ova`] with its `.mf` checked in a read of its own: for a converter that does not
/// read OVAs through a tap.
fn open_verified_ova(disk: &DiskSpec, path: &Path) -> Result<ova::OvaPackage, Stop> {
    let package = open_ova(disk, path)?;
    if package.manifest.is_some() {
        ova::verify_manifest(&package).map_err(|e| failures::ova_manifest_mismatch(path, &e))?;
    }
    Ok(package)
}

fn fill_hardware(spec: &mut JobSpec, hardware: &ova::OvfHardware) {
    let ovf = hardware.to_manifest_hardware();
    let hw = &mut spec.hardware;
    hw.cpu = hw.cpu.or(ovf.cpu);
    hw.mem_gb = hw.mem_gb.or(ovf.mem_gb);
    hw.firmware = hw.firmware.or(ovf.firmware);
    hw.secureboot = hw.secureboot || ovf.secureboot;
    hw.os_hint = hw.os_hint.take().or(ovf.os_hint);
    hw.os_version = hw.os_version.take().or(ovf.os_version);
    if spec.nics.is_empty() {
        spec.nics = hardware.to_nics();
    }
}

fn inspect_ova_disk(path: &Path, index: usize) -> Result<SourceInfo, ConvertError> {
    let info = crate::convert::native::inspect_ova_disk(path, index)?;
    // The members are read in place: nothing outside the OVA, already confined, is opened.
    Ok(SourceInfo { format: "vmdk".into(), referenced_files: Vec::new(), ..info })
}

/// A disk whose source passed every check.
struct PreparedSource<'a> {
    disk: &'a DiskSpec,
    path: PathBuf,
    info: SourceInfo,
    verified: bool,
}

/// qemu-img reads grains past the end of a truncated sparse extent as zeros and succeeds, so
/// every sparse extent involved (the disk, its extents, its parents) is checked first.
fn check_structure(disk: &DiskSpec, path: &Path, referenced: &[PathBuf]) -> Result<(), Stop> {
    for file in std::iter::once(path).chain(referenced.iter().map(PathBuf::as_path)) {
        if !vmdk::is_sparse_extent(file) {
            continue;
        }
        if let Err(e) = vmdk::check_sparse_file(file) {
            let detail = if file == path { e.to_string() } else { format!("{}: {e}", file.display()) };
            return Err(convert_failure(Stage::Inspect, disk, path, ConvertError::Corrupt(detail)));
        }
    }
    Ok(())
}

fn compression_for(
    config: &Config,
    spec: &JobSpec,
    warnings: &mut Vec<String>,
    converter: &dyn Converter,
) -> Option<Compression> {
    let wanted = spec.compress.unwrap_or(config.convert_options.compress);
    let level = spec.compress_level.unwrap_or(config.compress_level);
    let by_qemu_img: Vec<&str> =
        spec.disks.iter().filter(|d| !converter.reads_natively(d.source_format)).map(|d| d.id.as_str()).collect();
    if wanted && level != DEFAULT_COMPRESS_LEVEL && !by_qemu_img.is_empty() {
        warnings.push(format!(
            "compress level {level} is not honoured for {} (converted by qemu-img, which uses its own default)",
            by_qemu_img.join(", ")
        ));
    }
    wanted.then_some(Compression { kind: config.convert_options.compression_type, level })
}

/// `V.qcow2` for the boot disk (index 0), `V-<id>.qcow2` for the others.
pub(super) fn output_name(spec: &JobSpec, index: usize) -> String {
    if index == 0 {
        output_layout::boot_disk_file(&spec.vm_name)
    } else {
        output_layout::data_disk_file(&spec.vm_name, &spec.disks[index].id)
    }
}

/// A disk's file name in the staging directory.
fn staged_disk(disk: &DiskSpec) -> String {
    format!("{}.qcow2", disk.id)
}

/// The published disks in OUTPUT_DIR, boot disk first.
pub(super) fn output_paths(config: &Config, spec: &JobSpec) -> Vec<PathBuf> {
    let layout = config.output_layout();
    (0..spec.disks.len()).map(|i| layout.result(&output_name(spec, i))).collect()
}

/// The domain XML for a VM whose disks are at `paths` (boot disk first), with the devices
/// [`domain_devices`] chooses from the manifest and `guest`, the guest stage's inspection
/// (after the fix) when it ran.
pub(super) fn build_domain_xml(
    config: &Config,
    spec: &JobSpec,
    paths: &[PathBuf],
    accel: Acceleration,
    guest: Option<&GuestInfo>,
) -> String {
    let devices = domain_devices(config, spec, guest);
    let bus = devices.disk_bus;
    let disks: Vec<DomainDisk> = paths.iter().map(|path| DomainDisk { path: path.clone(), target_bus: bus }).collect();
    let attach = match &config.libvirt_network {
        Some(network) => NetworkAttachment::Network(network.clone()),
        None => NetworkAttachment::Bridge(config.libvirt_bridge.clone()),
    };
    domain_xml::domain_xml_for(spec, &disks, &attach, accel, &devices)
}

/// The domain's devices and why: from the guest's inspection (after the fix, when the job
/// fixed it) when there is one, else from the manifest.
fn domain_devices(config: &Config, spec: &JobSpec, guest: Option<&GuestInfo>) -> Devices {
    Devices::choose(&spec.hardware, guest, config.virtio_win.is_some())
}

/// A result name of this job that is another VM's.
struct TakenName {
    name: String,
    other_vm: String,
    /// Found in an older live claim's manifest rather than in a published report.
    live: bool,
}

impl TakenName {
    /// The refusal of the job: the `.error`'s first line names the file and the other VM.
    fn refusal(&self, layout: &OutputLayout, claim: &Claim, vm_name: &str) -> Failure {
        let TakenName { name, other_vm, live } = self;
        let aside = layout.superseded(claim.job_id()).join(name);
        let moved = std::fs::symlink_metadata(&aside).is_ok();
        failures::taken_name(name, vm_name, other_vm, *live, moved.then_some(aside.as_path()))
    }
}
