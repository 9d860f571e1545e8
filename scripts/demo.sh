#!/usr/bin/env bash
# The hyper2kvm demo: a daemon watching a local queue, fed one generated VMware disk.
#
#   scripts/demo.sh          (make demo)        build, start the demo daemon, convert a sample VM,
#                                               show the results, and leave the daemon running
#   scripts/demo.sh stop     (make demo-stop)   stop the demo daemon (SIGTERM, then wait)
#   scripts/demo.sh check    (make demo-check)  demo, then stop; exit 1 if anything failed
#
# Everything lives under ./demo/ (git-ignored):
#   demo/exports/demo-vm/   the source disk (disk-0.vmdk) and its manifest, as HyperSDK leaves them
#   demo/queue/             WATCH_DIR: manifests are dropped here
#   demo/output/            OUTPUT_DIR: demo-vm.qcow2 / .xml / .json, or demo-vm.error
#   demo/etc/               --config-dir: hyper2kvm.conf for the demo
#   demo/daemon.log         the daemon's output
#   demo/daemon.pid         the daemon's process id
#
# The demo daemon registers the VM with libvirt (LIBVIRT_INTEGRATION=true). By default it uses
# libvirt's test driver, test:///default, which lives inside the daemon's own process: nothing
# on this host is touched, and the registration shows in the daemon's log, V.json and V.xml.
#
# Environment: DEMO_WAIT_SECONDS (default 60) bounds the wait for the result;
# DEMO_LIBVIRT_URI (default test:///default) and DEMO_LIBVIRT_POOL (default default-pool, the
# test driver's pool) point the demo at a real libvirt, e.g. qemu:///system and default.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)
DEMO=$ROOT/demo
EXPORTS=$DEMO/exports
QUEUE=$DEMO/queue
OUTPUT=$DEMO/output
ETC=$DEMO/etc
LOG=$DEMO/daemon.log
PIDFILE=$DEMO/daemon.pid
VM=demo-vm
VMDK=$EXPORTS/$VM/disk-0.vmdk
MANIFEST=$EXPORTS/$VM/artifact-manifest.json
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=$TARGET_DIR/release/hyper2kvm
WAIT_SECONDS=${DEMO_WAIT_SECONDS:-60}
LIBVIRT_URI=${DEMO_LIBVIRT_URI:-test:///default}
LIBVIRT_POOL=${DEMO_LIBVIRT_POOL:-default-pool}
STOP_SECONDS=30
MODE=${1:-run}

say() { printf '\n==> %s\n' "$*"; }
warn() { printf 'demo: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

log_tail() {
    if [ -s "$LOG" ]; then
        printf '\n--- last 30 lines of %s ---\n' "${LOG#"$ROOT"/}" >&2
        tail -n 30 "$LOG" >&2
        printf -- '---\n' >&2
    else
        printf '(%s is empty)\n' "${LOG#"$ROOT"/}" >&2
    fi
}

# Fails with the daemon's last log lines. In check mode the EXIT trap then stops the daemon.
fail() {
    if [ "$MODE" = check ]; then warn "demo-check: FAILED: $*"; else warn "FAILED: $*"; fi
    log_tail
    if [ "$MODE" != check ] && [ -f "$PIDFILE" ] && alive "$(cat "$PIDFILE")"; then
        warn "the demo daemon is still running (pid $(cat "$PIDFILE")): make demo-stop stops it"
    fi
    exit 1
}

# True while process $1 exists and is not a zombie (an exited child not yet reaped).
alive() {
    local stat state
    [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [ "$state" != Z ] && [ "$state" != X ]
}

# True when process $1 is alive and is a hyper2kvm binary (so a recycled pid is never signalled).
is_daemon() {
    alive "$1" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = hyper2kvm ]
}

# The pid this shell started, if any: only then can `wait` collect its exit status.
CHILD_PID=

# Stops the demo daemon named by the pid file. Returns 1 if it had to be killed or, when this
# shell started it, if it exited with a non-zero status.
stop_daemon() {
    local pid status=0 waited=0
    if [ ! -f "$PIDFILE" ]; then
        echo "No demo daemon is running (no ${PIDFILE#"$ROOT"/})."
        return 0
    fi
    pid=$(cat "$PIDFILE")
    if [ -n "$CHILD_PID" ] && [ "$pid" = "$CHILD_PID" ]; then
        if ! alive "$pid"; then
            wait "$pid" || status=$?
            CHILD_PID=
            rm -f "$PIDFILE"
            echo "The demo daemon (pid $pid) had already exited, with status $status."
            [ "$status" -eq 0 ] || return 1
            return 0
        fi
    elif ! is_daemon "$pid"; then
        echo "The demo daemon (pid $pid) is not running; removing the stale pid file."
        rm -f "$PIDFILE"
        return 0
    fi
    printf 'Stopping the demo daemon (pid %s) with SIGTERM' "$pid"
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && [ "$waited" -lt $((STOP_SECONDS * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
        [ $((waited % 10)) -ne 0 ] || printf .
    done
    echo
    rm -f "$PIDFILE"
    if alive "$pid"; then
        warn "the daemon did not exit within ${STOP_SECONDS}s of SIGTERM; sent SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        [ "$pid" != "$CHILD_PID" ] || wait "$pid" 2>/dev/null || true
        CHILD_PID=
        return 1
    fi
    if [ "$pid" = "$CHILD_PID" ]; then
        wait "$pid" || status=$?
        CHILD_PID=
        if [ "$status" -ne 0 ]; then
            warn "the daemon exited with status $status after SIGTERM (expected 0)"
            return 1
        fi
        echo "The demo daemon stopped (exit status 0)."
    else
        echo "The demo daemon stopped."
    fi
}

write_config() {
    mkdir -p "$ETC"
    cat >"$ETC/hyper2kvm.conf" <<EOF
# Written by scripts/demo.sh for the demo daemon; see conf.d/hyper2kvm.conf for every key.
POLL_INTERVAL=1
SETTLE_SECONDS=1
LOG_LEVEL=info
LIBVIRT_INTEGRATION=true
LIBVIRT_URI=$LIBVIRT_URI
LIBVIRT_POOL=$LIBVIRT_POOL
SOURCE_ROOTS="$DEMO"
EOF
}

# A 64 MiB disk with data at a few offsets, exported the way vSphere does (streamOptimized VMDK),
# and a manifest for it in HyperSDK's Artifact Manifest v1.0 format.
make_fixture() {
    local dir raw sha bytes
    dir=$EXPORTS/$VM
    raw=$dir/disk-0.raw
    rm -rf "$dir"
    mkdir -p "$dir"
    qemu-img create -q -f raw "$raw" 64M
    if have qemu-io; then
        qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0xa5 32M 2M' -c 'write -P 0x3c 63M 512k' \
            "$raw" >/dev/null
    else
        python3 - "$raw" <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    for offset, byte, length in ((0, 0x5A, 1 << 20), (32 << 20, 0xA5, 2 << 20), (63 << 20, 0x3C, 512 << 10)):
        f.seek(offset)
        f.write(bytes([byte]) * length)
PY
    fi
    qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$raw" "$VMDK"
    rm -f "$raw"
    sha=$(sha256sum "$VMDK" | cut -d' ' -f1)
    bytes=$(stat -c %s "$VMDK")
    python3 - "$MANIFEST" "$VM" "$VMDK" "$sha" "$bytes" "$dir" <<'PY'
import datetime, json, sys
path, vm, vmdk, sha, size, outdir = sys.argv[1:]
now = datetime.datetime.now(datetime.timezone.utc).isoformat()
manifest = {
    "manifest_version": "1.0",
    "source": {
        "provider": "demo",
        "vm_id": "vm-demo-1",
        "vm_name": vm,
        "export_timestamp": now,
        "export_method": "hyper2kvm-demo",
    },
    "vm": {"cpu": 2, "mem_gb": 2, "firmware": "bios", "os_hint": "unknown"},
    "disks": [
        {
            "id": "disk-0",
            "source_format": "vmdk",
            "bytes": int(size),
            "local_path": vmdk,
            "checksum": "sha256:" + sha,
            "label": "disk-0",
            "disk_type": "boot",
        }
    ],
    "nics": [{"id": "nic-0", "mac": "52:54:00:12:34:56", "network": "default"}],
    "notes": ["Generated by scripts/demo.sh"],
    "metadata": {"job_id": "vm-demo-1", "created_at": now},
    "pipeline": {"convert": {"enabled": True, "compress": True}},
    "output": {"directory": outdir, "format": "qcow2"},
}
with open(path, "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
PY
    echo "Source disk: ${VMDK#"$ROOT"/} ($bytes bytes, sha256 $sha)"
    echo "Manifest:    ${MANIFEST#"$ROOT"/}"
}

start_daemon() {
    local pid waited=0
    : >"$LOG"
    # setsid detaches the daemon from this terminal's session (a Ctrl-C here does not stop it).
    # A background job of a non-interactive shell is not a process-group leader, so setsid
    # execs in place and $! is the daemon's own pid (checked below through /proc/PID/comm).
    local launcher=()
    have setsid && launcher=(setsid)
    "${launcher[@]}" "$BIN" --config-dir "$ETC" daemon --watch-dir "$QUEUE" --output-dir "$OUTPUT" \
        </dev/null >>"$LOG" 2>&1 &
    pid=$!
    CHILD_PID=$pid
    echo "$pid" >"$PIDFILE"
    # The daemon creates its directories at start-up; wait for that (at most 10 s).
    while [ "$waited" -lt 100 ]; do
        alive "$pid" || fail "the daemon exited at start-up"
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = hyper2kvm ] && [ -d "$QUEUE" ] && [ -d "$OUTPUT" ]; then
            echo "Daemon running as pid $pid, log in ${LOG#"$ROOT"/}"
            return 0
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    fail "the daemon (pid $pid) did not create ${QUEUE#"$ROOT"/} and ${OUTPUT#"$ROOT"/} within 10 s"
}

# Waits for demo-vm.qcow2 (success) or demo-vm.error (failure), checked in HyperSDK's order.
wait_for_result() {
    local pid waited=0
    pid=$(cat "$PIDFILE")
    printf 'Waiting up to %ss for %s or %s ' "$WAIT_SECONDS" "output/$VM.qcow2" "output/$VM.error"
    while [ "$waited" -lt "$WAIT_SECONDS" ]; do
        if [ -e "$OUTPUT/$VM.qcow2" ]; then
            printf ' done (%ss)\n' "$waited"
            return 0
        fi
        if [ -e "$OUTPUT/$VM.error" ]; then
            printf ' failed\n'
            warn "the job failed; $VM.error says:"
            sed 's/^/    /' "$OUTPUT/$VM.error" >&2
            fail "the daemon published $VM.error instead of $VM.qcow2"
        fi
        alive "$pid" || { echo; fail "the daemon died while converting"; }
        printf .
        sleep 1
        waited=$((waited + 1))
    done
    echo
    fail "no result after ${WAIT_SECONDS}s"
}

# Shows what the daemon produced. Prints each problem and returns the number of problems.
show_results() {
    local problems=0 status=0
    say "Results in ${OUTPUT#"$ROOT"/}"
    ls -l "$OUTPUT"

    say "qemu-img check demo/output/$VM.qcow2"
    qemu-img check "$OUTPUT/$VM.qcow2" || { warn "qemu-img check failed"; problems=$((problems + 1)); }

    say "qemu-img compare (source VMDK vs published qcow2)"
    qemu-img compare -f vmdk -F qcow2 "$VMDK" "$OUTPUT/$VM.qcow2" ||
        { warn "the qcow2 does not match the source VMDK"; problems=$((problems + 1)); }

    show_registration || problems=$((problems + $?))

    say "hyper2kvm status"
    "$BIN" --config-dir "$ETC" status --watch-dir "$QUEUE" --output-dir "$OUTPUT" || status=$?
    if [ "$status" -ne 0 ]; then
        warn "hyper2kvm status exited with status $status"
        problems=$((problems + 1))
    fi
    return "$problems"
}

# Shows the libvirt registration: the daemon's log line, the report's libvirt fields, and a
# summary of the domain XML that was defined. Returns the number of problems.
show_registration() {
    local problems=0 line
    say "Libvirt registration at $LIBVIRT_URI (pool $LIBVIRT_POOL)"
    line=$(grep -m1 'registered domain' "$LOG" || true)
    if [ -n "$line" ]; then
        echo "daemon log: $line"
    else
        warn "the daemon's log has no 'registered domain' line"
        problems=$((problems + 1))
    fi
    if [ ! -f "$OUTPUT/$VM.json" ] || [ ! -f "$OUTPUT/$VM.xml" ]; then
        warn "$VM.json or $VM.xml is missing"
        return $((problems + 1))
    fi
    python3 - "$OUTPUT/$VM.json" "$OUTPUT/$VM.xml" <<'PY' || problems=$((problems + 1))
import json, sys
import xml.etree.ElementTree as ET
report = json.load(open(sys.argv[1]))
print(f"V.json:     domain {report['domain_name']} (uuid {report['domain_uuid']}) at {report['libvirt_uri']}")
for warning in report["warnings"]:
    print(f"  warning:  {warning}")
domain = ET.parse(sys.argv[2]).getroot()
memory = domain.find("memory")
print(f"V.xml:      <domain type='{domain.get('type')}'> {domain.findtext('name')}, "
      f"{memory.text} {memory.get('unit')}, {domain.findtext('vcpu')} vCPU, "
      f"machine {domain.find('os/type').get('machine')}")
for disk in domain.findall("devices/disk"):
    print(f"  disk      {disk.find('target').get('dev')} ({disk.find('target').get('bus')}): {disk.find('source').get('file')}")
for nic in domain.findall("devices/interface"):
    mac = nic.find("mac")
    source = nic.find("source")
    print(f"  nic       {nic.get('type')} {source.get('bridge') or source.get('network')}"
          f"{' mac ' + mac.get('address') if mac is not None else ''}")
if not report.get("libvirt_uri"):
    sys.exit("V.json names no libvirt URI: the domain was not registered")
PY
    if have virt-xml-validate; then
        virt-xml-validate "$OUTPUT/$VM.xml" domain ||
            { warn "$VM.xml is not a valid libvirt domain"; problems=$((problems + 1)); }
    fi
    case $LIBVIRT_URI in
    test:*)
        echo "(The test driver's state lives inside the daemon's process, so virsh cannot see it;"
        echo " with DEMO_LIBVIRT_URI=qemu:///system the domain shows in: virsh list --all)"
        ;;
    *)
        if have virsh; then
            virsh -c "$LIBVIRT_URI" dominfo "$VM" || { warn "virsh dominfo $VM failed"; problems=$((problems + 1)); }
        fi
        ;;
    esac
    return "$problems"
}

where_next() {
    local rel_bin=${BIN#"$ROOT"/}
    cat <<EOF

==> The demo daemon is still running (pid $(cat "$PIDFILE")). Where to look next:

  tail -f demo/daemon.log
      follow what the daemon does
  cat demo/output/$VM.json
      the job report
  $rel_bin submit $(printf %q "${MANIFEST#"$ROOT"/}") --watch-dir "\$PWD/demo/queue"
      drop the manifest again (or another one): the earlier $VM.qcow2 is moved aside
      and a new one appears
  $rel_bin --config-dir demo/etc status --watch-dir "\$PWD/demo/queue" --output-dir "\$PWD/demo/output"
      the queue, running jobs and finished jobs
  make demo-stop
      stop the daemon (SIGTERM: it lets running jobs finish first)
EOF
}

run_demo() {
    # Always: it installs only what is missing (libvirt-dev for the build, too) and is
    # silent and offline on a ready machine.
    say "Checking the tools the demo needs (scripts/install-deps.sh)"
    scripts/install-deps.sh

    say "Building hyper2kvm (cargo build --release)"
    cargo build --release
    [ -x "$BIN" ] || fail "cargo build did not produce $BIN"

    say "Preparing a fresh demo/ directory"
    stop_daemon || true
    rm -rf "$QUEUE" "$OUTPUT"
    write_config
    echo "Config:      demo/etc/hyper2kvm.conf"

    say "Generating a sample VMware export (64 MiB streamOptimized VMDK)"
    make_fixture

    say "Starting the daemon"
    echo "$ ${BIN#"$ROOT"/} --config-dir demo/etc daemon --watch-dir $QUEUE --output-dir $OUTPUT"
    start_daemon

    say "Submitting the manifest"
    echo "$ ${BIN#"$ROOT"/} submit ${MANIFEST#"$ROOT"/} --watch-dir $QUEUE"
    "$BIN" submit "$MANIFEST" --watch-dir "$QUEUE" || fail "hyper2kvm submit failed"
    wait_for_result

    local problems=0
    show_results || problems=$?
    [ "$problems" -eq 0 ] || fail "$problems problem(s) with the published results (see above)"
}

case $MODE in
run)
    trap 'echo; warn "interrupted; the daemon may still be running: make demo-stop stops it"; exit 130' INT
    run_demo
    where_next
    ;;
stop)
    stop_daemon
    ;;
check)
    # Whatever happens, leave no daemon behind.
    trap 'stop_daemon >/dev/null 2>&1 || true' EXIT
    run_demo
    say "Stopping the demo daemon"
    stop_daemon || fail "the daemon did not stop cleanly"
    trap - EXIT
    printf '\ndemo-check: OK: %s.qcow2 published, qemu-img check and compare passed, domain registered at %s, daemon stopped cleanly\n' "$VM" "$LIBVIRT_URI"
    ;;
-h | --help | help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    ;;
*)
    warn "usage: $0 [run|stop|check]"
    exit 2
    ;;
esac
