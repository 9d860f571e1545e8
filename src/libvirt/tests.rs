//! Registration against libvirt's test driver, a fresh state per test: `test:///<node.xml>`
//! builds the driver's state from that file at every connection (`test:///default` would share
//! one state per process).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use virt::domain::Domain;
use virt::storage_pool::StoragePool;

use super::domain_xml::tests::{assert_schema_valid, disk_spec};
use super::domain_xml::{self, Acceleration, DiskBus, DomainDisk, NetworkAttachment};
use super::pool::{DiskFile, Placement, DISK_MODE};
use super::register::{disk_sources, register, Registration, Request};
use super::{Connection, LibvirtError};
use crate::manifest::{Firmware, Hardware, JobSpec, NicSpec};
use crate::names;

/// A domain the test driver's node file holds besides the pool.
const OTHER_UUID: &str = "11111111-2222-4333-8444-555555555555";

/// One test's libvirt: a node file, a pool directory, OUTPUT_DIR and a staging directory.
struct TestLibvirt {
    _dir: tempfile::TempDir,
    uri: String,
    pool_dir: PathBuf,
    output: PathBuf,
    staging: PathBuf,
}

/// Where the test pool's `<target><path>` points.
enum PoolTarget {
    OwnDirectory,
    OutputDir,
    Nowhere,
}

impl TestLibvirt {
    fn new(target: PoolTarget, domains: &str) -> TestLibvirt {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (pool_dir, output, staging) = (root.join("pool"), root.join("output"), root.join("staging"));
        for d in [&pool_dir, &output, &staging] {
            std::fs::create_dir(d).unwrap();
        }
        let target = match target {
            PoolTarget::OwnDirectory => pool_dir.clone(),
            PoolTarget::OutputDir => output.clone(),
            PoolTarget::Nowhere => PathBuf::from("/nonexistent-pool"),
        };
        let node = format!(
            "<node>\n{domains}\n  <pool type='dir'>\n    <name>default</name>\n    \
             <target><path>{}</path></target>\n  </pool>\n</node>\n",
            target.display()
        );
        std::fs::write(root.join("node.xml"), node).unwrap();
        let uri = format!("test://{}", root.join("node.xml").display());
        TestLibvirt { _dir: dir, uri, pool_dir, output, staging }
    }

    fn connect(&self) -> Connection {
        Connection::open(&self.uri).unwrap_or_else(|e| panic!("{e}: {:?}", e.causes()))
    }

    /// Staged disks for `spec`, each holding `contents` and its own name.
    fn stage(&self, spec: &JobSpec, contents: &str) -> Vec<DiskFile> {
        spec.disks
            .iter()
            .enumerate()
            .map(|(i, disk)| {
                let staged = self.staging.join(format!("{}-{contents}.qcow2", disk.id));
                std::fs::write(&staged, format!("{contents} {}", disk.id)).unwrap();
                std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(DISK_MODE)).unwrap();
                let name = if i == 0 {
                    names::boot_disk_file(&spec.vm_name)
                } else {
                    names::data_disk_file(&spec.vm_name, &disk.id)
                };
                DiskFile { staged, name }
            })
            .collect()
    }
}

/// "Web 01": UEFI, 4 GiB, 3 vCPUs, two disks, two NICs with exported MACs.
fn web01() -> JobSpec {
    JobSpec {
        vm_name: "Web 01".to_owned(),
        vm_id: Some("vm-42".to_owned()),
        provider: Some("vsphere".to_owned()),
        hardware: Hardware {
            cpu: Some(3),
            mem_gb: Some(4.0),
            firmware: Some(Firmware::Uefi),
            os_version: Some("ubuntu64Guest".to_owned()),
            ..Hardware::default()
        },
        disks: vec![disk_spec("disk-0"), disk_spec("data")],
        nics: vec![
            NicSpec { id: None, mac: "00:50:56:AA:BB:01".parse().ok(), network: Some("VM Network".to_owned()) },
            NicSpec { id: None, mac: "00:50:56:aa:bb:02".parse().ok(), network: None },
        ],
        compress: None,
        compress_level: None,
    }
}

fn build_xml(spec: &JobSpec, paths: &[PathBuf]) -> String {
    let disks: Vec<DomainDisk> =
        paths.iter().map(|p| DomainDisk { path: p.clone(), target_bus: DiskBus::Virtio }).collect();
    domain_xml::domain_xml(spec, &disks, &NetworkAttachment::Bridge("virbr0".to_owned()))
}

/// Registers `spec` with `disks` (LIBVIRT_AUTOSTART = `autostart`).
fn register_vm(
    lv: &TestLibvirt,
    conn: &Connection,
    spec: &JobSpec,
    disks: &[DiskFile],
    autostart: bool,
) -> Result<Registration, LibvirtError> {
    register_in(lv, conn, spec, disks, "default", autostart, |paths, _| build_xml(spec, paths))
}

/// Registers `spec` with `disks` into `pool`, with the XML `build_xml` makes.
fn register_in(
    lv: &TestLibvirt,
    conn: &Connection,
    spec: &JobSpec,
    disks: &[DiskFile],
    pool: &str,
    autostart: bool,
    build_xml: impl FnOnce(&[PathBuf], Acceleration) -> String,
) -> Result<Registration, LibvirtError> {
    let name = names::domain_name(&spec.vm_name);
    let uuid = domain_xml::domain_uuid(spec);
    let request =
        Request { domain_name: &name, uuid: &uuid, pool, output_dir: &lv.output, autostart, tag: "job-1.g1", disks };
    register(conn, &request, build_xml)
}

/// The domain's XML as libvirt holds it.
fn defined_xml(conn: &Connection, name: &str) -> String {
    let domain = Domain::lookup_by_name(conn.raw(), name).expect("the domain is defined");
    domain.get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).unwrap()
}

fn domains_named(conn: &Connection, name: &str) -> usize {
    let all = conn.raw().list_all_domains(0).unwrap();
    all.iter().filter(|d| d.get_name().unwrap() == name).count()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A shut-off domain for the node file (the test driver starts the others).
fn node_domain(name: &str, uuid: &str, running: bool) -> String {
    let state = if running { 1 } else { 5 };
    format!(
        "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
         <name>{name}</name><uuid>{uuid}</uuid><memory>1048576</memory><os><type>hvm</type></os>\
         <test:runstate>{state}</test:runstate></domain>"
    )
}

#[test]
fn define_creates_the_domain_with_the_expected_name_uuid_resources_disks_and_macs() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let spec = web01();
    let disks = lv.stage(&spec, "first");
    let registration = register_vm(&lv, &conn, &spec, &disks, false).unwrap();

    assert_eq!(registration.name, "web-01");
    assert_eq!(registration.uuid, domain_xml::domain_uuid(&spec));
    assert_eq!(registration.uri, lv.uri);
    assert!(!registration.redefined);
    assert_eq!(registration.placement, Placement::Directory(lv.pool_dir.clone()));
    let expected = vec![lv.pool_dir.join("Web 01.qcow2"), lv.pool_dir.join("Web 01-data.qcow2")];
    assert_eq!(registration.disk_paths, expected);
    assert_eq!(registration.xml, build_xml(&spec, &expected), "the XML defined is the XML built");
    assert_schema_valid(&registration.xml);

    let xml = defined_xml(&conn, "web-01");
    assert!(xml.contains(&format!("<uuid>{}</uuid>", registration.uuid)), "{xml}");
    assert!(xml.contains("<memory unit='KiB'>4194304</memory>"), "{xml}");
    assert!(xml.contains("<vcpu placement='static'>3</vcpu>"), "{xml}");
    assert!(xml.contains("<mac address='00:50:56:aa:bb:01'/>"), "{xml}");
    assert!(xml.contains("<mac address='00:50:56:aa:bb:02'/>"), "{xml}");
    assert!(xml.contains("<os firmware='efi'>"), "{xml}");
    assert_eq!(disk_sources(&xml), expected, "{xml}");

    // The disks are in the pool under their final names, readable by libvirt's qemu user,
    // and nothing else was left there.
    assert_eq!(entries(&lv.pool_dir), ["Web 01-data.qcow2", "Web 01.qcow2"]);
    for (disk, path) in disks.iter().zip(&expected) {
        assert_eq!(std::fs::read(path).unwrap(), std::fs::read(&disk.staged).unwrap());
        assert_eq!(std::fs::metadata(path).unwrap().mode() & 0o777, 0o644);
    }
}

#[test]
fn registering_again_updates_the_same_domain() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let mut spec = web01();
    let first = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).unwrap();
    // A re-export with more memory: same VM, same UUID.
    spec.hardware.mem_gb = Some(8.0);
    let second = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "second"), false).unwrap();

    assert!(second.redefined);
    assert_eq!(second.uuid, first.uuid);
    assert_eq!(domains_named(&conn, "web-01"), 1);
    let xml = defined_xml(&conn, "web-01");
    assert!(xml.contains(&format!("<uuid>{}</uuid>", first.uuid)), "{xml}");
    assert!(xml.contains("<memory unit='KiB'>8388608</memory>"), "{xml}");
    // The earlier import's disks were replaced by the new ones.
    assert_eq!(std::fs::read_to_string(lv.pool_dir.join("Web 01.qcow2")).unwrap(), "second disk-0");
    assert_eq!(entries(&lv.pool_dir), ["Web 01-data.qcow2", "Web 01.qcow2"]);
}

#[test]
fn a_name_held_by_another_vm_is_refused_and_nothing_is_placed() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, &node_domain("web-01", OTHER_UUID, false));
    let conn = lv.connect();
    let spec = web01();
    let err = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).err().expect("refused");
    assert!(matches!(err, LibvirtError::NameTaken { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "a libvirt domain named web-01 already exists for another VM (uuid {OTHER_UUID}): undefine or rename it"
        )
    );
    assert!(entries(&lv.pool_dir).is_empty());
    let domain = Domain::lookup_by_name(conn.raw(), "web-01").unwrap();
    assert_eq!(domain.get_uuid_string().unwrap(), OTHER_UUID, "the other VM's domain is untouched");
}

#[test]
fn a_running_domain_is_not_redefined() {
    let uuid = domain_xml::domain_uuid(&web01());
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, &node_domain("web-01", &uuid, true));
    let conn = lv.connect();
    let spec = web01();
    let err = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).err().expect("refused");
    assert_eq!(
        err.to_string(),
        format!("domain web-01 is running at {}; shut it down before importing it again", lv.uri)
    );
    assert!(entries(&lv.pool_dir).is_empty());

    // Shut off, it is updated.
    Domain::lookup_by_name(conn.raw(), "web-01").unwrap().destroy().unwrap();
    let registration = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "second"), false).unwrap();
    assert!(registration.redefined);
    assert_eq!(domains_named(&conn, "web-01"), 1);
}

#[test]
fn a_renamed_domain_of_this_vm_is_reported() {
    let uuid = domain_xml::domain_uuid(&web01());
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, &node_domain("web-01-old", &uuid, false));
    let conn = lv.connect();
    let spec = web01();
    let err = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).err().expect("refused");
    assert!(matches!(err, LibvirtError::UuidTaken { .. }), "{err}");
    assert!(err.to_string().contains("web-01-old"), "{err}");
    assert!(err.to_string().contains("rename it back to web-01"), "{err}");
}

#[test]
fn autostart_is_set_only_when_asked() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let spec = web01();
    let registration = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).unwrap();
    assert!(!registration.autostart);
    assert!(!Domain::lookup_by_name(conn.raw(), "web-01").unwrap().get_autostart().unwrap());
    let registration = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "second"), true).unwrap();
    assert!(registration.autostart);
    assert!(Domain::lookup_by_name(conn.raw(), "web-01").unwrap().get_autostart().unwrap());
}

#[test]
fn a_missing_pool_is_named_with_what_to_do() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let spec = web01();
    let disks = lv.stage(&spec, "first");
    let err = register_in(&lv, &conn, &spec, &disks, "images", false, |paths, _| build_xml(&spec, paths))
        .err()
        .expect("refused");
    assert_eq!(
        err.to_string(),
        format!("libvirt storage pool 'images' does not exist at {}: create it or set LIBVIRT_POOL", lv.uri)
    );
    assert!(!err.causes().is_empty(), "libvirt's own message is kept as the cause");
    assert_eq!(domains_named(&conn, "web-01"), 0);
}

#[test]
fn an_inactive_pool_is_refused() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    StoragePool::lookup_by_name(conn.raw(), "default").unwrap().destroy().unwrap();
    let spec = web01();
    let err = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).err().expect("refused");
    assert!(matches!(err, LibvirtError::PoolInactive { .. }), "{err}");
    assert!(err.to_string().contains("virsh pool-start default"), "{err}");
}

#[test]
fn the_pool_is_refreshed_and_unlisted_disks_are_reported() {
    // The test driver's refresh does not rescan the directory (a real dir pool does), so a
    // disk placed there stays unlisted, which the registration reports.
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let spec = web01();
    let registration = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).unwrap();
    let unlisted = registration.warnings.iter().find(|w| w.contains("does not list")).expect("a warning");
    assert!(unlisted.contains("Web 01.qcow2, Web 01-data.qcow2"), "{unlisted}");

    // A volume the pool does list is not reported.
    let pool = super::pool::Pool::lookup(&conn, "default").unwrap();
    let vol = format!(
        "<volume><name>listed.qcow2</name><capacity>1048576</capacity><target><path>{}</path></target></volume>",
        lv.pool_dir.join("listed.qcow2").display()
    );
    virt::storage_vol::StorageVol::create_xml(&StoragePool::lookup_by_name(conn.raw(), "default").unwrap(), &vol, 0)
        .unwrap();
    assert_eq!(pool.refresh_and_check(&["listed.qcow2".to_owned()]), None);
    assert!(pool.refresh_and_check(&["other.qcow2".to_owned()]).is_some());
}

#[test]
fn a_pool_in_output_dir_uses_the_published_disks() {
    let lv = TestLibvirt::new(PoolTarget::OutputDir, "");
    let conn = lv.connect();
    let spec = web01();
    let registration = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).unwrap();
    assert_eq!(registration.placement, Placement::OutputDir);
    let expected = vec![lv.output.join("Web 01.qcow2"), lv.output.join("Web 01-data.qcow2")];
    assert_eq!(registration.disk_paths, expected);
    assert_eq!(disk_sources(&defined_xml(&conn, "web-01")), expected);
    assert!(entries(&lv.output).is_empty(), "publishing is the job's business");
    assert!(registration.warnings.is_empty(), "{:?}", registration.warnings);
    assert!(registration.after_publish().is_some_and(|w| w.contains("does not list")));
    assert_schema_valid(&registration.xml);
}

#[test]
fn a_pool_without_a_local_directory_leaves_the_disks_in_output_dir() {
    let lv = TestLibvirt::new(PoolTarget::Nowhere, "");
    let conn = lv.connect();
    let spec = web01();
    let registration = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).unwrap();
    assert!(matches!(registration.placement, Placement::Elsewhere(_)));
    assert_eq!(registration.disk_paths[0], lv.output.join("Web 01.qcow2"));
    assert_eq!(registration.warnings.len(), 1, "{:?}", registration.warnings);
    assert!(registration.warnings[0].contains("/nonexistent-pool"), "{:?}", registration.warnings);
    assert!(registration.after_publish().is_none(), "only a pool that is OUTPUT_DIR is refreshed after publishing");
}

#[test]
fn a_refused_define_removes_the_placed_disks() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let spec = web01();
    let disks = lv.stage(&spec, "first");
    let broken = |_: &[PathBuf], _| "<domain type='kvm'><name>web-01</name>".to_owned();
    let err = register_in(&lv, &conn, &spec, &disks, "default", false, broken).err().unwrap();
    assert!(matches!(err, LibvirtError::DefineRefused { .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("libvirt at {} refused to define domain web-01: ", lv.uri)), "{err}");
    assert!(entries(&lv.pool_dir).is_empty(), "{:?}", entries(&lv.pool_dir));
    assert!(disks.iter().all(|d| d.staged.is_file()), "the staged disks are untouched");
}

#[test]
fn an_unreachable_libvirt_says_so() {
    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let err = Connection::open(uri).err().expect("no libvirt there");
    assert!(matches!(err, LibvirtError::Unreachable { .. }), "{err}");
    assert_eq!(err.to_string(), format!("libvirt at {uri} is not reachable: is libvirtd running?"));
    let causes = err.causes();
    assert!(causes.iter().any(|c| c.contains("/nonexistent/libvirt-sock")), "{causes:?}");
    assert!(super::probe(uri).is_err());
}

#[test]
fn a_nul_in_a_setting_is_an_error_not_a_panic() {
    assert!(matches!(Connection::open("test:///def\0ault"), Err(LibvirtError::BadSetting { key: "LIBVIRT_URI" })));
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    assert!(matches!(
        super::pool::Pool::lookup(&conn, "de\0fault"),
        Err(LibvirtError::BadSetting { key: "LIBVIRT_POOL" })
    ));
}

#[test]
fn probe_reports_the_version() {
    let version = super::probe("test:///default").unwrap();
    assert!(version.split('.').count() == 3 && !version.starts_with("0."), "{version}");
}

#[test]
fn disk_sources_reads_file_disks_only() {
    let xml = "<domain><devices>\
               <disk type='file'><source file='/a &amp; b.qcow2'/></disk>\
               <disk type='block'><source dev='/dev/sdb'/></disk>\
               <disk type='file'><driver name='qemu'/><source file='/c.qcow2'></source></disk>\
               <interface type='bridge'><source bridge='br0' file='/not-a-disk'/></interface>\
               </devices></domain>";
    assert_eq!(disk_sources(xml), [PathBuf::from("/a & b.qcow2"), PathBuf::from("/c.qcow2")]);
    assert!(disk_sources("<<not xml").is_empty());
}
