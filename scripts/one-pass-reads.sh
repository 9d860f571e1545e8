#!/bin/bash
# Bytes a daemon reads per job (issue 13): starts BINARY's daemon on a scratch queue, submits
# one manifest whose disk is SOURCE (with its sha256 as `checksum`), and prints the daemon's
# `rchar` (/proc/PID/io: every read of every thread, not its children's) from the manifest's
# arrival to V.qcow2 or V.error, against the source's size. A count, not a timing.
#
#   scripts/one-pass-reads.sh target/release/hyper2kvm /path/to/stream.vmdk vmdk
#
# SOURCE's directory becomes SOURCE_ROOTS; the scratch directory is under TMPDIR.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 BINARY SOURCE FORMAT" >&2; exit 2; }
bin=$(realpath "$1") src=$(realpath "$2") fmt=$3
w=$(mktemp -d "${TMPDIR:-/tmp}/one-pass-reads.XXXXXX")
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$w"; }
trap cleanup EXIT
mkdir -p "$w/queue" "$w/out" "$w/etc"
sum=$(sha256sum "$src" | cut -d' ' -f1)
size=$(stat -c %s "$src")
POLL_INTERVAL=0.2 SETTLE_SECONDS=0.3 SOURCE_ROOTS=$(dirname "$src") USE_INOTIFY=false \
    "$bin" --config-dir "$w/etc" daemon --watch-dir "$w/queue" --output-dir "$w/out" >"$w/log" 2>&1 &
pid=$!
sleep 1
cat >"$w/queue/.manifest.tmp" <<JSON
{"manifest_version": "1.0", "source": {"provider": "vsphere", "vm_name": "reads"},
 "vm": {"cpu": 2, "mem_gb": 4, "firmware": "bios"},
 "disks": [{"id": "disk-0", "source_format": "$fmt", "local_path": "$src", "disk_type": "boot",
            "checksum": "sha256:$sum"}],
 "nics": []}
JSON
before=$(awk '/^rchar/ {print $2}' "/proc/$pid/io")
mv "$w/queue/.manifest.tmp" "$w/queue/artifact-manifest.json"
for _ in $(seq 1 6000); do
    [ -e "$w/out/reads.qcow2" ] || [ -e "$w/out/reads.error" ] && break
    sleep 0.1
done
after=$(awk '/^rchar/ {print $2}' "/proc/$pid/io")
[ -e "$w/out/reads.qcow2" ] || { echo "no reads.qcow2:" >&2; cat "$w/out/reads.error" "$w/log" >&2 || true; exit 1; }
read_bytes=$((after - before))
echo "source $size bytes; daemon read $read_bytes bytes ($(awk "BEGIN {printf \"%.3f\", $read_bytes / $size}")x)"
