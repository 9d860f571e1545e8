//! Registration against libvirt's test driver, a fresh state per test: `test:///<node.xml>`
//! builds the driver's state from that file at every connection (`test:///default` would share
//! one state per process).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::storage_pool::StoragePool;

use super::domain_xml::tests::{assert_schema_valid, disk_spec};
use super::domain_xml::{self, Acceleration, DiskBus, DomainDisk, NetworkAttachment};
use super::pool::{DefaultPool, DiskFile, Placement, Pool, DISK_MODE};
use super::register::{disk_sources, register, Registration, Request};
use super::{Connection, LibvirtError};
use crate::manifest::{Firmware, Hardware, JobSpec, NicSpec};
use crate::names;
use crate::output_layout::{self, OutputLayout};

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
    /// No pool at all: a fresh libvirtd, before virt-install or virt-manager ran.
    NoPool,
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
            PoolTarget::OwnDirectory => Some(pool_dir.clone()),
            PoolTarget::OutputDir => Some(output.clone()),
            PoolTarget::Nowhere => Some(PathBuf::from("/nonexistent-pool")),
            PoolTarget::NoPool => None,
        };
        let pool = target.map(|target| {
            format!(
                "  <pool type='dir'>\n    <name>default</name>\n    \
                 <target><path>{}</path></target>\n  </pool>\n",
                target.display()
            )
        });
        let node = format!("<node>\n{domains}\n{}</node>\n", pool.unwrap_or_default());
        std::fs::write(root.join("node.xml"), node).unwrap();
        let uri = format!("test://{}", root.join("node.xml").display());
        TestLibvirt { _dir: dir, uri, pool_dir, output, staging }
    }

    /// Where a missing `default` pool is created: the pool directory, as if it were
    /// `/var/lib/libvirt/images`; a short grace for a stopped one.
    fn default_pool(&self) -> DefaultPool {
        DefaultPool { dir: self.pool_dir.clone(), grace: Duration::from_millis(300) }
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
                    output_layout::boot_disk_file(&spec.vm_name)
                } else {
                    output_layout::data_disk_file(&spec.vm_name, &disk.id)
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
    let default_pool = lv.default_pool();
    let request = Request {
        domain_name: &name,
        uuid: &uuid,
        pool,
        default_pool: &default_pool,
        output: &OutputLayout::new(&lv.output, &lv.staging),
        autostart,
        tag: "job-1.g1",
        disks,
    };
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

/// The names of the driver's storage pools, sorted.
fn pool_names(conn: &Connection) -> Vec<String> {
    let mut names: Vec<String> =
        conn.raw().list_all_storage_pools(0).unwrap().iter().map(|p| p.get_name().unwrap()).collect();
    names.sort();
    names
}

/// Asserts the `default` pool is what virt-install makes: a persistent, active, autostarted
/// directory pool in `dir`.
fn assert_virt_install_pool(conn: &Connection, dir: &Path) {
    let pool = StoragePool::lookup_by_name(conn.raw(), "default").expect("the default pool exists");
    assert!(pool.is_active().unwrap(), "started");
    assert!(pool.is_persistent().unwrap(), "defined, not transient");
    assert!(pool.get_autostart().unwrap(), "autostarted");
    let xml = pool.get_xml_desc(0).unwrap();
    assert!(xml.starts_with("<pool type='dir'>"), "{xml}");
    assert_eq!(super::pool::target_path(&xml).as_deref(), Some(dir), "{xml}");
}

/// A second VM, for two jobs at once.
fn db02() -> JobSpec {
    JobSpec { vm_name: "Db 02".to_owned(), vm_id: Some("vm-43".to_owned()), ..web01() }
}

#[test]
fn a_missing_default_pool_is_created_as_virt_install_does() {
    let lv = TestLibvirt::new(PoolTarget::NoPool, "");
    let conn = lv.connect();
    assert!(pool_names(&conn).is_empty(), "a fresh libvirt has no pool");
    let spec = web01();
    let registration = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "first"), false).unwrap();

    assert!(registration.pool_created);
    assert_eq!(registration.pool, "default");
    assert_virt_install_pool(&conn, &lv.pool_dir);
    assert!(registration.warnings.iter().all(|w| !w.contains("could not mark it")), "{:?}", registration.warnings);
    // The job goes on into the new pool.
    assert_eq!(registration.placement, Placement::Directory(lv.pool_dir.clone()));
    assert_eq!(entries(&lv.pool_dir), ["Web 01-data.qcow2", "Web 01.qcow2"]);
    assert_eq!(disk_sources(&defined_xml(&conn, "web-01"))[0], lv.pool_dir.join("Web 01.qcow2"));

    // The next job finds it and creates nothing.
    let spec = db02();
    let next = register_vm(&lv, &conn, &spec, &lv.stage(&spec, "next"), false).unwrap();
    assert!(!next.pool_created);
    assert_eq!(pool_names(&conn), ["default"]);
}

#[test]
fn a_missing_pool_other_than_default_is_not_created() {
    let lv = TestLibvirt::new(PoolTarget::NoPool, "");
    let conn = lv.connect();
    let spec = web01();
    let disks = lv.stage(&spec, "first");
    let err = register_in(&lv, &conn, &spec, &disks, "images", false, |paths, _| build_xml(&spec, paths))
        .err()
        .expect("refused");
    assert!(matches!(err, LibvirtError::PoolMissing { .. }), "{err}");
    assert!(pool_names(&conn).is_empty(), "{:?}", pool_names(&conn));
    assert!(entries(&lv.pool_dir).is_empty());
}

#[test]
fn a_default_pool_libvirt_will_not_create_says_what_to_do() {
    // An operator's pool of another name already has the directory: libvirt refuses a second.
    let images = "<pool type='dir'><name>images</name><target><path>/srv/images</path></target></pool>";
    let lv = TestLibvirt::new(PoolTarget::NoPool, images);
    let conn = lv.connect();
    let default = DefaultPool { dir: PathBuf::from("/srv/images"), grace: Duration::ZERO };
    let err = Pool::open(&conn, "default", &default).err().expect("refused");
    assert!(matches!(err, LibvirtError::PoolCreate { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "libvirt storage pool 'default' does not exist at {} and could not be created in /srv/images: create it \
             (virsh pool-define-as default dir --target /srv/images, then pool-build, pool-start and pool-autostart \
             default) or set LIBVIRT_POOL",
            lv.uri
        )
    );
    assert!(err.with_libvirt_message().contains("'images'"), "libvirt names the other pool: {err:?}");
    assert_eq!(pool_names(&conn), ["images"]);
}

#[test]
fn two_jobs_defining_the_default_pool_at_once_both_go_on() {
    // A test:///FILE connection has a driver of its own, so two connections would never meet.
    // Two threads on one connection share its driver, whose calls run one at a time in
    // whatever order the threads reach them, as a libvirtd serves two clients: both threads
    // pass the barrier into the define, one define wins, and build and start interleave.
    for round in 0..20 {
        let lv = TestLibvirt::new(PoolTarget::NoPool, "");
        let conn = lv.connect();
        let default = lv.default_pool();
        let barrier = Barrier::new(2);
        let defined: Vec<bool> = std::thread::scope(|s| {
            let racer = || {
                barrier.wait();
                super::pool::create_default(&conn, &default)
            };
            let (a, b) = (s.spawn(racer), s.spawn(racer));
            [a.join().unwrap(), b.join().unwrap()]
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| panic!("round {round}: {e}: {:?}", e.causes())).0)
                .collect()
        });
        assert_eq!(defined.iter().filter(|d| **d).count(), 1, "round {round}: exactly one defines it: {defined:?}");
        assert_eq!(pool_names(&conn), ["default"]);
        assert_virt_install_pool(&conn, &lv.pool_dir);
    }
}

#[test]
fn two_jobs_registering_on_a_host_without_pools_both_succeed() {
    // Whatever each job's first lookup finds (nothing, a pool defined but not yet started, or
    // the started pool), both register, and one of them created the pool.
    for round in 0..10 {
        let lv = TestLibvirt::new(PoolTarget::NoPool, "");
        let conn = lv.connect();
        let (web, db) = (web01(), db02());
        let (web_disks, db_disks) = (lv.stage(&web, "web"), lv.stage(&db, "db"));
        let barrier = Barrier::new(2);
        let job = |spec: &JobSpec, disks: &[DiskFile]| {
            barrier.wait();
            register_vm(&lv, &conn, spec, disks, false).map(|r| r.pool_created)
        };
        let created: Vec<bool> = std::thread::scope(|s| {
            let a = s.spawn(|| job(&web, &web_disks));
            let b = s.spawn(|| job(&db, &db_disks));
            [a.join().unwrap(), b.join().unwrap()]
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| panic!("round {round}: {e}: {:?}", e.causes())))
                .collect()
        });
        assert_eq!(created.iter().filter(|c| **c).count(), 1, "round {round}: {created:?}");
        assert_virt_install_pool(&conn, &lv.pool_dir);
        assert_eq!(domains_named(&conn, "web-01") + domains_named(&conn, "db-02"), 2);
        assert_eq!(entries(&lv.pool_dir), ["Db 02-data.qcow2", "Db 02.qcow2", "Web 01-data.qcow2", "Web 01.qcow2"]);
    }
}

#[test]
fn a_stopped_default_pool_is_given_time_to_start() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let pool = StoragePool::lookup_by_name(conn.raw(), "default").unwrap();
    pool.destroy().unwrap();
    let default = DefaultPool { dir: lv.pool_dir.clone(), grace: Duration::from_secs(10) };
    let started = Instant::now();
    let opened = std::thread::scope(|s| {
        // Another job, which defined it a moment ago, starts it.
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            pool.create(0).unwrap();
        });
        Pool::open(&conn, "default", &default)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!opened.created);
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited for the start");
    assert_eq!(opened.pool.target(), Some(lv.pool_dir.as_path()));
}

#[test]
fn a_default_pool_undefined_while_waiting_is_created_again() {
    // The job that defined it could not start it, and undefined it again.
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let pool = StoragePool::lookup_by_name(conn.raw(), "default").unwrap();
    pool.destroy().unwrap();
    let opened = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            pool.undefine().unwrap();
        });
        Pool::open(&conn, "default", &DefaultPool { dir: lv.pool_dir.clone(), grace: Duration::from_secs(10) })
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(opened.created);
    assert_virt_install_pool(&conn, &lv.pool_dir);
}

#[test]
fn a_build_or_start_refused_because_another_started_the_pool_is_no_error() {
    let lv = TestLibvirt::new(PoolTarget::OwnDirectory, "");
    let conn = lv.connect();
    let pool = StoragePool::lookup_by_name(conn.raw(), "default").unwrap();
    // What the slower of two jobs meets: the other started the pool between its check and
    // its own build or start.
    let refused = pool.build(0).map(|_| ());
    assert!(refused.as_ref().is_err_and(|e| e.message().contains("is active")), "{refused:?}");
    assert!(super::pool::unless_active(&pool, refused).is_ok());
    let refused = pool.create(0).map(|_| ());
    assert!(refused.is_err());
    assert!(super::pool::unless_active(&pool, refused).is_ok());
    // A stopped pool's failure stays one.
    pool.destroy().unwrap();
    let failed = StoragePool::lookup_by_name(conn.raw(), "nonexistent").map(|_| ());
    assert!(super::pool::unless_active(&pool, failed).is_err());
}

/// The XML of every kind of device choice from an inspected guest is one libvirt defines, and
/// libvirt keeps the libosinfo id and the chosen devices.
#[test]
fn inspected_devices_define_on_the_test_driver() {
    let conn = Connection::open("test:///default").unwrap();
    for (index, (label, hardware, devices)) in super::domain_xml::tests::inspected_cases().into_iter().enumerate() {
        let spec = JobSpec { vm_name: format!("g-domain-{index}-{label}"), hardware, ..web01() };
        let disks: Vec<DomainDisk> = ["/out/a.qcow2", "/out/b.qcow2"]
            .iter()
            .map(|p| DomainDisk { path: PathBuf::from(p), target_bus: devices.disk_bus })
            .collect();
        let attach = NetworkAttachment::Bridge("virbr0".to_owned());
        let xml = domain_xml::domain_xml_for(&spec, &disks, &attach, Acceleration::Kvm, &devices);
        assert_schema_valid(&xml);
        let domain = Domain::define_xml(conn.raw(), &xml).unwrap_or_else(|e| panic!("{label}: {e}\n{xml}"));
        let defined = domain.get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).unwrap();
        domain.undefine().unwrap();
        let bus = match devices.disk_bus {
            DiskBus::Virtio => "bus='virtio'",
            DiskBus::Sata => "bus='sata'",
        };
        assert!(defined.contains(bus), "{label}: {defined}");
        assert!(defined.contains(&format!("<model type='{}'/>", devices.nic_model.as_str())), "{label}: {defined}");
        if let Some(id) = &devices.osinfo {
            assert!(defined.contains(&format!("<libosinfo:os id=\"{id}\"/>")), "{label}: {defined}");
        }
    }
}
