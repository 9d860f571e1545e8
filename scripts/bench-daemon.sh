#!/usr/bin/env bash
# The daemon cases of `make bench` (scripts/bench.sh runs this for BENCH_CASES e2e and fleet):
#
#   scripts/bench-daemon.sh e2e     a job end to end beside `hyper2kvm convert` of the same source
#   scripts/bench-daemon.sh fleet   8 VMs through one daemon at MAX_CONCURRENT 1, 2 and 4,
#                                   against the same 8 converted one by one by durable qemu-img
#
# Both run a real daemon (`hyper2kvm daemon`, inotify on, libvirt off, MIN_FREE_SPACE_MB=0 so
# that other work filling the disk does not pause it) on local directories under
# $BENCH_DIR/daemon, with production SETTLE_SECONDS and POLL_INTERVAL unless BENCH_SETTLE /
# BENCH_POLL say otherwise. Manifests carry a `sha256:` checksum of their disk and are dropped
# as producers do: written beside the queue, then renamed into it.
#
# e2e: for the streamOptimized and monolithicSparse inputs of bench.sh, BENCH_WARMUP untimed
# then BENCH_RUNS timed rounds of (`hyper2kvm convert SRC`, then the same SRC as a job),
# reporting medians of
#   job      the manifest's claim (its `claim` event) to V.qcow2 appearing: what the daemon spends
#   pickup   the rename into WATCH_DIR to the claim: SETTLE_SECONDS plus inotify/poll latency,
#            not counted in the job
#   stages   from the job's events log: claim → checksum start, checksum (+ inspection) →
#            conversion start, conversion (+ output digest) → publish, publish → published
#   reads    rchar and read_bytes of the daemon's /proc/PID/io over the job, against the source
#            file's size (read_bytes only counts what missed the page cache: with the source
#            cached, as here, it is near 0; rchar counts every read(2)/pread(2), the output
#            read back for V.json's digest included)
# Targets (printed PASS/MISS, never failing the script): job ≤ 1.15 × convert; rchar ≤ 1.05 ×
# the source size; for stream and sparse. A third source, `tiny` (16 MiB of random data, raw),
# shows the fixed costs of a job: its conversion takes a few milliseconds.
#
# fleet: 2 VMs of bench.sh's default inputs (stream, sparse) and 6 of the quick set (0.2 GiB of
# files in a 1 GiB disk: stream, sparse, flat, OVA, qcow2, raw), all dropped at once; wall time
# from the first rename to the last V.qcow2, and VMs per hour; then the same 8 by qemu-img one
# by one, each `qemu-img convert -O qcow2` followed by `sync FILE` (the OVA's disk extracted
# with tar first, as a qemu-img based daemon must), timed in one piece. One round each (the
# fleet is its own repetition); the order of the rounds is fixed.
#
# Environment: as bench.sh (BENCH_DIR, BENCH_DATA_GIB, BENCH_DISK_GIB, BENCH_RUNS,
# BENCH_WARMUP, BENCH_QUICK), and BENCH_SETTLE (default 2), BENCH_POLL (default 5),
# BENCH_FLEET_CONCURRENCY (default "1 2 4"). Writes Markdown to $BENCH_DIR/results-CASE.md.
set -euo pipefail
export LC_ALL=C

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=${BENCH_BIN:-$TARGET_DIR/release/hyper2kvm}

MODE=${1:-}
BENCH_DIR=${BENCH_DIR:-/var/tmp/hyper2kvm-bench}
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
    DATA_GIB=${BENCH_DATA_GIB:-0.2} DISK_GIB=${BENCH_DISK_GIB:-1} RUNS=${BENCH_RUNS:-1}
else
    DATA_GIB=${BENCH_DATA_GIB:-1} DISK_GIB=${BENCH_DISK_GIB:-4} RUNS=${BENCH_RUNS:-3}
fi
WARMUP=${BENCH_WARMUP:-1}
SETTLE=${BENCH_SETTLE:-2}
POLL=${BENCH_POLL:-5}
read -r -a FLEET_MC <<<"${BENCH_FLEET_CONCURRENCY:-1 2 4}"
WAIT_LIMIT=600

die() { printf 'bench-daemon: %s\n' "$*" >&2; exit 1; }
case $MODE in e2e | fleet) ;; *) die "usage: $0 e2e|fleet" ;; esac
[ -x "$BIN" ] || die "$BIN not found: run make build (make bench does)"
for tool in qemu-img jq sha256sum tar awk; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd -P)
set_dir() { awk -v d="$1" -v s="$2" 'BEGIN { printf "%s/inputs/data%g-disk%g", ENVIRON["BENCH_DIR"], d, s }'; }
export BENCH_DIR
BIG=$(set_dir "$DATA_GIB" "$DISK_GIB")
SMALL=$(set_dir 0.2 1)
"$ROOT/scripts/bench-image.sh" "$BIG" "$DATA_GIB" "$DISK_GIB" >&2
[ "$MODE" = e2e ] || "$ROOT/scripts/bench-image.sh" "$SMALL" 0.2 1 >&2

D=$BENCH_DIR/daemon
QUEUE=$D/queue OUT=$D/out SRC=$D/src DROP=$D/drop ETC=$D/etc
LOG=$D/daemon.log
RESULTS=$BENCH_DIR/results-$MODE.md
DAEMON_PID=

stop_daemon() {
    [ -n "$DAEMON_PID" ] || return 0
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
}
cleanup() {
    stop_daemon
    rm -rf "$QUEUE" "$OUT" "$SRC" "$DROP" "$D/scratch"
}
trap cleanup EXIT
cleanup
mkdir -p "$QUEUE" "$OUT" "$SRC" "$DROP" "$ETC" "$D/scratch"

# A sleep without a fork per call: the wait loops below poll every few ms on a 2-core machine.
exec {NAP_FD}<> <(:)
nap() { read -r -t "$1" -u "$NAP_FD" || true; }

now() { printf '%s' "$EPOCHREALTIME"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
# median of the arguments (the lower middle one for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# start_daemon MAX_CONCURRENT: a daemon on $QUEUE; returns once it has logged that it started.
start_daemon() {
    : >"$LOG"
    "$BIN" daemon --config-dir "$ETC" --watch-dir "$QUEUE" --output-dir "$OUT" --log-format json \
        --max-concurrent "$1" --poll-interval "$POLL" \
        --set SOURCE_ROOTS="$SRC" --set SETTLE_SECONDS="$SETTLE" --set USE_INOTIFY=true \
        --set LIBVIRT_INTEGRATION=false --set MIN_FREE_SPACE_MB=0 >>"$LOG" 2>&1 &
    DAEMON_PID=$!
    local waited=0
    until grep -q 'hyper2kvm daemon started' "$LOG"; do
        kill -0 "$DAEMON_PID" 2>/dev/null || { tail -n 20 "$LOG" >&2; die "the daemon exited at start"; }
        [ $((waited += 1)) -lt 1000 ] || die "the daemon did not start within 10 s"
        nap 0.01
    done
}

# io FIELD: a counter of the daemon's /proc/PID/io.
io() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$DAEMON_PID/io"; }

# checksum FILE: its sha256, cached beside it while the file is unchanged.
checksum() {
    local f=$1 cache=$1.sha256
    if [ ! -s "$cache" ] || [ "$cache" -ot "$f" ]; then
        sha256sum "$f" | awk '{ print $1 }' >"$cache.tmp" && mv "$cache.tmp" "$cache"
    fi
    cat "$cache"
}

# place VM FILE...: links (or copies) the files into $SRC/VM/ (SOURCE_ROOTS).
place() {
    local vm=$1 f
    shift
    mkdir -p "$SRC/$vm"
    for f in "$@"; do ln -f "$f" "$SRC/$vm/" 2>/dev/null || cp "$f" "$SRC/$vm/"; done
}

# manifest VM FORMAT FILE: writes $DROP/VM.json for $SRC/VM/FILE with its checksum.
manifest() {
    local vm=$1 format=$2 file=$3
    jq -n --arg vm "$vm" --arg f "$format" --arg p "$SRC/$vm/$(basename "$file")" --arg sum "sha256:$(checksum "$file")" \
        '{manifest_version: "1.0", source: {vm_name: $vm},
          disks: [{id: "disk0", source_format: $f, local_path: $p, checksum: $sum}]}' >"$DROP/$vm.json"
}

# wait_for FILE...: until every file exists (or the daemon published an .error: fail).
wait_for() {
    local f start=$SECONDS
    for f in "$@"; do
        while [ ! -e "$f" ]; do
            if compgen -G "$OUT/*.error" >/dev/null; then
                head -n 5 "$OUT"/*.error >&2
                die "a job failed"
            fi
            [ $((SECONDS - start)) -lt "$WAIT_LIMIT" ] || die "no $f after $WAIT_LIMIT s"
            nap 0.005
        done
    done
}

# The time of an event of a job (epoch seconds, ns precision), empty when the job had no such
# event: events JOB_ID JQ_FILTER.
event_time() {
    local log
    log=$(find "$QUEUE/.hyper2kvm" -name "$1.log" -print -quit)
    [ -n "$log" ] || die "no events log for job $1"
    jq -rs "[.[] | select($2)][0].timestamp // empty
        | (.[0:19] + \"Z\" | fromdate) + (\"0\" + (.[19:] | rtrimstr(\"Z\")) | tonumber)
        | . * 1000000 | floor | . / 1000000" "$log"
}

# --- e2e --------------------------------------------------------------------------------------

if [ "$MODE" = e2e ]; then
    start_daemon 1
    # Several rounds per source; each round: convert, then a job, outputs removed in between.
    declare -A ROWS
    # tiny: a 16 MiB raw disk of random data, whose job is almost all fixed costs.
    TINY=$BENCH_DIR/inputs/tiny.raw
    [ -s "$TINY" ] || head -c 16M /dev/urandom >"$TINY"
    for kind in stream sparse tiny; do
        if [ "$kind" = tiny ]; then file=$TINY format=raw; else file=$BIG/$kind.vmdk format=vmdk; fi
        size=$(stat -c %s "$file")
        cat "$file" >/dev/null # into the page cache, as bench.sh does before timing
        conv=() job=() pick=() rchar=() rbytes=() s_claim=() s_sum=() s_conv=() s_pub=()
        for ((i = 1; i <= WARMUP + RUNS; i++)); do
            vm=e2e-$kind-$i
            place "$vm" "$file"
            manifest "$vm" "$format" "$file"
            sync
            t0=$(now)
            "$BIN" convert --config-dir "$ETC" "$SRC/$vm/$(basename "$file")" -o "$D/scratch/convert.qcow2" >/dev/null 2>&1 ||
                die "hyper2kvm convert of $kind failed"
            t1=$(now)
            rm -f "$D/scratch/convert.qcow2"
            sync
            r0=$(io rchar) b0=$(io read_bytes)
            t_rename=$(now)
            mv "$DROP/$vm.json" "$QUEUE/$vm.json"
            wait_for "$OUT/$vm.qcow2"
            t_done=$(now)
            r1=$(io rchar) b1=$(io read_bytes)
            wait_for "$OUT/$vm.json"
            id=$(jq -r .job_id "$OUT/$vm.json")
            [ "$id" != null ] || id=$(jq -r '.. | .job_id? // empty' "$OUT/$vm.json" | head -n 1)
            claim=$(event_time "$id" '.phase == "claim"')
            verify=$(event_time "$id" '.phase == "checksum"')
            convert=$(event_time "$id" '.phase == "convert"')
            # A natively read source is hashed in the conversion's own pass: no checksum event.
            verify=${verify:-$convert}
            publish=$(event_time "$id" '.phase == "publish"')
            done_at=$(event_time "$id" '.phase == "done"')
            qemu-img check -q "$OUT/$vm.qcow2" || die "the job's output of $kind fails qemu-img check"
            rm -rf "${OUT:?}/$vm".* "${SRC:?}/$vm"
            sync
            c=$(sub "$t1" "$t0") j=$(sub "$t_done" "$claim") p=$(sub "$claim" "$t_rename")
            printf '  %-7s %s %d: convert %6.2f s   job %6.2f s   pickup %5.2f s   rchar %5.2f x source\n' \
                "$kind" "$([ "$i" -le "$WARMUP" ] && echo warm-up || echo run)" "$i" "$c" "$j" "$p" \
                "$(awk -v a="$((r1 - r0))" -v s="$size" 'BEGIN { print a / s }')"
            [ "$i" -gt "$WARMUP" ] || continue
            conv+=("$c") job+=("$j") pick+=("$p")
            rchar+=("$(awk -v a="$((r1 - r0))" -v s="$size" 'BEGIN { printf "%.2f", a / s }')")
            rbytes+=("$(awk -v a="$((b1 - b0))" -v s="$size" 'BEGIN { printf "%.2f", a / s }')")
            s_claim+=("$(sub "$verify" "$claim")") s_sum+=("$(sub "$convert" "$verify")")
            s_conv+=("$(sub "$publish" "$convert")") s_pub+=("$(sub "$done_at" "$publish")")
        done
        mc=$(median "${conv[@]}") mj=$(median "${job[@]}")
        ROWS[$kind]="$(mib "$size") $mc $mj $(median "${pick[@]}") $(median "${rchar[@]}") $(median "${rbytes[@]}") $(median "${s_claim[@]}") $(median "${s_sum[@]}") $(median "${s_conv[@]}") $(median "${s_pub[@]}")"
    done
    stop_daemon

    table() { # table md|text
        local kind size mc mj mp rc rb a b c d ratio
        if [ "$1" = md ]; then
            printf '| source | size MiB | convert | job | job/convert | pickup (not in job) | rchar / source | read_bytes / source | claim→checksum | checksum+inspect | convert+digest | publish |\n'
            printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
        else
            printf '%-7s %8s %8s %8s %7s %7s %7s %7s %8s %9s %9s %8s\n' source MiB convert job ratio pickup rchar/s rbytes/s claim checksum convert publish
        fi
        for kind in stream sparse tiny; do
            read -r size mc mj mp rc rb a b c d <<<"${ROWS[$kind]}"
            ratio=$(awk -v j="$mj" -v c="$mc" 'BEGIN { printf "%.2f", j / c }')
            if [ "$1" = md ]; then
                printf '| %s | %s | %.2f s | %.2f s | %s× | %.2f s | %s× | %s× | %.3f s | %.2f s | %.2f s | %.3f s |\n' \
                    "$kind" "$size" "$mc" "$mj" "$ratio" "$mp" "$rc" "$rb" "$a" "$b" "$c" "$d"
            else
                printf '%-7s %8s %7.2fs %7.2fs %6sx %6.2fs %6sx %6sx %7.3fs %8.2fs %8.2fs %7.3fs\n' \
                    "$kind" "$size" "$mc" "$mj" "$ratio" "$mp" "$rc" "$rb" "$a" "$b" "$c" "$d"
            fi
        done
    }
    targets() {
        local kind size mc mj mp rc rest
        for kind in stream sparse; do
            read -r size mc mj mp rc rest <<<"${ROWS[$kind]}"
            awk -v k="$kind" -v j="$mj" -v c="$mc" -v r="$rc" 'BEGIN {
                printf "%s: job <= 1.15x convert: %s (%.2fx)\n", k, j / c <= 1.15 ? "PASS" : "MISS", j / c
                printf "%s: bytes read per job <= 1.05x the source: %s (rchar %.2fx)\n", k, r <= 1.05 ? "PASS" : "MISS", r }'
        done
    }
    printf '\nEnd to end (median of %d; SETTLE_SECONDS=%s, POLL_INTERVAL=%s, inotify on):\n' "$RUNS" "$SETTLE" "$POLL"
    table text
    printf '\n'
    targets
    {
        printf '### End to end: a job beside `hyper2kvm convert`\n\n'
        printf 'Median of %d rounds (after %d warm-up), SETTLE_SECONDS=%s, POLL_INTERVAL=%s, inotify on; ' "$RUNS" "$WARMUP" "$SETTLE" "$POLL"
        printf 'job = claim event to V.qcow2; pickup = rename into WATCH_DIR to the claim.\n\n'
        table md
        printf '\n'
        targets | sed 's/^/- /'
    } >"$RESULTS"
    exit 0
fi

# --- fleet ------------------------------------------------------------------------------------

# The 8 VMs: name format file [extra files]. The OVA and qcow2 inputs are made once.
FLEET_DIR=$BENCH_DIR/inputs/fleet
mkdir -p "$FLEET_DIR"
if [ ! -s "$FLEET_DIR/small.qcow2" ]; then
    qemu-img convert -f raw -O qcow2 "$SMALL/disk.raw" "$FLEET_DIR/small.qcow2.tmp"
    mv "$FLEET_DIR/small.qcow2.tmp" "$FLEET_DIR/small.qcow2"
fi
if [ ! -s "$FLEET_DIR/small.ova" ]; then
    work=$FLEET_DIR/ova.tmp
    rm -rf "$work" && mkdir "$work"
    cp "$SMALL/stream.vmdk" "$work/vm-disk1.vmdk"
    cat >"$work/vm.ovf" <<OVF
<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:href="vm-disk1.vmdk" ovf:id="file1" ovf:size="$(stat -c %s "$work/vm-disk1.vmdk")"/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="1024" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A virtual machine</Info><Name>vm</Name>
    <VirtualHardwareSection><Info>hardware</Info>
      <Item><rasd:ElementName>Hard disk 1</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
OVF
    tar -C "$work" --format=ustar -cf "$FLEET_DIR/small.ova.tmp" vm.ovf vm-disk1.vmdk
    rm -rf "$work"
    mv "$FLEET_DIR/small.ova.tmp" "$FLEET_DIR/small.ova"
fi
FLEET=(
    "big-stream vmdk $BIG/stream.vmdk"
    "big-sparse vmdk $BIG/sparse.vmdk"
    "small-stream vmdk $SMALL/stream.vmdk"
    "small-sparse vmdk $SMALL/sparse.vmdk"
    "small-flat vmdk $SMALL/flat.vmdk $SMALL/flat-flat.vmdk"
    "small-ova ova $FLEET_DIR/small.ova"
    "small-qcow2 qcow2 $FLEET_DIR/small.qcow2"
    "small-raw raw $SMALL/disk.raw"
)
total_mib=0
for entry in "${FLEET[@]}"; do
    read -r -a e <<<"$entry"
    total_mib=$((total_mib + $(stat -c %s "${e[2]}") / 1048576))
    checksum "${e[2]}" >/dev/null
    cat "${e[@]:2}" >/dev/null
done

declare -A WALL
# fleet_daemon MC: all 8 through one daemon; sets WALL[MC].
fleet_daemon() {
    local mc=$1 entry e vm outs=() t0 t1
    start_daemon "$mc"
    for entry in "${FLEET[@]}"; do
        read -r -a e <<<"$entry"
        vm=${e[0]}-mc$mc
        place "$vm" "${e[@]:2}"
        manifest "$vm" "${e[1]}" "${e[2]}"
        outs+=("$OUT/$vm.qcow2")
    done
    sync
    t0=$(now)
    for entry in "${FLEET[@]}"; do
        read -r -a e <<<"$entry"
        mv "$DROP/${e[0]}-mc$mc.json" "$QUEUE/"
    done
    wait_for "${outs[@]}"
    t1=$(now)
    stop_daemon
    for f in "${outs[@]}"; do qemu-img check -q "$f" || die "fleet output $f fails qemu-img check"; done
    rm -rf "${OUT:?}"/* "${SRC:?}"/*
    sync
    WALL[$mc]=$(sub "$t1" "$t0")
    printf '  daemon, MAX_CONCURRENT=%s: %7.2f s\n' "$mc" "${WALL[$mc]}"
}

# The same 8 by qemu-img, one by one, each made durable; sets WALL[qemu].
fleet_qemu() {
    local entry e out t0 t1 src fmt
    sync
    t0=$(now)
    for entry in "${FLEET[@]}"; do
        read -r -a e <<<"$entry"
        out=$D/scratch/${e[0]}.qcow2 src=${e[2]} fmt=${e[1]}
        if [ "$fmt" = ova ]; then
            tar -C "$D/scratch" -xf "$src" vm-disk1.vmdk
            src=$D/scratch/vm-disk1.vmdk fmt=vmdk
        fi
        qemu-img convert -f "$fmt" -O qcow2 "$src" "$out"
        sync "$out"
        rm -f "$D/scratch/vm-disk1.vmdk"
    done
    t1=$(now)
    rm -f "$D/scratch"/*.qcow2
    sync
    WALL[qemu]=$(sub "$t1" "$t0")
    printf '  qemu-img + sync, one by one: %7.2f s\n' "${WALL[qemu]}"
}

printf '\nFleet: 8 VMs, %s MiB of source files (with SETTLE_SECONDS=%s counted once)\n' "$total_mib" "$SETTLE"
fleet_qemu
for mc in "${FLEET_MC[@]}"; do fleet_daemon "$mc"; done

fleet_table() { # md|text
    local k label w
    [ "$1" = md ] && printf '| run | wall | VMs/hour | vs qemu-img |\n|---|---:|---:|---:|\n'
    for k in qemu "${FLEET_MC[@]}"; do
        if [ "$k" = qemu ]; then label="qemu-img + sync, one by one"; else label="daemon, MAX_CONCURRENT=$k"; fi
        w=${WALL[$k]}
        awk -v l="$label" -v w="$w" -v q="${WALL[qemu]}" -v md="$1" 'BEGIN {
            if (md == "md") printf "| %s | %.1f s | %.0f | %.2fx |\n", l, w, 8 * 3600 / w, q / w
            else printf "  %-30s %7.1f s %8.0f VMs/h %6.2fx\n", l, w, 8 * 3600 / w, q / w }'
    done
}
printf '\n'
fleet_table text
{
    printf '### Fleet: 8 VMs through one daemon\n\n'
    printf '2 VMs of the default inputs (stream, sparse) and 6 of the quick set (stream, sparse, flat, OVA, qcow2, raw), %s MiB of source files, each manifest with a checksum, all dropped at once; SETTLE_SECONDS=%s. One round each.\n\n' "$total_mib" "$SETTLE"
    fleet_table md
} >"$RESULTS"
