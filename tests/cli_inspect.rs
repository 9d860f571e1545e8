//! `hyper2kvm inspect` and `hyper2kvm convert` run by hand, on images made by the real
//! `qemu-img`: what inspect reports (format, subformat, sizes, extents, delta chain, an OVA's
//! disks and hardware) in JSON and in its human form, and how convert treats an OVA (every
//! disk, `.mf` verified), failures and interruptions (nothing left under DST, no temporary
//! file) and a stderr that is not a terminal (silence).

mod common;

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::*;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SAMPLE_OVA: &str = "tests/data/ova/vsphere-ustar.ova";

/// Runs `hyper2kvm ARGS…` with stdout and stderr captured (so neither is a terminal).
fn h2k<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["--config-dir", "/nonexistent"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hyper2kvm")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn inspect_json(path: &Path) -> Value {
    let out = h2k(&[OsStr::new("inspect"), OsStr::new("--json"), path.as_os_str()]);
    assert!(out.status.success(), "inspect --json {}: {}", path.display(), stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("inspect --json prints JSON ({e}): {}", stdout(&out)))
}

fn inspect_text(path: &Path) -> String {
    let out = h2k(&[OsStr::new("inspect"), path.as_os_str()]);
    assert!(out.status.success(), "inspect {}: {}", path.display(), stderr(&out));
    stdout(&out)
}

fn convert(src: &Path, dst: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec![OsStr::new("convert")];
    args.extend(extra.iter().map(OsStr::new));
    args.extend([src.as_os_str(), OsStr::new("-o"), dst.as_os_str()]);
    h2k(&args)
}

/// Bytes `qemu-img map` reports as data (across a backing chain, as inspect counts them).
fn qemu_data_bytes(path: &Path, format: &str) -> u64 {
    let map: Value =
        serde_json::from_str(&run(Command::new("qemu-img").args(["map", "--output=json", "-f", format]).arg(path)))
            .unwrap();
    map.as_array().unwrap().iter().filter(|e| e["data"] == true).map(|e| e["length"].as_u64().unwrap()).sum()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// An OVA member cut out by the byte range Python's tarfile recorded.
fn extract_member(ova: &str, name_suffix: &str, out: &Path) -> PathBuf {
    let members: Value = serde_json::from_slice(&std::fs::read(format!("{ova}.members.json")).unwrap()).unwrap();
    ova_member(Path::new(ova), &members, name_suffix, out)
}

#[test]
fn inspect_lists_a_delta_chain_with_the_extents_of_each_disk() {
    let env = Env::new();
    let raw = small_raw(&env.exports.join("disk.raw"));
    let (base, child) = delta_chain(&env.exports.join("chain"), &raw);
    let info = inspect_json(&child);
    assert_eq!(info["format"], "vmdk", "{info:#}");
    assert_eq!(info["subformat"], "monolithicSparse");
    assert_eq!(info["virtual_size"], 64 * MIB);
    assert_eq!(info["allocated_bytes"], qemu_data_bytes(&child, "vmdk"), "allocated over the chain, as qemu maps it");
    assert_eq!(strings(&info["chain"]), [show(&child), show(&base)], "the chain, child first, depth 2");
    assert_eq!(strings(&info["referenced_files"]), [show(&base)]);
    let extents = info["extents"].as_array().unwrap();
    assert_eq!(extents.len(), 2, "one sparse extent per disk of the chain: {info:#}");
    for (extent, disk) in extents.iter().zip([&child, &base]) {
        assert_eq!(extent["disk"], show(disk));
        assert_eq!(extent["file"], show(disk), "a monolithic sparse disk is its own extent");
        assert_eq!(extent["type"], "SPARSE");
        assert_eq!(extent["access"], "RW");
        assert_eq!(extent["sectors"], 64 * MIB / 512);
        assert_eq!(extent["bytes"], 64 * MIB);
        assert_eq!(extent["virtual_offset"], 0);
        assert_eq!(extent["file_offset"], 0);
    }

    let text = inspect_text(&child);
    for line in [
        "format: vmdk\n",
        "subformat: monolithicSparse\n",
        "virtual_size: 67108864 (64 MiB)\n",
        "allocated_bytes: ",
        "extents:\n",
        "  - [1]\n",
        "    type: SPARSE\n",
        "    bytes: 67108864 (64 MiB)\n",
        "chain:\n",
        &format!("  - {}\n", child.display()),
        &format!("  - {}\n", base.display()),
        "referenced_files:\n",
    ] {
        assert!(text.contains(line), "the human form has {line:?}:\n{text}");
    }
    assert!(text.starts_with("format: vmdk\n"), "the format comes first:\n{text}");
}

#[test]
fn inspect_lists_every_extent_of_a_two_gb_max_extent_sparse_disk() {
    let env = Env::new();
    let dir = env.exports.join("split");
    std::fs::create_dir_all(&dir).unwrap();
    let vmdk = dir.join("big.vmdk");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"])
        .arg(&vmdk)
        .arg("5G"));
    qemu_io("vmdk", &vmdk, &["write -P 0x5a 3G 1M"]);
    let info = inspect_json(&vmdk);
    assert_eq!(info["format"], "vmdk", "{info:#}");
    assert_eq!(info["subformat"], "twoGbMaxExtentSparse");
    assert_eq!(info["virtual_size"], 5u64 << 30);
    assert_eq!(info["allocated_bytes"], MIB, "the one MiB written");
    assert_eq!(info["chain"], serde_json::json!([]), "no parent");
    let files: Vec<String> = (1..=3).map(|n| show(&dir.join(format!("big-s00{n}.vmdk")))).collect();
    assert_eq!(strings(&info["referenced_files"]), files);
    let extents = info["extents"].as_array().unwrap();
    assert_eq!(extents.len(), 3, "{info:#}");
    let gib = 1u64 << 30;
    for (extent, (file, (start, len))) in
        extents.iter().zip(files.iter().zip([(0, 2 * gib), (2 * gib, 2 * gib), (4 * gib, gib)]))
    {
        assert_eq!(extent["disk"], show(&vmdk));
        assert_eq!(extent["file"], *file);
        assert_eq!(extent["type"], "SPARSE");
        assert_eq!(extent["access"], "RW");
        assert_eq!(extent["virtual_offset"], start);
        assert_eq!(extent["bytes"], len);
        assert_eq!(extent["sectors"], len / 512);
    }
}

#[test]
fn inspect_shows_flat_offsets_and_zero_extents_of_a_descriptor() {
    let env = Env::new();
    let dir = env.exports.join("desc");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.bin");
    create_raw(&data, (128 + 2048) * 512);
    qemu_io("raw", &data, &["write -P 0x77 64K 1M"]);
    let vmdk = dir.join("disk.vmdk");
    std::fs::write(
        &vmdk,
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 2048 FLAT \"data.bin\" 128\nRW 2048 ZERO\nddb.adapterType = \"lsilogic\"\n",
    )
    .unwrap();
    let info = inspect_json(&vmdk);
    assert_eq!(info["subformat"], "monolithicFlat", "{info:#}");
    assert_eq!(info["virtual_size"], 2 * MIB);
    assert_eq!(info["allocated_bytes"], MIB, "the ZERO extent holds nothing");
    assert_eq!(info["ddb"]["ddb.adapterType"], "lsilogic");
    let extents = info["extents"].as_array().unwrap();
    assert_eq!(extents.len(), 2, "{info:#}");
    assert_eq!(extents[0]["type"], "FLAT");
    assert_eq!(extents[0]["file"], show(&data));
    assert_eq!(extents[0]["file_offset"], 128 * 512, "the offset column, in bytes");
    assert_eq!(extents[0]["virtual_offset"], 0);
    assert_eq!(extents[0]["sectors"], 2048);
    assert_eq!(extents[1]["type"], "ZERO");
    assert_eq!(extents[1]["file"], Value::Null);
    assert_eq!(extents[1]["virtual_offset"], MIB);
    assert_eq!(extents[1]["bytes"], MIB);
}

#[test]
fn inspect_describes_an_ova_its_disks_and_its_hardware() {
    let env = Env::new();
    let ova = env.exports.join("appliance.ova");
    std::fs::copy(SAMPLE_OVA, &ova).unwrap();
    let info = inspect_json(&ova);
    assert_eq!(info["format"], "ova", "{info:#}");
    assert_eq!(info["ovf"], "ova-sample.ovf");
    assert_eq!(info["manifest_listed"], true);
    let disks = info["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{info:#}");
    for (disk, (id, size)) in disks.iter().zip([("vmdisk1", 2 * MIB), ("vmdisk2", MIB)]) {
        assert_eq!(disk["disk_id"], id);
        assert_eq!(disk["subformat"], "streamOptimized");
        assert_eq!(disk["capacity_bytes"], size);
        assert_eq!(disk["virtual_size"], size);
        assert_eq!(disk["allocated_bytes"], 128 * 1024, "the grains the sample disks hold");
        assert!(disk["member_bytes"].as_u64().unwrap() > 0);
    }
    assert_eq!(disks[0]["href"], "ova-sample-disk1.vmdk");
    let hw = &info["hardware"];
    assert_eq!(hw["cpu"], 2, "{hw:#}");
    assert_eq!(hw["memory_mib"], 2048);
    assert_eq!(hw["firmware"], "uefi");
    assert_eq!(hw["secure_boot"], true);
    assert_eq!(hw["nics"][0]["mac"], "00:50:56:a1:00:01");

    let text = inspect_text(&ova);
    for line in [
        "format: ova\n",
        "ovf: ova-sample.ovf\n",
        "hardware:\n",
        "  cpu: 2\n",
        "  memory_mib: 2048\n",
        "disks:\n",
        "    disk_id: vmdisk2\n",
        "    capacity_bytes: 2097152 (2 MiB)\n",
    ] {
        assert!(text.contains(line), "the human form has {line:?}:\n{text}");
    }
}

#[test]
fn inspect_counts_the_allocated_bytes_of_a_raw_image() {
    let env = Env::new();
    let raw = small_raw(&env.exports.join("disk.raw"));
    let info = inspect_json(&raw);
    assert_eq!(info["format"], "raw", "{info:#}");
    assert_eq!(info["subformat"], Value::Null);
    assert_eq!(info["virtual_size"], 64 * MIB);
    let allocated = info["allocated_bytes"].as_u64().expect("raw images report allocated bytes");
    assert_eq!(allocated, qemu_data_bytes(&raw, "raw"), "the data ranges SEEK_DATA finds, as qemu's");
    assert!((5 * MIB + 512 * 1024..=64 * MIB).contains(&allocated), "at least the bytes written: {allocated}");
    assert_eq!(info["extents"], serde_json::json!([]));
    assert_eq!(info["chain"], serde_json::json!([]));

    let text = inspect_text(&raw);
    for line in
        ["format: raw\n", "virtual_size: 67108864 (64 MiB)\n", "allocated_bytes: ", "extents: none\n", "chain: none\n"]
    {
        assert!(text.contains(line), "the human form has {line:?}:\n{text}");
    }
}

#[test]
fn convert_writes_every_disk_of_an_ova_beside_dst_once_its_mf_matched() {
    let env = Env::new();
    let ova = env.exports.join("appliance.ova");
    std::fs::copy(SAMPLE_OVA, &ova).unwrap();
    let out_dir = env.root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let dst = out_dir.join("vm.qcow2");
    let out = convert(&ova, &dst, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = out_dir.join("vm-vmdisk2.qcow2");
    assert_eq!(stdout(&out), format!("{}\n{}\n", dst.display(), second.display()), "the files written");
    assert_eq!(stderr(&out), "", "nothing on stderr off a terminal");
    assert_eq!(entries(&out_dir), ["vm-vmdisk2.qcow2", "vm.qcow2"], "no temporary file is left");
    let disk1 = extract_member(SAMPLE_OVA, "ova-sample-disk1.vmdk", &env.root.join("disk1.vmdk"));
    let disk2 = extract_member(SAMPLE_OVA, "disk2.vmdk", &env.root.join("disk2.vmdk"));
    assert_same_contents(&dst, "qcow2", &disk1, "vmdk");
    assert_same_contents(&second, "qcow2", &disk2, "vmdk");

    // A name already taken stops it before anything is written.
    std::fs::remove_file(&dst).unwrap();
    let out = convert(&ova, &dst, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("vm-vmdisk2.qcow2 already exists"), "{}", stderr(&out));
    assert_eq!(entries(&out_dir), ["vm-vmdisk2.qcow2"]);
}

#[test]
fn convert_refuses_an_ova_that_does_not_match_its_mf() {
    let env = Env::new();
    let ova = env.exports.join("damaged.ova");
    let mut bytes = std::fs::read(SAMPLE_OVA).unwrap();
    let members: Value = serde_json::from_slice(&std::fs::read(format!("{SAMPLE_OVA}.members.json")).unwrap()).unwrap();
    let disk2 =
        members.as_array().unwrap().iter().find(|m| m["name"].as_str().unwrap().ends_with("disk2.vmdk")).unwrap();
    // One byte near the end of the second disk's data: the tar and the first disk stay valid.
    let at = (disk2["offset_data"].as_u64().unwrap() + disk2["size"].as_u64().unwrap() - 700) as usize;
    bytes[at] ^= 0x55;
    std::fs::write(&ova, bytes).unwrap();
    let out_dir = env.root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = convert(&ova, &out_dir.join("vm.qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("ova-sample.mf") && err.contains("disk2.vmdk"), "names the .mf and the member: {err}");
    assert_eq!(entries(&out_dir), Vec::<String>::new(), "nothing written");
}

#[test]
fn a_failing_convert_leaves_neither_dst_nor_a_temporary_file() {
    let env = Env::new();
    let raw = small_raw(&env.exports.join("disk.raw"));
    let out_dir = env.root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();

    // Truncated: refused when opened, before anything is written.
    let truncated = raw_to_vmdk(&raw, &env.exports.join("truncated.vmdk"), "monolithicSparse");
    truncate_half(&truncated);
    let out = convert(&truncated, &out_dir.join("truncated.qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("truncated.vmdk"), "{}", stderr(&out));
    assert_eq!(entries(&out_dir), Vec::<String>::new(), "no DST, no temporary file");

    // A damaged compressed grain: the image opens (inspect reads it), so the conversion
    // fails part-way, with its temporary file written.
    let damaged = raw_to_vmdk(&raw, &env.exports.join("damaged.vmdk"), "streamOptimized");
    let mut bytes = std::fs::read(&damaged).unwrap();
    let first_grain = u64::from_le_bytes(bytes[64..72].try_into().unwrap()) as usize * 512;
    let grain_len = u32::from_le_bytes(bytes[first_grain + 8..first_grain + 12].try_into().unwrap()) as usize;
    let middle = first_grain + 12 + grain_len / 2;
    bytes[middle..middle + 32].iter_mut().for_each(|b| *b ^= 0xff);
    std::fs::write(&damaged, bytes).unwrap();
    inspect_json(&damaged);
    let out = convert(&damaged, &out_dir.join("damaged.qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("damaged.vmdk"), "{}", stderr(&out));
    assert_eq!(entries(&out_dir), Vec::<String>::new(), "no DST, no temporary file");

    // A missing directory is named as such, not through the temporary file's name.
    let out = convert(&raw, &out_dir.join("missing").join("disk.qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("does not exist") && !stderr(&out).contains(".tmp"), "{}", stderr(&out));
}

#[test]
fn convert_off_a_terminal_prints_nothing() {
    let env = Env::new();
    let raw = small_raw(&env.exports.join("disk.raw"));
    let vmdk = raw_to_vmdk(&raw, &env.exports.join("disk.vmdk"), "streamOptimized");
    let dst = env.root.join("disk.qcow2");
    let out = convert(&vmdk, &dst, &["--compress=zstd"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "no progress bar and no summary when stderr is not a terminal");
    assert_eq!(stdout(&out), "", "a single disk: DST is the name chosen, nothing to tell");
    assert_same_contents(&dst, "qcow2", &raw, "raw");
}

#[test]
fn an_interrupted_convert_removes_its_temporary_file_and_ends_by_the_signal() {
    let env = Env::new();
    // Enough compressible data that the conversion is still running when the signal comes.
    let raw = env.exports.join("big.raw");
    create_raw(&raw, 128 * MIB);
    write_random(&raw, 0, (128 * MIB) as usize, 7);
    let out_dir = env.root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut child = Command::new(bin())
        .args(["--config-dir", "/nonexistent", "convert", "--compress=zlib", "--level", "9"])
        .arg(&raw)
        .arg("-o")
        .arg(out_dir.join("big.qcow2"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while entries(&out_dir).is_empty() {
        assert!(Instant::now() < deadline, "the temporary file never appeared");
        assert!(child.try_wait().unwrap().is_none(), "the conversion ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(10));
    }
    let temp = entries(&out_dir);
    assert!(temp.len() == 1 && temp[0].starts_with(".big.qcow2.") && temp[0].ends_with(".tmp"), "{temp:?}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGINT), "ends as SIGINT would: {out:?}");
    assert!(stderr(&out).contains("interrupted by SIGINT"), "{}", stderr(&out));
    assert_eq!(entries(&out_dir), Vec::<String>::new(), "no DST, no temporary file");
}

/// Issue 10: `convert vm.ovf` used to exit 0 with a "raw" image of the XML. An unpacked OVF
/// export is a package like an OVA: every disk converted, the `.mf` verified first.
#[test]
fn convert_and_inspect_read_an_unpacked_ovf_export() {
    let env = Env::new();
    let ovf = unpacked_ovf(Path::new(SAMPLE_OVA), &env.exports.join("vm-export"));
    let out_dir = env.root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let dst = out_dir.join("vm.qcow2");
    let out = convert(&ovf, &dst, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = out_dir.join("vm-vmdisk2.qcow2");
    assert_eq!(stdout(&out), format!("{}\n{}\n", dst.display(), second.display()), "the files written");
    assert_eq!(entries(&out_dir), ["vm-vmdisk2.qcow2", "vm.qcow2"]);
    let export = env.exports.join("vm-export");
    assert_same_contents(&dst, "qcow2", &export.join("ova-sample-disk1.vmdk"), "vmdk");
    let disk2 = std::fs::read_dir(export.join("disks")).unwrap().next().unwrap().unwrap().path();
    assert_same_contents(&second, "qcow2", &disk2, "vmdk");

    let info = inspect_json(&ovf);
    assert_eq!(info["format"], "ovf", "{info:#}");
    assert_eq!(info["manifest_listed"], true);
    let ids: Vec<&str> = info["disks"].as_array().unwrap().iter().map(|d| d["disk_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["vmdisk1", "vmdisk2"]);
    assert_eq!(info["disks"][1]["file"], show(&std::fs::canonicalize(&disk2).unwrap()));
    assert_eq!(info["hardware"]["firmware"], "uefi", "{info:#}");
    assert_eq!(info["hardware"]["memory_mib"], 2048);

    // A disk that does not match the .mf: nothing is written.
    let mut bytes = std::fs::read(&disk2).unwrap();
    let at = bytes.len() - 700;
    bytes[at] ^= 0x55;
    std::fs::write(&disk2, bytes).unwrap();
    let out = convert(&ovf, &out_dir.join("again.qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("ova-sample.mf") && stderr(&out).contains("disk2.vmdk"), "{}", stderr(&out));
    assert_eq!(entries(&out_dir), ["vm-vmdisk2.qcow2", "vm.qcow2"], "nothing more written");
}

/// Issue 10: a file that is plainly not a disk, given (or guessed) as raw, is refused with
/// what it looks like and what to do; nothing is written. A qcow2 named `.img` is read as the
/// qcow2 it is.
#[test]
fn convert_refuses_a_non_disk_file_as_raw_and_reads_a_disk_by_its_bytes() {
    let env = Env::new();
    let out_dir = env.root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let ovf = unpacked_ovf(Path::new(SAMPLE_OVA), &env.exports.join("vm-export"));
    let out = convert(&ovf, &out_dir.join("vm.qcow2"), &["--format", "raw"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let first = stderr(&out).lines().next().unwrap_or_default().to_owned();
    assert!(first.contains("an OVF descriptor (XML text), not a raw disk image") && first.contains("ova"), "{first}");
    let manifest = env.exports.join("notes");
    std::fs::write(&manifest, "{\"manifest_version\": \"1.0\", \"disks\": []}\n").unwrap();
    let out = convert(&manifest, &out_dir.join("notes.qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("JSON text, not a raw disk image"), "{}", stderr(&out));
    assert_eq!(entries(&out_dir), Vec::<String>::new(), "nothing written");

    let raw = small_raw(&env.exports.join("disk.raw"));
    let img = raw_to_qcow2(&raw, &env.exports.join("cloud.img"));
    let out = convert(&img, &out_dir.join("cloud.qcow2"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_contents(&out_dir.join("cloud.qcow2"), "qcow2", &raw, "raw");
}
