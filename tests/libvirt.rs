//! LIBVIRT_INTEGRATION through the real daemon, against libvirt's test driver. Each test gives
//! the daemon `LIBVIRT_URI=test:///<node.xml>`, a state of its own built from that file (a
//! fresh one at every connection). The driver lives inside the daemon's process, so what was
//! defined is checked through `V.xml`, `V.json` and the daemon's "registered domain" log line.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures::*;
use common::*;
use serde_json::Value;

/// A UUID no VM of these tests derives.
const OTHER_UUID: &str = "11111111-2222-4333-8444-555555555555";

/// Writes `<root>/node.xml`: a `dir` pool named `default` whose directory is `pool_target`,
/// plus `domains`. Returns the test driver URI for it.
fn test_driver(env: &Env, pool_target: &Path, domains: &str) -> String {
    let node = format!(
        "<node>\n{domains}\n  <pool type='dir'>\n    <name>default</name>\n    \
         <target><path>{}</path></target>\n  </pool>\n</node>\n",
        pool_target.display()
    );
    let path = env.root.join("node.xml");
    fs::write(&path, node).unwrap();
    format!("test://{}", path.display())
}

/// The daemon with LIBVIRT_INTEGRATION on, at `uri`.
fn start(env: Env, uri: &str) -> Session {
    Session::start_in(env, &[("LIBVIRT_INTEGRATION", "true"), ("LIBVIRT_URI", uri), ("LIBVIRT_POOL", "default")], &[])
}

/// A good two-disk VM: the boot disk of [`Session::good_manifest`] plus a data disk.
fn two_disk_manifest(s: &Session, vm: &str) -> Value {
    let mut m = s.good_manifest(vm);
    let dir = s.env.exports.join(format!("data-{vm}"));
    fs::create_dir_all(&dir).unwrap();
    let raw = data_raw(&dir.join("data.raw"));
    let vmdk = raw_to_vmdk(&raw, &dir.join("data.vmdk"), "monolithicSparse");
    m["disks"].as_array_mut().unwrap().push(data_disk("data", "vmdk", &vmdk, 1));
    m
}

fn report(s: &Session, vm: &str) -> Value {
    let path = s.env.output.join(format!("{vm}.json"));
    serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap()
}

/// Asserts libvirt's schema accepts the domain XML in `file`.
fn assert_schema_valid(daemon: &Daemon, file: &Path) {
    let output = match Command::new("virt-xml-validate").arg(file).arg("domain").output() {
        Ok(output) => output,
        Err(_) if std::env::var("HYPER2KVM_SKIP_XML_VALIDATE").as_deref() == Ok("1") => return,
        Err(e) => daemon.fail(&format!(
            "virt-xml-validate cannot run ({e}): install libvirt-clients and libxml2-utils, \
             or set HYPER2KVM_SKIP_XML_VALIDATE=1"
        )),
    };
    if !output.status.success() {
        daemon.fail(&format!(
            "virt-xml-validate rejected {}:\n{}{}\n{}",
            file.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            fs::read_to_string(file).unwrap_or_default()
        ));
    }
}

/// The daemon's log line for the registration of `domain`.
fn registered_line(daemon: &Daemon, domain: &str) -> String {
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("registered domain") && l.contains(&format!("domain={domain}")));
    line.map(str::to_owned).unwrap_or_else(|| daemon.fail(&format!("no 'registered domain' log line for {domain}")))
}

/// `<source file='…'/>` of the domain XML, in order.
fn disk_sources(xml: &str) -> Vec<PathBuf> {
    xml.lines()
        .filter_map(|l| l.trim().strip_prefix("<source file='")?.strip_suffix("'/>").map(PathBuf::from))
        .collect()
}

#[test]
fn the_domain_is_registered_with_its_disks_in_the_pool() {
    let env = Env::new();
    let pool = env.root.join("pool");
    fs::create_dir_all(&pool).unwrap();
    let uri = test_driver(&env, &pool, "");
    let mut s = start(env, &uri);
    let m = two_disk_manifest(&s, "Web 01");
    s.convert_ok(&m);

    // V.json names the domain, its UUID, the URI and where the domain's disks are.
    let r = report(&s, "Web 01");
    let in_pool = vec![pool.join("Web 01.qcow2"), pool.join("Web 01-data.qcow2")];
    assert_eq!(r["domain_name"], "web-01", "{r:#}");
    assert_eq!(r["libvirt_uri"], uri.as_str(), "{r:#}");
    assert_eq!(r["libvirt_pool"], "default", "{r:#}");
    assert!(r.get("libvirt_pool_created").is_none(), "the pool existed: {r:#}");
    let uuid = r["domain_uuid"].as_str().unwrap_or_default().to_owned();
    assert_eq!(uuid.len(), 36, "{r:#}");
    let domain_disks: Vec<PathBuf> = serde_json::from_value(r["domain_disks"].clone()).unwrap();
    assert_eq!(domain_disks, in_pool, "{r:#}");
    let warnings = r["warnings"].to_string();
    assert!(warnings.contains("does not list"), "the test driver never lists placed volumes: {warnings}");
    // The devices of V.xml and why (without inspection: the manifest's, an Ubuntu VM).
    let devices = &r["devices"];
    assert_eq!(
        (devices["disk_bus"].as_str(), devices["nic_model"].as_str()),
        (Some("virtio"), Some("virtio")),
        "{r:#}"
    );
    assert_eq!((devices["firmware"].as_str(), devices["machine"].as_str()), (Some("uefi"), Some("q35")), "{r:#}");
    let why = devices["reasons"]["disk_bus"].as_str().unwrap_or_default();
    assert_eq!(why, "virtio: the manifest names no Windows guest (no inspection)", "{r:#}");

    // V.xml is the XML that was defined: this VM's name, UUID and MAC, the pool's disks.
    let xml_path = s.env.output.join("Web 01.xml");
    let xml = fs::read_to_string(&xml_path).unwrap();
    assert!(xml.contains("<name>web-01</name>") && xml.contains(&format!("<uuid>{uuid}</uuid>")), "{xml}");
    assert!(xml.contains("<mac address='00:50:56:aa:bb:cc'/>"), "{xml}");
    assert_eq!(disk_sources(&xml), in_pool, "{xml}");
    assert_schema_valid(&s.daemon, &xml_path);
    let line = registered_line(&s.daemon, "web-01");
    assert!(line.contains(&uuid) && line.contains(&uri) && line.contains("autostart=false"), "{line}");
    assert!(line.contains("pool=default") && line.contains("pool_created=false"), "{line}");

    // The pool holds the published disks themselves (hard links: one filesystem), readable by
    // libvirt's qemu user.
    for (placed, name) in in_pool.iter().zip(["Web 01.qcow2", "Web 01-data.qcow2"]) {
        let published = fs::metadata(s.env.output.join(name)).unwrap();
        let meta = fs::metadata(placed).unwrap_or_else(|e| s.daemon.fail(&format!("{}: {e}", placed.display())));
        assert_eq!(meta.ino(), published.ino(), "{name}");
        assert_eq!(meta.mode() & 0o777, 0o644, "{name}");
    }
    assert_eq!(visible_entries(&pool).len(), 2, "nothing else in the pool: {:?}", list_tree(&pool));
    s.finish();
}

#[test]
fn a_pool_in_output_dir_uses_the_published_disks() {
    let env = Env::new();
    let uri = test_driver(&env, &env.output, "");
    let mut s = start(env, &uri);
    let m = s.good_manifest("db01");
    s.convert_ok(&m);
    let xml = fs::read_to_string(s.env.output.join("db01.xml")).unwrap();
    assert_eq!(disk_sources(&xml), [s.env.output.join("db01.qcow2")], "{xml}");
    let r = report(&s, "db01");
    assert_eq!(r["libvirt_uri"], uri.as_str(), "{r:#}");
    assert_eq!(fs::metadata(s.env.output.join("db01.qcow2")).unwrap().mode() & 0o777, 0o644);
    registered_line(&s.daemon, "db01");
    s.finish();
}

#[test]
fn an_unreachable_libvirt_fails_the_job_at_stage_libvirt_and_keeps_the_disks() {
    let env = Env::new();
    let uri = format!("qemu+unix:///system?socket={}", env.root.join("no-libvirt.sock").display());
    let mut s = start(env, &uri);
    let m = two_disk_manifest(&s, "app01");
    let first = s.convert_err(&m, "app01");
    let text = fs::read_to_string(s.env.output.join("app01.error")).unwrap();
    let job = text.lines().find_map(|l| l.strip_prefix("job: ")).unwrap_or_default().to_owned();
    let kept = s.env.output.join(".hyper2kvm-unregistered").join(&job);
    assert_eq!(
        first,
        format!(
            "libvirt at {uri} is not reachable: is libvirtd running? The converted disks (app01.qcow2, app01-data.qcow2) are kept in {}.",
            kept.display()
        )
    );
    assert!(text.lines().any(|l| l == "stage: libvirt"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("cause: ") && l.contains("no-libvirt.sock")), "{text}");

    // Nothing the poller looks at besides V.error; the converted disks, complete, where the
    // message says, with a V.xml that uses them once moved into OUTPUT_DIR.
    for name in ["app01.qcow2", "app01-data.qcow2", "app01.xml", "app01.json"] {
        assert!(!s.env.output.join(name).exists(), "{name} was published");
    }
    let expected = expected_outputs(&m);
    for (_, name, source, format) in &expected {
        assert_converted(&s.daemon, &kept.join(name), source, format);
    }
    let kept_xml = kept.join("app01.xml");
    assert_eq!(
        disk_sources(&fs::read_to_string(&kept_xml).unwrap()),
        [s.env.output.join("app01.qcow2"), s.env.output.join("app01-data.qcow2")]
    );
    assert_schema_valid(&s.daemon, &kept_xml);

    // The daemon goes on serving: the next job gets its own .error.
    let m2 = s.good_manifest("app02");
    let first2 = s.convert_err(&m2, "app02");
    assert!(first2.starts_with(&format!("libvirt at {uri} is not reachable")), "{first2}");
    s.finish();
}

#[test]
fn a_domain_name_held_by_another_vm_fails_the_job_with_what_to_do() {
    let env = Env::new();
    let pool = env.root.join("pool");
    fs::create_dir_all(&pool).unwrap();
    let other = format!(
        "<domain type='test'><name>web02</name><uuid>{OTHER_UUID}</uuid><memory>1048576</memory>\
         <os><type>hvm</type></os></domain>"
    );
    let uri = test_driver(&env, &pool, &other);
    let mut s = start(env, &uri);
    let m = s.good_manifest("web02");
    let first = s.convert_err(&m, "web02");
    let prefix = format!(
        "a libvirt domain named web02 already exists for another VM (uuid {OTHER_UUID}): undefine or rename it. \
         The converted disks (web02.qcow2) are kept in {}",
        s.env.output.join(".hyper2kvm-unregistered").display()
    );
    assert!(first.starts_with(&prefix), "{first}");
    assert!(visible_entries(&pool).is_empty(), "nothing is placed in the pool: {:?}", list_tree(&pool));
    s.finish();
}
