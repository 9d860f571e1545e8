#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/ (needs qemu-img).

    python3 fuzz/make_seeds.py

Seeds come from the project's real test files (tests/data/vmware, tests/data/ova/cot, conf.d,
../shared/manifest-example.json) and from small disks made by `qemu-img convert -f raw -O vmdk
-o subformat=…`; each is kept under about 64 KiB, so the seeds can be committed. What the
fuzzer adds goes to fuzz/corpus/<target>/, which git ignores.

The OVAs reuse the vSphere OVF and tar writer of tests/data/ova/make_samples.py with 1 MiB
disks; vmdk_descriptor's seeds name the files its target puts beside them (flat.bin,
sparse.vmdk, parent.vmdk: see fuzz_targets/vmdk_descriptor.rs).
"""

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEEDS = os.path.join(HERE, "seeds")
MAX_SEED = 70 << 10

sys.dont_write_bytecode = True  # no __pycache__ in tests/data/ova
sys.path.insert(0, os.path.join(ROOT, "tests", "data", "ova"))
import make_samples  # noqa: E402  (the OVF template and tar writer of the OVA test data)


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    assert len(data) <= MAX_SEED, f"{target}/{name} is {len(data)} bytes"
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(*parts):
    with open(os.path.join(ROOT, *parts), "rb") as f:
        return f.read()


def raw_disk(size):
    """Zeros with a text line at 0, 4 KiB of noise at size/2 and a 10 000-byte run near the
    end: a few grains, compressible and not."""
    data = bytearray(size)
    head = b"hyper2kvm fuzz seed disk\n"
    data[: len(head)] = head
    state = 0x9E3779B97F4A7C15
    mid = size // 2
    for i in range(0, 4096, 8):
        state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 7
        state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
        data[mid + i : mid + i + 8] = state.to_bytes(8, "little")
    data[size - 13000 : size - 3000] = b"\x5a" * 10000
    return bytes(data)


def qemu_vmdk(tmp, raw, subformat, extra=""):
    """`qemu-img convert` of `raw` to a VMDK of `subformat`; returns the output's directory
    and file name (descriptor subformats write several files)."""
    src = os.path.join(tmp, "seed.raw")
    with open(src, "wb") as f:
        f.write(raw)
    out_dir = os.path.join(tmp, subformat + extra.replace("=", "-").replace(",", "-"))
    os.makedirs(out_dir)
    out = os.path.join(out_dir, "disk.vmdk")
    opts = "subformat=" + subformat + ("," + extra if extra else "")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", opts, src, out], check=True)
    return out_dir, out


def same_as_raw(tmp, vmdk, raw):
    """Whether qemu-img reads `vmdk` (bytes) as `raw`."""
    a, b = os.path.join(tmp, "check.vmdk"), os.path.join(tmp, "check.raw")
    with open(a, "wb") as f:
        f.write(vmdk)
    with open(b, "wb") as f:
        f.write(raw)
    r = subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", a, b], capture_output=True)
    return r.returncode == 0


def sparse_header(capacity, grain, gtes, desc_sectors, rgd, gd, overhead, version=1, flags=3, compression=0):
    h = bytearray(512)
    h[0:4] = b"KDMV"
    h[4:8] = version.to_bytes(4, "little")
    h[8:12] = flags.to_bytes(4, "little")
    h[12:20] = capacity.to_bytes(8, "little")
    h[20:28] = grain.to_bytes(8, "little")
    h[28:36] = (1 if desc_sectors else 0).to_bytes(8, "little")
    h[36:44] = desc_sectors.to_bytes(8, "little")
    h[44:48] = gtes.to_bytes(4, "little")
    h[48:56] = rgd.to_bytes(8, "little")
    h[56:64] = gd.to_bytes(8, "little", signed=gd < 0)
    h[64:72] = overhead.to_bytes(8, "little")
    h[73:77] = b"\n \r\n"
    h[77:79] = compression.to_bytes(2, "little")
    return bytes(h)


def descriptor_text(create_type, capacity):
    return (
        "# Disk DescriptorFile\nversion=1\nCID=1a2b3c4d\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n\n# Extent description\nRW {capacity} SPARSE "disk.vmdk"\n\n'
        '# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\nddb.adapterType = "ide"\n'
    ).encode()


def compact_sparse(raw, grain=8, zeroed=False):
    """A monolithicSparse extent with small grains packed right after its tables (qemu-img
    aligns everything to 64 KiB): header, descriptor, redundant GD and GT, GD and GT, grains.
    With `zeroed`, all-zero grains are recorded as zeroed grains (GT entry 1, version 2)."""
    capacity = len(raw) // 512
    gtes = 512
    grains = capacity // grain
    tables = -(-grains // gtes)
    gt_sectors = -(-gtes * 4 // 512)
    gd_sectors = -(-tables * 4 // 512)
    desc = descriptor_text("monolithicSparse", capacity)
    desc_sectors = -(-len(desc) // 512)
    rgd = 1 + desc_sectors
    rgt = rgd + gd_sectors
    gd = rgt + tables * gt_sectors
    gt = gd + gd_sectors
    overhead = gt + tables * gt_sectors
    entries = [0] * (tables * gtes)
    body = bytearray()
    for g in range(grains):
        chunk = raw[g * grain * 512 : (g + 1) * grain * 512]
        if any(chunk):
            entries[g] = overhead + len(body) // 512
            body += chunk
        elif zeroed:
            entries[g] = 1
    table = b"".join(e.to_bytes(4, "little") for e in entries).ljust(tables * gt_sectors * 512, b"\0")

    def directory(first):
        return b"".join((first + t * gt_sectors).to_bytes(4, "little") for t in range(tables)).ljust(
            gd_sectors * 512, b"\0"
        )

    flags = 3 | (4 if zeroed else 0)
    out = sparse_header(capacity, grain, gtes, desc_sectors, rgd, gd, overhead, 2 if zeroed else 1, flags)
    out += desc.ljust(desc_sectors * 512, b"\0") + directory(rgt) + table + directory(gt) + table + bytes(body)
    assert len(out) == (overhead * 512 + len(body))
    return out


def marker(val, kind):
    return val.to_bytes(8, "little") + bytes(4) + kind.to_bytes(4, "little") + bytes(496)


def vmware_stream(raw, overhead=None):
    """A streamOptimized extent in VMware's shape (as VMDKstream and the vmdk tests write it):
    GD offset -1 in the header, grains in LBA order behind markers, a GT marker and table after
    each table's grains, GD marker and GD, footer marker, footer, end-of-stream marker. Grains
    start right after the descriptor unless `overhead` (sectors) says otherwise."""
    capacity = len(raw) // 512
    grain = 128
    grains = -(-capacity // grain)
    tables = -(-grains // 512)
    desc = descriptor_text("streamOptimized", capacity)
    desc_sectors = -(-len(desc) // 512)
    overhead = overhead or 1 + desc_sectors
    head = sparse_header(capacity, grain, 512, desc_sectors, 0, -1, overhead, 3, 0x30001, 1)
    out = bytearray(head + desc)
    out = out.ljust(overhead * 512, b"\0")
    gd = [0] * tables
    for t in range(tables):
        gt = [0] * 512
        for i in range(512):
            g = t * 512 + i
            if g >= grains:
                break
            chunk = raw[g * grain * 512 : (g + 1) * grain * 512]
            if not any(chunk):
                continue
            gt[i] = len(out) // 512
            z = zlib.compress(chunk)
            out += (g * grain).to_bytes(8, "little") + len(z).to_bytes(4, "little") + z
            out = out.ljust(-(-len(out) // 512) * 512, b"\0")
        if any(gt):
            out += marker(4, 1)
            gd[t] = len(out) // 512
            out += b"".join(e.to_bytes(4, "little") for e in gt)
    out += marker(-(-tables * 4 // 512), 2)
    gd_sector = len(out) // 512
    out += b"".join(e.to_bytes(4, "little") for e in gd)
    out = out.ljust(-(-len(out) // 512) * 512, b"\0")
    out += marker(1, 3)
    out += sparse_header(capacity, grain, 512, desc_sectors, 0, gd_sector, overhead, 3, 0x30001, 1)
    out += marker(0, 0)
    return bytes(out)


def embedded_descriptor(vmdk):
    """The text descriptor embedded in a sparse extent (header fields at 28 and 36)."""
    off = int.from_bytes(vmdk[28:36], "little") * 512
    size = int.from_bytes(vmdk[36:44], "little") * 512
    return vmdk[off : off + size].split(b"\0", 1)[0]


def fixed_cid(data):
    """qemu-img picks a random CID: a fixed one keeps the seeds the same from run to run."""
    return re.sub(rb"(?m)^CID=[0-9a-f]{8}$", b"CID=5eed5eed", data)


def trimmed(data, keep_zero_sectors):
    """`data` without its trailing zero sectors (qemu-img pads its output to 64 KiB)."""
    n = len(data)
    while n > 512 and not any(data[n - 512 : n]):
        n -= 512
    return data[: n + 512 * keep_zero_sectors]


def vmdk_seeds(tmp):
    raw = raw_disk(1 << 20)
    files = {
        "compact-monolithicSparse-1M.vmdk": compact_sparse(raw),
        "compact-monolithicSparse-zeroed-1M.vmdk": compact_sparse(raw, zeroed=True),
        "vmware-stream-1M.vmdk": vmware_stream(raw),
    }
    # qemu-img's own: an empty 1 MiB monolithicSparse, and a stream without its padding (the
    # zero sector after the last grain is the end-of-stream marker).
    _, out = qemu_vmdk(tmp, bytes(1 << 20), "monolithicSparse")
    with open(out, "rb") as f:
        files["qemu-monolithicSparse-empty-1M.vmdk"] = fixed_cid(f.read())
    _, out = qemu_vmdk(tmp, raw, "streamOptimized")
    with open(out, "rb") as f:
        files["qemu-streamOptimized-1M.vmdk"] = fixed_cid(trimmed(f.read(), 1))
    for name, data in files.items():
        expected = bytes(1 << 20) if "empty" in name else raw
        assert same_as_raw(tmp, data, expected), f"qemu-img does not read {name} as its raw image"
    # A real VirtualBox/VMware-shaped stream: grain directory in the footer (68 608 bytes).
    files["cot-ubuntu.2.0-disk1.vmdk"] = read("tests", "data", "vmware", "ubuntu.2.0-disk1.vmdk")
    for name, data in files.items():
        write("vmdk_sparse", name, data)
    return files


def descriptor_seeds(tmp, sparse):
    raw = raw_disk(1 << 20)
    # Descriptor files qemu-img writes, their extents renamed to the files the target provides.
    for subformat, extent in [
        ("monolithicFlat", "flat.bin"),
        ("twoGbMaxExtentFlat", "flat.bin"),
        ("twoGbMaxExtentSparse", "sparse.vmdk"),
    ]:
        _, out = qemu_vmdk(tmp, raw, subformat)
        with open(out, "rb") as f:
            text = fixed_cid(f.read()).decode()
        # 1 MiB of flat data does not fit the 128 KiB flat.bin: claim 256 sectors.
        if extent == "flat.bin":
            text = re.sub(r'(RW) \d+ FLAT "[^"]*" 0', r'\1 256 FLAT "flat.bin" 0', text)
        else:
            text = re.sub(r'"disk-s001\.vmdk"', '"sparse.vmdk"', text)
        write("vmdk_descriptor", "qemu-" + subformat + ".txt", text)
    # Descriptors embedded in real extents.
    for name, data in sparse.items():
        if name.startswith("compact-") or name.startswith("vmware-"):
            continue
        text = embedded_descriptor(data)
        if text:
            write("vmdk_descriptor", "embedded-" + name.replace(".vmdk", ".txt"), text)
    for name in ["blank.vmdk", "input.vmdk"]:
        write("vmdk_descriptor", "embedded-cot-" + name.replace(".vmdk", ".txt"),
              embedded_descriptor(read("tests", "data", "vmware", name)))
    # Hand-written: the module doc's example, ZERO and VMFS extents, CRLF, a delta disk.
    write("vmdk_descriptor", "mixed-extents.txt", """# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="twoGbMaxExtentSparse"
RW 2048 SPARSE "sparse.vmdk"
RW 128 FLAT "flat.bin" 128
RDONLY 2048 ZERO
RW 64 VMFS "flat.bin"
ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "16"
ddb.uuid = "60 00 C2 9a 6c 5e 3b 1d-5a 67 2b 8e 1f 4c 2d 11"
""")
    write("vmdk_descriptor", "crlf-unquoted.txt",
          "# Disk DescriptorFile\r\nversion=1\r\nCID=0000abcd\r\nparentCID=ffffffff\r\n"
          "createType=monolithicFlat\r\nRW 256 FLAT flat.bin 0\r\nddb.virtualHWVersion = 19\r\n")
    write("vmdk_descriptor", "delta.txt", """# Disk DescriptorFile
version=1
CID=9abcdef0
parentCID=12345678
createType="monolithicSparse"
parentFileNameHint="/vmfs/volumes/datastore1/vm/parent.vmdk"
RW 2048 SPARSE "sparse.vmdk"
""")
    # Many extents (a split disk): gives the fuzzer room for long descriptors.
    lines = "".join(
        'RW 2048 SPARSE "sparse.vmdk"\nRW 256 FLAT "flat.bin" %d\nRW %d ZERO\n' % (i % 3 * 8, 1 << i) for i in range(24)
    )
    write("vmdk_descriptor", "many-extents.txt",
          '# Disk DescriptorFile\nversion=1\nCID=00c0ffee\nparentCID=ffffffff\ncreateType="twoGbMaxExtentSparse"\n'
          + lines + 'ddb.adapterType = "lsilogic"\n')
    write("vmdk_descriptor", "unsupported-extents.txt", """# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="vmfsRawDeviceMap"
RW 2048 VMFSRDM "disk-rdm.vmdk"
RW 2048 SESPARSE "disk-sesparse.vmdk"
NOACCESS 2048 VMFSSPARSE "disk-delta.vmdk"
""")


def manifest_seeds():
    write("manifest", "shared-manifest-example.json", read("..", "shared", "manifest-example.json"))
    write("manifest", "minimal.json", """{"manifest_version": "1.0",
 "source": {"vm_name": "web-01"},
 "disks": [{"id": "disk-0", "source_format": "vmdk", "local_path": "/exports/web-01/disk-0.vmdk"}]}
""")
    write("manifest", "ova-uefi.json", """{"manifest_version": "1.0",
 "source": {"provider": "ova", "vm_id": 42, "vm_name": "Windows Server <2022> & \\"co\\""},
 "vm": {"cpu": "8", "mem_gb": 15.5, "firmware": "uefi", "secureboot": true,
        "os_hint": "windows", "os_version": "windows2019srv_64Guest"},
 "disks": [{"id": "ova", "source_format": "ova", "local_path": "/exports/w.ova",
            "checksum": "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"},
           {"id": "d2", "source_format": "raw", "local_path": "/exports/d2.img", "bytes": "1048576",
            "boot_order_hint": 0, "disk_type": "boot"}],
 "nics": [{"mac": "00:50:56:AA:BB:CC", "network": "VM Network"}, {"id": "nic-1"}],
 "pipeline": {"convert": {"enabled": true, "compress": true, "compress_level": 9}},
 "output": {"format": "qcow2"}}
""")


def config_seeds():
    for name in sorted(os.listdir(os.path.join(ROOT, "conf.d"))):
        text = read("conf.d", name).decode()
        write("config_envfile", name, text)
        # The same with every documented key set, so the values reach the resolver.
        active = re.sub(r"(?m)^#([A-Z][A-Z0-9_]*=)", r"\1", text)
        write("config_envfile", name.replace(".conf", "-uncommented.conf"), active)
    write("config_envfile", "quoting.conf", """# quotes, escapes, continuation, comments
INSTANCE_NAME=vsphere
WATCH_DIR="/srv/queue with spaces"
OUTPUT_DIR='/srv/out'
LOG_LEVEL = debug
; a semicolon comment
QEMU_CONVERT_OPTIONS="-p -c -O qcow2 -o compression_type=zstd,cluster_size=65536 -m 8 -W"
LIBVIRT_NETWORK="def\\"ault\\n" \\
   continued
""")


def ova_seeds(tmp, stream):
    cot = os.path.join(ROOT, "tests", "data", "ova", "cot")
    for name in sorted(os.listdir(cot)):
        if name.endswith(".ovf"):
            with open(os.path.join(cot, name), "rb") as f:
                write("ovf", "cot-" + name, f.read())
    with open(os.path.join(cot, "ubuntu.2.0.mf"), "rb") as f:
        write("ova_mf", "cot-ubuntu.2.0.mf", f.read())

    nvram = b"NVRAM sample (not a real one)\n" * 2

    def package(prefix, disk1, disk2, nvram_name, algo):
        ovf = make_samples.VSPHERE_OVF.format(
            disk1=disk1, disk2=disk2, nvram=nvram_name, size1=len(stream), size2=len(stream), size3=len(nvram)
        ).encode()
        payload = [("ova-sample.ovf", ovf), (disk1, stream), (disk2, stream), (nvram_name, nvram)]
        mf = "".join(
            "%s(%s)= %s\n" % (algo.upper(), n, hashlib.new(algo, d).hexdigest()) for n, d in payload
        ).encode()
        files = [payload[0], ("ova-sample.mf", mf)] + payload[1:]
        return [(prefix + n, d) for n, d in files], ovf, mf

    def tar(fmt, files):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
            for name, data in files:
                make_samples.add(t, name, data)
        return buf.getvalue()

    long = "a-rather-long-virtual-machine-name-exported-from-a-datacenter-folder-with-a-long-path"
    files, ovf, mf = package("", "ova-sample-disk1.vmdk", "disks/" + long + "-disk2.vmdk", "f.nvram", "sha256")
    write("ova", "vsphere-ustar.ova", tar(tarfile.USTAR_FORMAT, files))
    write("ovf", "vsphere-sample.ovf", ovf)
    write("ova_mf", "vsphere-sha256.mf", mf)
    files, _, mf = package("export/", long + "-disk1.vmdk", long + "-disk2.vmdk", long + ".nvram", "sha1")
    write("ova", "vsphere-gnu.ova", tar(tarfile.GNU_FORMAT, files))
    write("ova_mf", "vsphere-sha1.mf", mf)
    files, _, mf = package("", "disque-système-1.vmdk", "données-2.vmdk", "f.nvram", "sha512")
    write("ova", "vsphere-pax-sha512.ova", tar(tarfile.PAX_FORMAT, files))
    write("ova_mf", "vsphere-sha512.mf", mf)
    # cot's real OVF 2.0 (VirtualBox) with a 1 MiB stream in place of its 68 KiB disk.
    with open(os.path.join(cot, "ubuntu.2.0.ovf"), "rb") as f:
        ovf = f.read()
    ovf = re.sub(rb'ovf:size="\d+"', b'ovf:size="%d"' % len(stream), ovf)
    disk = "ubuntu.2.0-disk1.vmdk"
    mf = b"".join(b"SHA256(%s)= %s\n" % (n.encode(), hashlib.sha256(d).hexdigest().encode())
                  for n, d in [("ubuntu.2.0.ovf", ovf), (disk, stream)])
    write("ova", "cot-ubuntu.2.0-small.ova",
          tar(tarfile.USTAR_FORMAT, [("ubuntu.2.0.ovf", ovf), ("ubuntu.2.0.mf", mf), (disk, stream)]))


def host_caps_seeds():
    write("host_caps", "kvm-host.xml", """<capabilities>

  <host>
    <uuid>4c4c4544-0035-3010-8052-b4c04f4a4a32</uuid>
    <cpu>
      <arch>x86_64</arch>
      <model>Skylake-Client-IBRS</model>
      <vendor>Intel</vendor>
      <microcode version='240'/>
      <counter name='tsc' frequency='2112000000' scaling='no'/>
      <topology sockets='1' dies='1' cores='4' threads='2'/>
      <feature name='ds'/>
      <feature name='vmx'/>
      <pages unit='KiB' size='4'/>
      <pages unit='KiB' size='2048'/>
    </cpu>
    <power_management>
      <suspend_mem/>
    </power_management>
    <iommu support='yes'/>
    <migration_features>
      <live/>
      <uri_transports>
        <uri_transport>tcp</uri_transport>
        <uri_transport>rdma</uri_transport>
      </uri_transports>
    </migration_features>
    <topology>
      <cells num='1'>
        <cell id='0'>
          <memory unit='KiB'>16206096</memory>
          <cpus num='2'>
            <cpu id='0' socket_id='0' die_id='0' core_id='0' siblings='0,4'/>
            <cpu id='1' socket_id='0' die_id='0' core_id='1' siblings='1,5'/>
          </cpus>
        </cell>
      </cells>
    </topology>
    <secmodel>
      <model>apparmor</model>
      <doi>0</doi>
    </secmodel>
    <secmodel>
      <model>dac</model>
      <doi>0</doi>
      <baselabel type='kvm'>+64055:+994</baselabel>
      <baselabel type='qemu'>+64055:+994</baselabel>
    </secmodel>
  </host>

  <guest>
    <os_type>hvm</os_type>
    <arch name='i686'>
      <wordsize>32</wordsize>
      <emulator>/usr/bin/qemu-system-i386</emulator>
      <machine maxCpus='255'>pc-i440fx-8.2</machine>
      <domain type='qemu'/>
      <domain type='kvm'/>
    </arch>
    <features>
      <pae/>
      <nonpae/>
      <acpi default='on' toggle='yes'/>
    </features>
  </guest>

  <guest>
    <os_type>hvm</os_type>
    <arch name='x86_64'>
      <wordsize>64</wordsize>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <machine maxCpus='255'>pc-i440fx-8.2</machine>
      <machine canonical='pc-q35-8.2' maxCpus='4096'>q35</machine>
      <domain type='qemu'/>
      <domain type='kvm'/>
    </arch>
    <features>
      <acpi default='on' toggle='yes'/>
      <apic default='on' toggle='no'/>
      <cpuselection/>
      <deviceboot/>
      <disksnapshot default='on' toggle='no'/>
    </features>
  </guest>

</capabilities>
""")
    write("host_caps", "emulated-only.xml", """<capabilities><host><cpu><arch>x86_64</arch></cpu></host>
<guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/><domain type='kvm'/></arch></guest>
<guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>
<emulator>/usr/bin/qemu-system-x86_64</emulator><domain type='qemu'/></arch></guest>
</capabilities>
""")
    write("host_caps", "test-driver.xml", """<capabilities><host><cpu><arch>i686</arch></cpu></host>
<guest><os_type>hvm</os_type><arch name='x86_64'><domain type='test'/></arch>
<features><pae/><nonpae/></features></guest>
<guest><os_type>xen</os_type><arch name='x86_64'><domain type="&#107;vm"/></arch></guest>
</capabilities>
""")


def lock_record_seeds():
    """`<lock file name>\n<record>`: a daemon's records, and the planted ones of issue 10."""
    job = "20260101T000000Z-00000000deadbeef"
    record = ('{"job_id": "%s", "host": "node-1", "boot_id": "6f0c2b9e-3d1a-4c55-9a57-0d4c1b2a3f10",'
              ' "pid": 4242, "instance": %s, "generation": %s, "claimed_at": "2026-01-01T00:00:00.123456Z",'
              ' "manifest_name": "%s"}')
    seeds = {
        "daemon.seed": (job + ".lock", record % (job, '"prod"', "1", "artifact-manifest.json")),
        "aside.seed": (job + ".lock.taken-0a1b2c3d4e5f6a7b", record % (job, "null", "7", "artifact-manifest.json")),
        "requeued.seed": (job + ".lock", record % (job, "null", "2", "artifact-manifest.requeued-" + job + ".json")),
        "traversal.seed": (job + ".lock", record % ("../../elsewhere/J", "null", "1", "artifact-manifest.json")),
        "absolute.seed": (job + ".lock", record % (job, "null", "1", "/etc/cron.d/evil.json")),
        "max-generation.seed": (job + ".lock", record % (job, "null", "18446744073709551615", "m.json")),
        "torn.seed": (job + ".lock", (record % (job, "null", "1", "m.json"))[:40]),
        "bad-name.seed": ("orphan.lock", record % ("orphan", "null", "1", "m.json")),
    }
    for name, (file_name, text) in seeds.items():
        write("lock_record", name, file_name + "\n" + text)


def qemu_img_info_seeds(tmp):
    """`qemu-img info --output=json` of one image (its chain not followed), as the daemon reads
    it: backing files (relative, absolute, protocols), qcow2 data files, every format."""
    d = os.path.join(tmp, "qinfo")
    os.makedirs(d, exist_ok=True)

    def img(*args):
        subprocess.run(["qemu-img", *args], cwd=d, check=True, capture_output=True)

    def info(name, image, fmt):
        out = subprocess.run(["qemu-img", "info", "--output=json", "-U", "-f", fmt, image],
                             cwd=d, check=True, capture_output=True).stdout
        write("qemu_img_info", name, out.replace(d.encode(), b"/exports/vm"))

    img("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    info("qcow2.json", "base.qcow2", "qcow2")
    img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "top.qcow2")
    info("qcow2-backing-relative.json", "top.qcow2", "qcow2")
    img("create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", "/etc/shadow", "abs.qcow2", "1M")
    info("qcow2-backing-absolute.json", "abs.qcow2", "qcow2")
    img("create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", "nbd://127.0.0.1:10809/x", "nbd.qcow2", "1M")
    info("qcow2-backing-nbd.json", "nbd.qcow2", "qcow2")
    img("create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b",
        'json:{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":"10809"},"export":"x"}',
        "json.qcow2", "1M")
    info("qcow2-backing-json.json", "json.qcow2", "qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "data.qcow2", "1M")
    info("qcow2-data-file.json", "data.qcow2", "qcow2")
    for fmt, name in [("vpc", "disk.vhd"), ("vhdx", "disk.vhdx"), ("vdi", "disk.vdi"), ("raw", "disk.raw")]:
        img("create", "-q", "-f", fmt, name, "1M")
        info(f"{fmt}.json", name, fmt)


def main():
    if os.path.isdir(SEEDS):
        shutil.rmtree(SEEDS)
    with tempfile.TemporaryDirectory() as tmp:
        sparse = vmdk_seeds(tmp)
        descriptor_seeds(tmp, sparse)
        ova_seeds(tmp, sparse["vmware-stream-1M.vmdk"])
        qemu_img_info_seeds(tmp)
    manifest_seeds()
    config_seeds()
    host_caps_seeds()
    lock_record_seeds()
    for target in sorted(os.listdir(SEEDS)):
        d = os.path.join(SEEDS, target)
        names = sorted(os.listdir(d))
        total = sum(os.path.getsize(os.path.join(d, n)) for n in names)
        print(f"{target}: {len(names)} seeds, {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
