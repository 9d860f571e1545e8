//! Registering a converted VM: checks, disk placement, define, autostart, pool refresh.
//!
//! The domain's UUID is derived from the source VM ([`super::domain_xml::domain_uuid`]), so a
//! re-submitted VM updates its own domain instead of creating a second one. Nothing is changed
//! in libvirt until every check has passed; a failure before the define removes the disks the
//! job placed in the pool.

use std::path::{Path, PathBuf};

use quick_xml::events::Event;
use quick_xml::Reader;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use super::domain_xml::Acceleration;
use super::host_caps::HostCapabilities;
use super::pool::{self, DefaultPool, DiskFile, Placement, Pool};
use super::{Connection, LibvirtError};
use crate::output_layout::OutputLayout;

/// What to register.
#[derive(Debug, Clone)]
pub(crate) struct Request<'a> {
    /// The domain's name ([`crate::names::domain_name`]).
    pub domain_name: &'a str,
    /// The domain's UUID ([`super::domain_xml::domain_uuid`]).
    pub uuid: &'a str,
    /// LIBVIRT_POOL.
    pub pool: &'a str,
    /// How LIBVIRT_POOL is created when it is the missing `default` pool.
    pub default_pool: &'a DefaultPool,
    /// OUTPUT_DIR, where the published disks are.
    pub output: &'a OutputLayout,
    /// LIBVIRT_AUTOSTART.
    pub autostart: bool,
    /// Unique to this run of the job; names temporary files in the pool.
    pub tag: &'a str,
    /// The converted disks, boot disk first.
    pub disks: &'a [DiskFile],
}

/// A registered domain.
pub(crate) struct Registration {
    /// The domain's name.
    pub name: String,
    /// The domain's UUID.
    pub uuid: String,
    /// The libvirt URI it was defined at, as configured.
    pub uri: String,
    /// The storage pool, LIBVIRT_POOL.
    pub pool: String,
    /// This job created the pool (the `default` pool did not exist).
    pub pool_created: bool,
    /// Whether the domain starts with the host, as libvirt reports it after the define.
    pub autostart: bool,
    /// A domain with this UUID existed and was updated.
    pub redefined: bool,
    /// The XML given to libvirt, exactly: what `V.xml` must contain.
    pub xml: String,
    /// The disk files the domain uses, boot disk first.
    pub disk_paths: Vec<PathBuf>,
    /// Where the disks went, by the pool's rules.
    pub placement: Placement,
    /// What went less well than asked, for the report.
    pub warnings: Vec<String>,
    /// The pool, when it is OUTPUT_DIR: refreshed after publishing (see [`Self::after_publish`]).
    output_pool: Option<Pool>,
}

impl Registration {
    /// For a pool whose directory is OUTPUT_DIR, the disks appear only when published; this
    /// refreshes the pool then. Returns a warning for the log, if any.
    pub(crate) fn after_publish(&self) -> Option<String> {
        let pool = self.output_pool.as_ref()?;
        let names: Vec<String> = self.disk_paths.iter().filter_map(|p| file_name(p)).collect();
        pool.refresh_and_check(&names)
    }
}

/// Registers the VM with libvirt at `conn`. `build_xml` makes the domain XML for the disk
/// paths the domain must use (which depend on the pool) and the host's acceleration.
pub(crate) fn register(
    conn: &Connection,
    request: &Request<'_>,
    build_xml: impl FnOnce(&[PathBuf], Acceleration) -> String,
) -> Result<Registration, LibvirtError> {
    let opened = Pool::open(conn, request.pool, request.default_pool)?;
    let (pool, pool_created, mut warnings) = (opened.pool, opened.created, opened.warnings);
    let existing = check_existing(conn, request)?;
    let placement = pool::placement(pool.target(), request.output.dir(), conn.is_remote());
    let in_output: Vec<PathBuf> = request.disks.iter().map(|d| request.output.result(&d.name)).collect();
    let (disk_paths, placed) = match &placement {
        Placement::Directory(dir) => {
            let replaceable = existing.as_ref().map(|e| e.disks.as_slice()).unwrap_or_default();
            let placed =
                pool::place_disks(pool.name(), dir, request.disks, replaceable, request.domain_name, request.tag)?;
            (placed.paths().to_vec(), Some(placed))
        }
        Placement::OutputDir => (in_output, None),
        Placement::Elsewhere(why) => {
            warnings.push(format!(
                "libvirt storage pool '{}' {why}; the domain uses the disks in OUTPUT_DIR ({})",
                pool.name(),
                request.output.dir().display()
            ));
            (in_output, None)
        }
    };
    let accel = acceleration(conn, &mut warnings);
    let xml = build_xml(&disk_paths, accel);
    let domain = match define(conn, request, &xml) {
        Ok(domain) => domain,
        Err(e) => {
            if let Some(placed) = placed {
                placed.remove();
            }
            return Err(e);
        }
    };
    let autostart = apply_autostart(&domain, request, &mut warnings);
    if placed.is_some() {
        let names: Vec<String> = request.disks.iter().map(|d| d.name.clone()).collect();
        warnings.extend(pool.refresh_and_check(&names));
    }
    Ok(Registration {
        name: request.domain_name.to_owned(),
        uuid: request.uuid.to_owned(),
        uri: conn.uri().to_owned(),
        pool: pool.name().to_owned(),
        pool_created,
        autostart,
        redefined: existing.is_some(),
        xml,
        disk_paths,
        output_pool: (placement == Placement::OutputDir).then_some(pool),
        placement,
        warnings,
    })
}

/// KVM unless the host offers only emulation (no /dev/kvm): libvirt would refuse a KVM domain
/// there, and an imported VM defined for emulation can still be started, or moved.
fn acceleration(conn: &Connection, warnings: &mut Vec<String>) -> Acceleration {
    let caps = conn.raw().get_capabilities().map(|xml| HostCapabilities::parse(&xml)).unwrap_or_default();
    let accel = caps.acceleration();
    if accel == Acceleration::Emulated {
        warnings.push(format!(
            "the libvirt host at {} has no KVM for x86_64 guests; the domain is defined for emulation \
             (type 'qemu'), which is slow: redefine it with type 'kvm' on a KVM host",
            conn.uri()
        ));
    }
    accel
}

/// This VM's domain as it was before the job (same UUID).
struct Existing {
    /// Its disk files: the job may replace them in the pool.
    disks: Vec<PathBuf>,
}

/// Refuses a name that another VM's domain holds, a renamed domain of this VM, and a running
/// one; returns this VM's earlier domain, if any.
fn check_existing(conn: &Connection, request: &Request<'_>) -> Result<Option<Existing>, LibvirtError> {
    let name = request.domain_name;
    if let Some(domain) = found(Domain::lookup_by_name(conn.raw(), name), conn, "looking up domains by name")? {
        let uuid = domain.get_uuid_string().map_err(|e| conn.call_error("reading a domain's uuid", e))?;
        if !uuid.eq_ignore_ascii_case(request.uuid) {
            return Err(LibvirtError::NameTaken { name: name.to_owned(), uuid });
        }
    }
    let lookup = Domain::lookup_by_uuid_string(conn.raw(), request.uuid);
    let Some(domain) = found(lookup, conn, "looking up domains by uuid")? else {
        return Ok(None);
    };
    let other = domain.get_name().map_err(|e| conn.call_error("reading a domain's name", e))?;
    if other != name {
        let (name, uuid, uri) = (name.to_owned(), request.uuid.to_owned(), conn.uri().to_owned());
        return Err(LibvirtError::UuidTaken { name, other, uuid, uri });
    }
    if domain.is_active().map_err(|e| conn.call_error(format!("checking whether {name} runs"), e))? {
        return Err(LibvirtError::Running { name: name.to_owned(), uri: conn.uri().to_owned() });
    }
    let xml = domain
        .get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| conn.call_error(format!("reading the definition of {name}"), e))?;
    Ok(Some(Existing { disks: disk_sources(&xml) }))
}

/// A lookup's domain, `None` when there is none.
fn found(
    lookup: Result<Domain, virt::error::Error>,
    conn: &Connection,
    action: &str,
) -> Result<Option<Domain>, LibvirtError> {
    match lookup {
        Ok(domain) => Ok(Some(domain)),
        Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
        Err(e) => Err(conn.call_error(action, e)),
    }
}

fn define(conn: &Connection, request: &Request<'_>, xml: &str) -> Result<Domain, LibvirtError> {
    Domain::define_xml(conn.raw(), xml).map_err(|source| LibvirtError::DefineRefused {
        name: request.domain_name.to_owned(),
        uri: conn.uri().to_owned(),
        message: source.message().to_owned(),
        source,
    })
}

/// LIBVIRT_AUTOSTART=true marks the domain; false leaves an operator's earlier choice alone.
/// A failure here is a warning: the domain is registered and can be started by hand.
fn apply_autostart(domain: &Domain, request: &Request<'_>, warnings: &mut Vec<String>) -> bool {
    if request.autostart {
        if let Err(e) = domain.set_autostart(true) {
            warnings.push(format!(
                "could not mark domain {} to start with the host: {}",
                request.domain_name,
                e.message()
            ));
        }
    }
    domain.get_autostart().unwrap_or(false)
}

/// The `<source file=…>` of every `<disk>` in a domain's XML.
pub(crate) fn disk_sources(xml: &str) -> Vec<PathBuf> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut sources = Vec::new();
    loop {
        let (element, is_empty) = match reader.read_event() {
            Ok(Event::Start(e)) => (e, false),
            Ok(Event::Empty(e)) => (e, true),
            Ok(Event::End(_)) => {
                stack.pop();
                continue;
            }
            Ok(Event::Eof) | Err(_) => return sources,
            Ok(_) => continue,
        };
        let name = element.local_name().as_ref().to_vec();
        if name == b"source" && stack.last().is_some_and(|parent| parent == b"disk") {
            let file = element.try_get_attribute("file").ok().flatten().and_then(|a| a.unescape_value().ok());
            sources.extend(file.map(|f| PathBuf::from(f.as_ref())));
        }
        if !is_empty {
            stack.push(name);
        }
    }
}

fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}
