use super::*;

use serde_json::json;

/// /work/shared/manifest-example.json, verbatim except the trailing newline (so that every
/// strict prefix is incomplete JSON).
const EXAMPLE: &str = r##"{
  "manifest_version": "1.0",
  "source": {
    "provider": "vsphere",
    "vm_id": "vm-1234",
    "vm_name": "Ubuntu Server 22",
    "datacenter": "https://vcenter.example.com/sdk",
    "export_timestamp": "2026-01-24T10:15:02.123456789+05:30",
    "export_method": "hypersdk-govc"
  },
  "vm": {
    "cpu": 4,
    "mem_gb": 8,
    "firmware": "bios",
    "os_hint": "unknown",
    "os_version": "ubuntu64Guest"
  },
  "disks": [
    {
      "id": "disk-0",
      "source_format": "vmdk",
      "bytes": 2147483648,
      "local_path": "/exports/ubuntu/disk-0.vmdk",
      "checksum": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
      "label": "disk-0",
      "disk_type": "boot"
    },
    {
      "id": "disk-1",
      "source_format": "vmdk",
      "bytes": 1073741824,
      "local_path": "/exports/ubuntu/disk-1.vmdk",
      "boot_order_hint": 1,
      "label": "disk-1",
      "disk_type": "data"
    }
  ],
  "nics": [
    { "id": "nic-0", "mac": "00:50:56:aa:bb:cc", "network": "VM Network" }
  ],
  "notes": ["Exported from vSphere by hypersdk v0.1.0", "Export method: ovf"],
  "metadata": {
    "hypersdk_version": "0.1.0",
    "job_id": "vm-1234",
    "created_at": "2026-01-24T10:15:02.12345+05:30",
    "tags": { "export_format": "ovf", "provider": "vsphere" }
  },
  "pipeline": {
    "inspect": { "enabled": true, "collect_guest_info": true },
    "fix": { "enabled": true, "backup": true, "update_grub": true, "regen_initramfs": true,
             "fstab_mode": "stabilize-all", "remove_vmware_tools": true },
    "convert": { "enabled": true, "compress": true },
    "validate": { "enabled": true, "check_image_integrity": true }
  },
  "output": { "directory": "/exports/ubuntu", "format": "qcow2" },
  "options": { "verbose": 1, "report": { "enabled": true, "path": "report.json" } }
}"##;

const FILE_NAME: &str = "artifact-manifest.json";

fn example() -> Value {
    serde_json::from_str(EXAMPLE).expect("the example is valid JSON")
}

fn parse_value(value: &Value) -> Result<JobSpec, ManifestError> {
    parse(&serde_json::to_vec(value).unwrap(), FILE_NAME)
}

/// The example with one change made through a JSON pointer (the parent must exist; a missing
/// last key of an object is added).
fn example_with(pointer: &str, new: Value) -> Value {
    let mut value = example();
    let (parent, key) = pointer.rsplit_once('/').unwrap_or_else(|| panic!("{pointer} is not a pointer"));
    match value.pointer_mut(pointer) {
        Some(slot) => *slot = new,
        None => {
            let object = value.pointer_mut(parent).and_then(Value::as_object_mut);
            object.unwrap_or_else(|| panic!("{parent:?} is not an object in the example")).insert(key.to_owned(), new);
        }
    }
    value
}

/// A 200-byte vm_name (the limit) with a 64-byte disk id (the limit): `V-<id>.qcow2` would be
/// 271 bytes.
fn long_result_name() -> Value {
    let mut value = example_with("/source/vm_name", json!("v".repeat(names::MAX_VM_NAME_BYTES)));
    *value.pointer_mut("/disks/1/id").unwrap() = json!("d".repeat(64));
    value
}

#[test]
fn a_result_name_over_the_file_name_limit_is_refused() {
    let err = parse_value(&long_result_name()).unwrap_err();
    assert!(matches!(err, ManifestError::ResultNameTooLong { bytes: 271, limit: 255, .. }), "{err:?}");
    assert!(err.to_string().contains("shorten source.vm_name or the disk id"), "{err}");
    let mut fits = long_result_name();
    *fits.pointer_mut("/disks/1/id").unwrap() = json!("d".repeat(48));
    parse_value(&fits).expect("a 255-byte result name is accepted");
}

/// The example with the key at `pointer` removed.
fn example_without(pointer: &str) -> Value {
    let mut value = example();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let removed = value.pointer_mut(parent).and_then(Value::as_object_mut).and_then(|o| o.remove(key));
    assert!(removed.is_some(), "{pointer} not in the example");
    value
}

/// A minimal valid manifest with the given disks.
fn with_disks(disks: Value) -> Value {
    json!({ "manifest_version": "1.0", "source": { "vm_name": "vm" }, "disks": disks })
}

fn disk(id: &str) -> Value {
    json!({ "id": id, "source_format": "vmdk", "local_path": format!("/exports/{id}.vmdk") })
}

fn disk_ids(spec: &JobSpec) -> Vec<&str> {
    spec.disks.iter().map(|d| d.id.as_str()).collect()
}

/// The first line of the `.error` file: one line, a full sentence, naming what is wrong.
fn assert_user_message(err: &ManifestError, mentions: &[&str]) -> String {
    let text = err.to_string();
    assert!(!text.contains('\n'), "message spans several lines: {text:?}");
    assert!(text.ends_with('.'), "message does not end with '.': {text:?}");
    for needle in mentions {
        assert!(text.contains(needle), "message {text:?} does not mention {needle:?}");
    }
    text
}

// ---- the shared example ----

#[test]
fn parses_the_shared_example() {
    let spec = parse(EXAMPLE.as_bytes(), FILE_NAME).unwrap();
    assert_eq!(spec.vm_name, "Ubuntu Server 22");
    assert_eq!(spec.vm_id.as_deref(), Some("vm-1234"));
    assert_eq!(spec.provider.as_deref(), Some("vsphere"));

    assert_eq!(disk_ids(&spec), ["disk-0", "disk-1"]);
    let boot = spec.boot_disk();
    assert_eq!(boot.id, "disk-0");
    assert_eq!(boot.disk_type, DiskType::Boot);
    assert_eq!(boot.boot_order_hint, None);
    assert_eq!(boot.source_format, SourceFormat::Vmdk);
    assert_eq!(boot.local_path, PathBuf::from("/exports/ubuntu/disk-0.vmdk"));
    assert_eq!(boot.bytes, Some(2_147_483_648));
    assert_eq!(boot.sha256, Some([0u8; 32]));
    assert_eq!(boot.label.as_deref(), Some("disk-0"));
    let data = &spec.disks[1];
    assert_eq!(data.disk_type, DiskType::Data);
    assert_eq!(data.boot_order_hint, Some(1));
    assert_eq!(data.bytes, Some(1_073_741_824));
    assert_eq!(data.sha256, None);

    assert_eq!(spec.hardware.firmware, Some(Firmware::Bios));
    assert_eq!(spec.hardware.cpu, Some(4));
    assert_eq!(spec.hardware.mem_gb, Some(8.0));
    assert!(!spec.hardware.secureboot);
    assert_eq!(spec.hardware.os_hint.as_deref(), Some("unknown"));
    assert_eq!(spec.hardware.os_version.as_deref(), Some("ubuntu64Guest"));

    assert_eq!(
        spec.nics,
        vec![NicSpec {
            id: Some("nic-0".into()),
            mac: Some("00:50:56:aa:bb:cc".parse().unwrap()),
            network: Some("VM Network".into()),
        }]
    );
    assert_eq!(spec.compress, Some(true));
    assert_eq!(spec.compress_level, None);
}

#[test]
fn checksum_digest_is_decoded() {
    let digest = format!("sha256:{}", "aB".repeat(32));
    let spec = parse_value(&example_with("/disks/0/checksum", json!(digest))).unwrap();
    assert_eq!(spec.boot_disk().sha256, Some([0xab; 32]));
    // An empty checksum is the same as none.
    let spec = parse_value(&example_with("/disks/0/checksum", json!(""))).unwrap();
    assert_eq!(spec.boot_disk().sha256, None);
}

#[test]
fn compress_level_override_is_read() {
    let value = example_with("/pipeline/convert", json!({ "enabled": true, "compress_level": 9 }));
    let spec = parse_value(&value).unwrap();
    assert_eq!(spec.compress_level, Some(9));
    assert_eq!(spec.compress, None);
}

// ---- firmware ----

#[test]
fn efi_and_uefi_mean_uefi() {
    for name in ["efi", "uefi", "EFI", "UEFI"] {
        let spec = parse_value(&example_with("/vm/firmware", json!(name))).unwrap();
        assert_eq!(spec.hardware.firmware, Some(Firmware::Uefi), "firmware {name}");
    }
    let spec = parse_value(&example_without("/vm/firmware")).unwrap();
    assert_eq!(spec.hardware.firmware, None);
}

#[test]
fn unknown_firmware_is_refused() {
    let err = parse_value(&example_with("/vm/firmware", json!("coreboot"))).unwrap_err();
    assert!(matches!(&err, ManifestError::BadFirmware(f) if f == "coreboot"), "{err:?}");
    assert_user_message(&err, &["vm.firmware", "\"coreboot\"", "bios", "uefi"]);
}

// ---- boot disk selection ----

#[test]
fn boot_disk_type_wins_regardless_of_position() {
    let mut last = disk("c");
    last["disk_type"] = json!("boot");
    last["boot_order_hint"] = json!(5);
    let mut first = disk("a");
    first["boot_order_hint"] = json!(0);
    let spec = parse_value(&with_disks(json!([first, disk("b"), last]))).unwrap();
    assert_eq!(disk_ids(&spec), ["c", "a", "b"]);
    assert_eq!(spec.boot_disk().id, "c");
}

#[test]
fn lowest_hint_wins_with_missing_hint_as_zero_and_ties_in_array_order() {
    let mut a = disk("a");
    a["boot_order_hint"] = json!(1);
    let spec = parse_value(&with_disks(json!([a, disk("b"), disk("c")]))).unwrap();
    assert_eq!(disk_ids(&spec), ["b", "c", "a"]);

    let hinted = |id: &str, hint: i64| {
        let mut d = disk(id);
        d["boot_order_hint"] = json!(hint);
        d
    };
    let spec = parse_value(&with_disks(json!([hinted("x", 3), hinted("y", 2), hinted("z", 2)]))).unwrap();
    assert_eq!(disk_ids(&spec), ["y", "z", "x"]);

    // Data disks are not the boot disk just because they come first.
    let mut data = disk("data");
    data["disk_type"] = json!("data");
    data["boot_order_hint"] = json!(1);
    let spec = parse_value(&with_disks(json!([data, disk("os")]))).unwrap();
    assert_eq!(spec.boot_disk().id, "os");
}

// ---- leniency ----

#[test]
fn unknown_keys_anywhere_are_ignored() {
    let mut value = example();
    value["future_top_level"] = json!({ "anything": [1, 2, 3] });
    value["source"]["future"] = json!("x");
    value["vm"]["nested_virt"] = json!(true);
    value["disks"][0]["controller"] = json!({ "type": "scsi" });
    value["disks"][1]["future"] = json!(null);
    value["nics"][0]["adapter"] = json!("vmxnet3");
    value["pipeline"]["convert"]["future"] = json!(1);
    value["pipeline"]["new_stage"] = json!({ "enabled": false });
    value["output"]["filename"] = json!("custom.qcow2");
    let expected = parse(EXAMPLE.as_bytes(), FILE_NAME).unwrap();
    assert_eq!(parse_value(&value).unwrap(), expected);

    // Ignored, but each said once (the job records these in its log and V.json).
    let (_, warnings) = parse_with_warnings(&serde_json::to_vec(&value).unwrap(), FILE_NAME).unwrap();
    let mut named: Vec<&str> = warnings.iter().map(|w| w.split(' ').nth(2).unwrap()).collect();
    named.sort_unstable();
    assert_eq!(
        named,
        [
            "disks[0].controller",
            "disks[1].future",
            "future_top_level",
            "nics[0].adapter",
            "output.filename",
            "pipeline.convert.future",
            "pipeline.new_stage",
            "source.future",
            "vm.nested_virt",
        ]
    );
    assert!(warnings[0].ends_with("is not in the Artifact Manifest v1.0 schema; it was ignored"), "{warnings:?}");
}

#[test]
fn the_shared_example_has_no_unknown_keys_and_free_form_blocks_stay_quiet() {
    assert_eq!(parse_with_warnings(EXAMPLE.as_bytes(), FILE_NAME).unwrap().1, Vec::<String>::new());
    let mut value = example();
    value["metadata"]["anything"] = json!({ "deep": [1, 2] });
    value["options"]["report"]["format"] = json!("yaml");
    value["notes"] = json!([{ "free": "form" }]);
    assert_eq!(parse_with_warnings(&serde_json::to_vec(&value).unwrap(), FILE_NAME).unwrap().1, Vec::<String>::new());
}

#[test]
fn unknown_keys_are_listed_up_to_a_cap() {
    let mut value = example();
    for i in 0..500 {
        value["vm"][format!("k{i:03}")] = json!(i);
    }
    let (_, warnings) = parse_with_warnings(&serde_json::to_vec(&value).unwrap(), FILE_NAME).unwrap();
    assert_eq!(warnings.len(), MAX_UNKNOWN_KEYS_LISTED + 1, "{warnings:?}");
    assert_eq!(
        warnings[MAX_UNKNOWN_KEYS_LISTED],
        "490 more manifest keys not in the Artifact Manifest v1.0 schema were ignored"
    );
}

#[test]
fn numbers_as_strings_are_accepted() {
    let mut value = example();
    value["vm"]["cpu"] = json!("4");
    value["vm"]["mem_gb"] = json!("8");
    value["disks"][0]["bytes"] = json!("2147483648");
    value["disks"][1]["boot_order_hint"] = json!("1");
    let expected = parse(EXAMPLE.as_bytes(), FILE_NAME).unwrap();
    assert_eq!(parse_value(&value).unwrap(), expected);

    let value = example_with("/vm/mem_gb", json!("0.5"));
    assert_eq!(parse_value(&value).unwrap().hardware.mem_gb, Some(0.5));
}

// ---- errors: each variant, each with a one-line actionable message ----

#[test]
fn partial_json_is_not_json() {
    let half = &EXAMPLE.as_bytes()[..EXAMPLE.len() / 2];
    let err = parse(half, FILE_NAME).unwrap_err();
    assert!(matches!(err, ManifestError::NotJson(_)), "{err:?}");
    assert_user_message(&err, &["not valid JSON", "line"]);

    let err = parse(b"", FILE_NAME).unwrap_err();
    assert!(matches!(err, ManifestError::NotJson(_)), "{err:?}");
    assert_user_message(&err, &["not valid JSON"]);
}

#[test]
fn oversized_manifest_is_refused() {
    let mut bytes = EXAMPLE.as_bytes().to_vec();
    bytes.resize(MAX_MANIFEST_BYTES as usize + 1, b' ');
    let err = parse(&bytes, FILE_NAME).unwrap_err();
    assert!(matches!(err, ManifestError::TooLarge(n) if n == MAX_MANIFEST_BYTES + 1), "{err:?}");
    assert_user_message(&err, &[&(MAX_MANIFEST_BYTES + 1).to_string(), "1 MiB"]);

    // Exactly the limit is fine (white space after the document is allowed).
    bytes.truncate(MAX_MANIFEST_BYTES as usize);
    assert!(parse(&bytes, FILE_NAME).is_ok());
}

#[test]
fn schema_errors_name_the_problem() {
    let err = parse(b"[1, 2]", FILE_NAME).unwrap_err();
    assert!(matches!(err, ManifestError::Schema(_)), "{err:?}");
    assert_user_message(&err, &["schema", "top level", "object"]);

    let err = parse_value(&example_without("/disks/1/id")).unwrap_err();
    assert!(matches!(err, ManifestError::Schema(_)), "{err:?}");
    assert_user_message(&err, &["disks[1]", "id"]);

    let err = parse_value(&example_without("/disks/0/local_path")).unwrap_err();
    assert!(matches!(err, ManifestError::Schema(_)), "{err:?}");
    assert_user_message(&err, &["disks[0].local_path", "disk-0"]);

    let err = parse_value(&example_with("/disks", json!("disk-0"))).unwrap_err();
    assert!(matches!(err, ManifestError::Schema(_)), "{err:?}");
    assert_user_message(&err, &["schema", "disk-0"]);
}

#[test]
fn wrong_manifest_version_is_refused() {
    let err = parse_value(&example_with("/manifest_version", json!("2.0"))).unwrap_err();
    assert!(matches!(&err, ManifestError::WrongVersion(v) if v.contains("2.0")), "{err:?}");
    assert_user_message(&err, &["manifest_version", "\"2.0\"", "\"1.0\""]);

    // A number is not the string "1.0", and the message must make that visible.
    let err = parse_value(&example_with("/manifest_version", json!(1.0))).unwrap_err();
    assert!(matches!(err, ManifestError::WrongVersion(_)), "{err:?}");
    let text = assert_user_message(&err, &["manifest_version", "number 1.0"]);
    assert!(!text.contains("is \"1.0\""), "{text}");

    let err = parse_value(&example_without("/manifest_version")).unwrap_err();
    assert!(matches!(err, ManifestError::WrongVersion(_)), "{err:?}");
    assert_user_message(&err, &["manifest_version", "missing"]);

    let err = parse_value(&example_with("/manifest_version", json!(null))).unwrap_err();
    assert!(matches!(err, ManifestError::WrongVersion(_)), "{err:?}");
    // JSON null is read as missing.
    assert_user_message(&err, &["manifest_version", "missing"]);
}

#[test]
fn manifest_without_disks_is_refused() {
    for value in [example_with("/disks", json!([])), example_without("/disks"), example_with("/disks", json!(null))] {
        let err = parse_value(&value).unwrap_err();
        assert!(matches!(err, ManifestError::NoDisks), "{err:?}");
        assert_user_message(&err, &["disks"]);
    }
}

#[test]
fn bad_disk_ids_are_refused() {
    for id in ["a/b", "", "x y", "../etc", "d\n1", &"x".repeat(65)] {
        let err = parse_value(&example_with("/disks/1/id", json!(id))).unwrap_err();
        assert!(matches!(&err, ManifestError::BadDiskId { id: got } if got == id), "{id:?}: {err:?}");
        assert_user_message(&err, &[&format!("Disk id {id:?}"), "letters, digits", "64"]);
    }
    // The longest id accepted.
    assert!(parse_value(&example_with("/disks/1/id", json!("x".repeat(64)))).is_ok());
}

#[test]
fn duplicate_disk_ids_are_refused() {
    let err = parse_value(&example_with("/disks/1/id", json!("disk-0"))).unwrap_err();
    assert!(matches!(&err, ManifestError::DuplicateDiskId { id } if id == "disk-0"), "{err:?}");
    assert_user_message(&err, &["\"disk-0\"", "unique"]);
}

#[test]
fn unsupported_source_format_is_refused() {
    let err = parse_value(&example_with("/disks/1/source_format", json!("iso"))).unwrap_err();
    assert!(
        matches!(&err, ManifestError::BadSourceFormat { id, format } if id == "disk-1" && format == "iso"),
        "{err:?}"
    );
    assert_user_message(&err, &["disk-1", "source_format", "\"iso\"", "vmdk"]);

    let err = parse_value(&example_without("/disks/1/source_format")).unwrap_err();
    assert!(matches!(err, ManifestError::BadSourceFormat { .. }), "{err:?}");
    assert_user_message(&err, &["disk-1", "source_format"]);

    for (name, format) in [("OVA", SourceFormat::Ova), ("raw", SourceFormat::Raw), ("vhdx", SourceFormat::Vhdx)] {
        let spec = parse_value(&example_with("/disks/1/source_format", json!(name))).unwrap();
        assert_eq!(spec.disks[1].source_format, format);
    }
}

#[test]
fn relative_local_path_is_refused() {
    for path in ["exports/disk-1.vmdk", "./disk-1.vmdk", ""] {
        let err = parse_value(&example_with("/disks/1/local_path", json!(path))).unwrap_err();
        assert!(
            matches!(&err, ManifestError::RelativePath { id, path: p } if id == "disk-1" && p == path),
            "{path:?}: {err:?}"
        );
        assert_user_message(&err, &["disk-1", "local_path", &format!("{path:?}"), "absolute"]);
    }
}

#[test]
fn malformed_checksums_are_refused() {
    let cases = [
        format!("md5:{}", "0".repeat(64)),
        "sha256:abc".to_string(),
        format!("sha256:{}", "z".repeat(64)),
        "0".repeat(64),
        format!("sha256:{}", "0".repeat(65)),
    ];
    for checksum in &cases {
        let err = parse_value(&example_with("/disks/0/checksum", json!(checksum))).unwrap_err();
        assert!(
            matches!(&err, ManifestError::BadChecksum { id, checksum: c } if id == "disk-0" && c == checksum),
            "{checksum}: {err:?}"
        );
        assert_user_message(&err, &["disk-0", checksum, "sha256:<64 hex digits>"]);
    }
}

#[test]
fn unknown_disk_type_is_refused() {
    let err = parse_value(&example_with("/disks/1/disk_type", json!("swap"))).unwrap_err();
    assert!(matches!(&err, ManifestError::BadDiskType { id, value } if id == "disk-1" && value == "swap"), "{err:?}");
    assert_user_message(&err, &["disk-1", "disk_type", "\"swap\"", "boot, data or unknown"]);
}

#[test]
fn unsafe_vm_names_are_refused() {
    let long = "x".repeat(201);
    let cases: [(&str, UnsafeName); 5] = [
        ("..", UnsafeName::Dots),
        ("a/b", UnsafeName::Slash),
        (".hidden", UnsafeName::LeadingDot),
        (&long, UnsafeName::TooLong(201)),
        ("", UnsafeName::Empty),
    ];
    for (name, expected) in cases {
        let err = parse_value(&example_with("/source/vm_name", json!(name))).unwrap_err();
        assert!(
            matches!(&err, ManifestError::UnsafeVmName { name: n, reason } if n == name && *reason == expected),
            "{name:?}: {err:?}"
        );
        assert_user_message(&err, &["source.vm_name", &format!("{name:?}"), &expected.to_string()]);
    }
    // 200 bytes is the limit, and spaces are fine.
    assert!(parse_value(&example_with("/source/vm_name", json!("y".repeat(200)))).is_ok());
    // A NUL byte is shown escaped, so the message stays on one line and printable.
    let err = parse_value(&example_with("/source/vm_name", json!("a\u{0}b"))).unwrap_err();
    assert!(matches!(err, ManifestError::UnsafeVmName { reason: UnsafeName::Nul, .. }), "{err:?}");
    let text = assert_user_message(&err, &["\"a\\0b\""]);
    assert!(!text.contains('\0'));
}

#[test]
fn output_format_other_than_qcow2_is_refused() {
    let err = parse_value(&example_with("/output/format", json!("vmdk"))).unwrap_err();
    assert!(matches!(&err, ManifestError::OutputNotQcow2(f) if f == "vmdk"), "{err:?}");
    assert_user_message(&err, &["output.format", "\"vmdk\"", "qcow2"]);

    assert!(parse_value(&example_with("/output/format", json!("QCOW2"))).is_ok());
    assert!(parse_value(&example_without("/output/format")).is_ok());
    assert!(parse_value(&example_without("/output")).is_ok());
}

#[test]
fn disabled_conversion_is_refused_but_other_stages_may_be_off() {
    let err = parse_value(&example_with("/pipeline/convert/enabled", json!(false))).unwrap_err();
    assert!(matches!(err, ManifestError::ConversionDisabled), "{err:?}");
    assert_user_message(&err, &["pipeline.convert.enabled", "false", ".qcow2"]);

    let err = parse_value(&example_with("/pipeline/convert/enabled", json!("false"))).unwrap_err();
    assert!(matches!(err, ManifestError::ConversionDisabled), "{err:?}");

    for stage in ["fix", "inspect", "validate"] {
        let value = example_with(&format!("/pipeline/{stage}/enabled"), json!(false));
        assert!(parse_value(&value).is_ok(), "pipeline.{stage}.enabled=false must not fail");
    }
    assert!(parse_value(&example_without("/pipeline")).is_ok());
}

#[test]
fn compress_level_out_of_range_is_refused() {
    for level in [12i64, -1, 10] {
        let mut value = example();
        value["pipeline"]["convert"]["compress_level"] = json!(level);
        let err = parse_value(&value).unwrap_err();
        assert!(matches!(err, ManifestError::BadCompressLevel(l) if l == level), "{err:?}");
        assert_user_message(&err, &["pipeline.convert.compress_level", &level.to_string(), "0 to 9"]);
    }
}

#[test]
fn error_messages_are_distinct() {
    let errors = [
        parse(b"{", FILE_NAME).unwrap_err(),
        parse(&vec![b' '; MAX_MANIFEST_BYTES as usize + 1], FILE_NAME).unwrap_err(),
        parse(b"[]", FILE_NAME).unwrap_err(),
        parse_value(&example_with("/manifest_version", json!("2.0"))).unwrap_err(),
        parse_value(&example_with("/disks", json!([]))).unwrap_err(),
        parse_value(&example_with("/disks/1/id", json!("a b"))).unwrap_err(),
        parse_value(&example_with("/disks/1/id", json!("disk-0"))).unwrap_err(),
        parse_value(&example_with("/disks/1/source_format", json!("iso"))).unwrap_err(),
        parse_value(&example_with("/disks/1/local_path", json!("rel"))).unwrap_err(),
        parse_value(&example_with("/disks/0/checksum", json!("sha256:1"))).unwrap_err(),
        parse_value(&example_with("/disks/1/disk_type", json!("swap"))).unwrap_err(),
        parse_value(&example_with("/vm/firmware", json!("coreboot"))).unwrap_err(),
        parse_value(&example_with("/source/vm_name", json!(".."))).unwrap_err(),
        parse_value(&example_with("/output/format", json!("vmdk"))).unwrap_err(),
        parse_value(&example_with("/pipeline/convert/enabled", json!(false))).unwrap_err(),
        parse_value(&example_with("/pipeline/convert", json!({ "compress_level": 42 }))).unwrap_err(),
        parse_value(&long_result_name()).unwrap_err(),
        parse_value(&example_with("/vm/cpu", json!(-1))).unwrap_err(),
        parse_value(&example_with("/vm/mem_gb", json!(1e308))).unwrap_err(),
        parse_value(&example_with("/nics/0/mac", json!("00:50:56"))).unwrap_err(),
        parse_value(&example_with("/nics", json!([{ "mac": "00:50:56:aa:bb:cc" }, { "mac": "005056aabbcc" }])))
            .unwrap_err(),
        parse_value(&example_with("/nics", json!(vec![json!({}); 65]))).unwrap_err(),
        parse_value(&example_with("/vm/secureboot", json!("maybe"))).unwrap_err(),
    ];
    let variants: std::collections::BTreeSet<String> =
        errors.iter().map(|e| format!("{e:?}").split(['(', ' ', '{']).next().unwrap().to_owned()).collect();
    assert_eq!(variants.len(), errors.len(), "one case per variant: {variants:?}");
    // Each message starts differently, so a person reading only the start can tell them apart.
    let starts: std::collections::BTreeSet<String> =
        errors.iter().map(|e| e.to_string().chars().take(14).collect()).collect();
    assert!(starts.len() >= 8, "{starts:?}");
    let texts: std::collections::BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(texts.len(), errors.len());
    for err in &errors {
        assert_user_message(err, &[]);
    }
}

// ---- vm_name defaults and hints ----

#[test]
fn missing_vm_name_defaults_to_the_file_stem() {
    let spec = parse_value(&example_without("/source/vm_name")).unwrap();
    assert_eq!(spec.vm_name, "artifact-manifest");
    let spec = parse_value(&example_without("/source")).unwrap();
    assert_eq!(spec.vm_name, "artifact-manifest");
    assert_eq!(spec.vm_id, None);

    let bytes = serde_json::to_vec(&example_without("/source/vm_name")).unwrap();
    assert_eq!(parse(&bytes, "web01.json").unwrap().vm_name, "web01");
}

#[test]
fn vm_name_hint_falls_back_to_the_file_stem() {
    assert_eq!(vm_name_hint(b"{ not json", FILE_NAME), "artifact-manifest");
    assert_eq!(vm_name_hint(&EXAMPLE.as_bytes()[..100], FILE_NAME), "artifact-manifest");
    assert_eq!(vm_name_hint(EXAMPLE.as_bytes(), FILE_NAME), "Ubuntu Server 22");
    let bytes = serde_json::to_vec(&example_without("/source/vm_name")).unwrap();
    assert_eq!(vm_name_hint(&bytes, FILE_NAME), "artifact-manifest");
    // Even a manifest that fails validation names its results after its vm_name.
    let bytes = serde_json::to_vec(&example_with("/manifest_version", json!("9"))).unwrap();
    assert_eq!(vm_name_hint(&bytes, FILE_NAME), "Ubuntu Server 22");
}

// ---- completeness check used by the queue ----

#[test]
fn complete_json_is_recognised() {
    assert!(is_complete_json(EXAMPLE.as_bytes()));
    // HyperSDK's file ends with a newline.
    assert!(is_complete_json(format!("{EXAMPLE}\n").as_bytes()));
    assert!(!is_complete_json(b""));
    assert!(!is_complete_json(b"   \n"));
    // Two documents, or garbage after one, is not one complete document.
    assert!(!is_complete_json(format!("{EXAMPLE}{EXAMPLE}").as_bytes()));
}

#[test]
fn no_strict_prefix_of_the_example_is_complete() {
    let ends = (0..EXAMPLE.len()).step_by(97).chain([1, EXAMPLE.len() / 2, EXAMPLE.len() - 2, EXAMPLE.len() - 1]);
    let mut checked = 0;
    for end in ends.filter(|&end| EXAMPLE.is_char_boundary(end)) {
        assert!(!is_complete_json(&EXAMPLE.as_bytes()[..end]), "prefix of {end} bytes taken as complete");
        checked += 1;
    }
    assert!(checked > 20, "only {checked} prefixes checked");
}

// ---- reading manifest files ----

#[test]
fn read_file_stops_past_the_limit_and_reports_the_files_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.json");
    let size = 5u64 << 30;
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    assert_eq!(read_file(&path), Err(ReadError::TooLarge(size)));
    let err = ManifestFile::read(&path, "big.json").parse().unwrap_err();
    assert_user_message(&err, &[&size.to_string(), "1 MiB", &MAX_MANIFEST_BYTES.to_string()]);

    std::fs::write(&path, EXAMPLE).unwrap();
    assert_eq!(read_file(&path).unwrap(), EXAMPLE.as_bytes());
}

#[test]
fn read_file_neither_follows_symlinks_nor_blocks_on_fifos() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("target.json"), EXAMPLE).unwrap();
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(dir.path().join("target.json"), &link).unwrap();
    assert_eq!(read_file(&link), Err(ReadError::NotAFile));

    let fifo = dir.path().join("fifo.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    assert_eq!(read_file(&fifo), Err(ReadError::NotAFile));
    assert_user_message(&ManifestFile::read(&fifo, "fifo.json").parse().unwrap_err(), &["not a regular file"]);

    let missing = ManifestFile::read(&dir.path().join("gone.json"), "gone.json");
    assert!(matches!(missing.parse(), Err(ManifestError::Unreadable(_))));
    assert_eq!(missing.vm_name(), "gone");
}

// ---- silent leniency, refused: each message names the field ----

#[test]
fn schema_errors_name_the_json_path() {
    for (pointer, value, path) in [
        ("/disks/1/local_path", json!(5), "disks[1].local_path"),
        ("/disks/0/id", json!(["disk-0"]), "disks[0].id"),
        ("/source/vm_name", json!(true), "source.vm_name"),
        ("/nics/0/mac", json!(0x005056aabbcc_u64), "nics[0].mac"),
        ("/vm/firmware", json!({ "type": "efi" }), "vm.firmware"),
        ("/output/format", json!(2), "output.format"),
        ("/nics", json!("nic-0"), "nics"),
    ] {
        let err = parse_value(&example_with(pointer, value)).unwrap_err();
        assert!(matches!(err, ManifestError::Schema(_)), "{pointer}: {err:?}");
        let text = assert_user_message(&err, &[&format!("({path}: invalid type")]);
        assert!(text.contains("schema"), "{text}");
    }
}

#[test]
fn impossible_vcpu_counts_are_refused_not_replaced_by_the_default() {
    for cpu in [json!(100_000), json!(-1), json!(4097), json!(2.5), json!("four"), json!(1e308), json!(true)] {
        let err = parse_value(&example_with("/vm/cpu", cpu.clone())).unwrap_err();
        assert!(matches!(err, ManifestError::BadCpu(_)), "{cpu}: {err:?}");
        assert_user_message(&err, &["vm.cpu", &cpu.to_string(), "1 to 4096"]);
    }
    for (cpu, expected) in [(json!(1), Some(1)), (json!(4096), Some(4096)), (json!("16"), Some(16))] {
        assert_eq!(parse_value(&example_with("/vm/cpu", cpu)).unwrap().hardware.cpu, expected);
    }
    // Go's zero value and null mean "not known": the default, as when the key is absent.
    for unknown in [json!(0), json!(null), json!("0")] {
        assert_eq!(parse_value(&example_with("/vm/cpu", unknown)).unwrap().hardware.cpu, None);
    }
}

#[test]
fn impossible_memory_sizes_are_refused_not_replaced_by_the_default() {
    for mem in [json!(1e308), json!(-1), json!(16385), json!(0.0001), json!("NaN"), json!("inf"), json!("lots")] {
        let err = parse_value(&example_with("/vm/mem_gb", mem.clone())).unwrap_err();
        assert!(matches!(err, ManifestError::BadMemory(_)), "{mem}: {err:?}");
        assert_user_message(&err, &["vm.mem_gb", &mem.to_string(), "16384"]);
    }
    for (mem, expected) in
        [(json!(16384), Some(16384.0)), (json!(0.25), Some(0.25)), (json!(0), None), (json!(null), None)]
    {
        assert_eq!(parse_value(&example_with("/vm/mem_gb", mem)).unwrap().hardware.mem_gb, expected);
    }
}

#[test]
fn macs_in_any_spelling_are_kept_in_libvirts() {
    for mac in ["005056aabbcc", "00-50-56-AA-BB-CC", " 00:50:56:AA:bb:cc "] {
        let spec = parse_value(&example_with("/nics/0/mac", json!(mac))).unwrap();
        assert_eq!(spec.nics[0].mac.map(|m| m.to_string()).as_deref(), Some("00:50:56:aa:bb:cc"), "{mac:?}");
    }
    for absent in [json!(""), json!(null)] {
        assert_eq!(parse_value(&example_with("/nics/0/mac", absent)).unwrap().nics[0].mac, None);
    }
}

#[test]
fn unusable_macs_are_refused_naming_the_nic_and_the_value() {
    for mac in ["00:50:56:aa:bb", "00:50:56:aa:bb:zz", "not-a-mac' onload='x", "01:00:5e:00:00:01", "00:00:00:00:00:00"]
    {
        let err = parse_value(&example_with("/nics/0/mac", json!(mac))).unwrap_err();
        assert!(matches!(err, ManifestError::BadMac { .. }), "{mac}: {err:?}");
        assert_user_message(&err, &["nics[0]", "\"nic-0\"", mac]);
    }
    let mut value = example();
    value["nics"] = json!([
        { "id": "nic-0", "mac": "00:50:56:aa:bb:cc" },
        { "mac": "00:50:56:aa:bb:01" },
        { "mac": "00-50-56-AA-BB-CC" },
    ]);
    let err = parse_value(&value).unwrap_err();
    assert!(matches!(err, ManifestError::DuplicateMac { .. }), "{err:?}");
    assert_user_message(&err, &["nics[2]", "00:50:56:aa:bb:cc", "nics[0] (\"nic-0\")"]);
}

#[test]
fn more_nics_than_an_ovf_may_have_are_refused() {
    let nic = |i: usize| json!({ "id": format!("nic-{i}"), "network": "VM Network" });
    let sixty_four: Vec<Value> = (0..MAX_NICS).map(nic).collect();
    assert_eq!(parse_value(&example_with("/nics", json!(sixty_four))).unwrap().nics.len(), 64);
    for count in [MAX_NICS + 1, 5000] {
        let many: Vec<Value> = (0..count).map(nic).collect();
        let err = parse_value(&example_with("/nics", json!(many))).unwrap_err();
        assert!(matches!(err, ManifestError::TooManyNics(n) if n == count), "{err:?}");
        assert_user_message(&err, &[&count.to_string(), "at most 64"]);
    }
}

#[test]
fn values_present_but_unreadable_are_refused_naming_the_field() {
    for (pointer, value, field) in [
        ("/disks/1/boot_order_hint", json!("first"), "disks[1].boot_order_hint"),
        ("/disks/0/bytes", json!(-5), "disks[0].bytes"),
        ("/disks/0/bytes", json!("2 GB"), "disks[0].bytes"),
        ("/vm/secureboot", json!("maybe"), "vm.secureboot"),
        ("/pipeline/convert/compress", json!("sometimes"), "pipeline.convert.compress"),
        ("/pipeline/convert/enabled", json!([]), "pipeline.convert.enabled"),
        ("/pipeline/convert/compress_level", json!("high"), "pipeline.convert.compress_level"),
    ] {
        let err = parse_value(&example_with(pointer, value.clone())).unwrap_err();
        assert!(matches!(err, ManifestError::BadValue { .. }), "{pointer}: {err:?}");
        assert_user_message(&err, &[field, &value.to_string()]);
    }
    let long = "x".repeat(10_000);
    let text = parse_value(&example_with("/vm/secureboot", json!(long))).unwrap_err().to_string();
    assert!(text.len() < 300, "a quoted value is capped: {} bytes", text.len());
}

// ---- pipeline.inspect / fix / validate ----

fn pipeline_of(value: &Value) -> Result<Pipeline, ManifestError> {
    parse_job(&serde_json::to_vec(value).unwrap(), FILE_NAME).map(|(_, pipeline, _)| pipeline)
}

#[test]
fn the_shared_examples_pipeline_is_read() {
    let pipeline = pipeline_of(&example()).unwrap();
    assert_eq!(pipeline.inspect, InspectStep { enabled: true, collect_guest_info: true });
    assert_eq!(
        pipeline.fix,
        FixStep {
            enabled: true,
            backup: true,
            update_grub: Some(true),
            regen_initramfs: Some(true),
            fstab_mode: Some(FstabMode::StabilizeAll),
            remove_vmware_tools: Some(true),
        }
    );
    assert_eq!(pipeline.validate, ValidateStep { enabled: true, check_image_integrity: true });
}

#[test]
fn absent_guest_steps_are_off() {
    assert_eq!(pipeline_of(&example_without("/pipeline")).unwrap(), Pipeline::default());
    let only_convert = example_with("/pipeline", json!({ "convert": { "enabled": true } }));
    assert_eq!(pipeline_of(&only_convert).unwrap(), Pipeline::default());
    // A block without `enabled` asks for nothing; its options are still read.
    let value = example_with("/pipeline/fix", json!({ "backup": "yes", "fstab_mode": "noop" }));
    let fix = pipeline_of(&value).unwrap().fix;
    assert!(!fix.enabled);
    assert!(fix.backup);
    assert_eq!(fix.fstab_mode, Some(FstabMode::Noop));
    assert_eq!(fix.update_grub, None);
}

#[test]
fn pipeline_values_are_read_leniently() {
    let value = example_with("/pipeline/validate", json!({ "enabled": "true", "check_image_integrity": 1 }));
    assert_eq!(pipeline_of(&value).unwrap().validate, ValidateStep { enabled: true, check_image_integrity: true });
    let value = example_with("/pipeline/fix/fstab_mode", json!(" ByPath-Only "));
    assert_eq!(pipeline_of(&value).unwrap().fix.fstab_mode, Some(FstabMode::BypathOnly));
    let value = example_with("/pipeline/fix/update_grub", json!(false));
    assert_eq!(pipeline_of(&value).unwrap().fix.update_grub, Some(false));
}

#[test]
fn bad_pipeline_values_are_refused_naming_their_path() {
    let cases = [
        ("/pipeline/inspect/enabled", json!("maybe"), "pipeline.inspect.enabled"),
        ("/pipeline/inspect/collect_guest_info", json!([]), "pipeline.inspect.collect_guest_info"),
        ("/pipeline/fix/enabled", json!({}), "pipeline.fix.enabled"),
        ("/pipeline/fix/backup", json!("sometimes"), "pipeline.fix.backup"),
        ("/pipeline/fix/update_grub", json!("x"), "pipeline.fix.update_grub"),
        ("/pipeline/fix/regen_initramfs", json!(2.5), "pipeline.fix.regen_initramfs"),
        ("/pipeline/fix/remove_vmware_tools", json!("n/a"), "pipeline.fix.remove_vmware_tools"),
        ("/pipeline/fix/fstab_mode", json!("uuid"), "pipeline.fix.fstab_mode"),
        ("/pipeline/fix/fstab_mode", json!(true), "pipeline.fix.fstab_mode"),
        ("/pipeline/validate/enabled", json!("on?"), "pipeline.validate.enabled"),
        ("/pipeline/validate/check_image_integrity", json!("x"), "pipeline.validate.check_image_integrity"),
    ];
    for (pointer, bad, field) in cases {
        let err = parse_value(&example_with(pointer, bad.clone())).unwrap_err();
        assert!(matches!(&err, ManifestError::BadValue { field: f, .. } if f == field), "{pointer}={bad}: {err:?}");
        assert_user_message(&err, &[field]);
    }
    let err = parse_value(&example_with("/pipeline/fix/fstab_mode", json!("uuid"))).unwrap_err();
    assert_user_message(&err, &["stabilize-all, bypath-only or noop"]);
    // A step that is not an object at all: the schema error names it.
    let err = parse_value(&example_with("/pipeline/fix", json!("yes"))).unwrap_err();
    assert!(matches!(err, ManifestError::Schema(_)), "{err:?}");
    assert_user_message(&err, &["pipeline.fix"]);
}

#[test]
fn unknown_keys_in_guest_steps_are_still_warned() {
    let value = example_with("/pipeline/fix/rewrite_network", json!(true));
    let (_, pipeline, warnings) = parse_job(&serde_json::to_vec(&value).unwrap(), FILE_NAME).unwrap();
    assert!(pipeline.fix.enabled);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("pipeline.fix.rewrite_network"), "{warnings:?}");
}
