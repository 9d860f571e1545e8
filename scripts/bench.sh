#!/usr/bin/env bash
# Benchmark: `hyper2kvm convert` against durable `qemu-img convert`, same inputs, same run; and
# the daemon end to end and with a fleet (scripts/bench-daemon.sh).
#
#   make bench                                        build, then run every case (1 GiB of files
#                                                     in a 4 GiB disk): about 10 min on 2 quiet
#                                                     cores, most of it qemu-img -c; 4 more the
#                                                     first time (inputs)
#   BENCH_QUICK=1 make bench                          smoke run: 0.2 GiB in a 1 GiB disk, 1 run (~2 min)
#   BENCH_DATA_GIB=3.8 BENCH_DISK_GIB=8 make bench    the size of the figures in FORMATS.md (~25 min)
#   BENCH_CASES="stream sparse" scripts/bench.sh      a subset (uses the binary as built)
#   BENCH_CASES="e2e fleet" scripts/bench.sh          only the daemon cases (scripts/bench-daemon.sh)
#
# Environment:
#   BENCH_DIR       inputs, scratch outputs and results (default /var/tmp/hyper2kvm-bench)
#   BENCH_DATA_GIB  GiB of real files in the ext4 image (default 1; quick: 0.2)
#   BENCH_DISK_GIB  virtual disk size in GiB (default 4; quick: 1)
#   BENCH_RUNS      timed runs of each command (default 3; quick: 1)
#   BENCH_WARMUP    untimed runs of each command before those (default 1)
#   BENCH_CASES     space-separated subset of the cases below (default: all)
#   BENCH_QUICK=1   changes the defaults as noted; explicit settings still win
#   BENCH_QEMU_DURABLE  how qemu-img's output is made durable, as hyper2kvm's is (it fsyncs
#                   every output before it returns): `sync` (default: `qemu-img convert`, then
#                   `sync FILE`, timed as one command), `none` (`qemu-img convert -t none`:
#                   O_DIRECT and a flush at the end, what the Python daemon ran), or `unsafe`
#                   (qemu-img's own default, cache=unsafe: never flushed, so its time is that of
#                   the page cache; only to compare with figures taken before 2026-12-05)
#
# Cases (qemu-img always gets `-f vmdk`, as hyper2kvm's qemu-img backend passes it):
#   stream       streamOptimized -> qcow2       qemu-img convert -O qcow2                target >= 4x
#   stream-zlib  the same, compressed (zlib)    ... -c / hyper2kvm --compress=zlib       target >= 5x
#   stream-zstd  the same, compressed (zstd)    ... -c -o compression_type=zstd / --compress=zstd
#                                               (reported, no target of its own)
#   sparse       monolithicSparse -> qcow2      target: at least as fast, less user+sys CPU
#   flat         monolithicFlat -> qcow2        target: at least as fast, less user+sys CPU
#   e2e          a daemon job beside `hyper2kvm convert` (scripts/bench-daemon.sh e2e)
#                                               targets: job <= 1.15x convert, reads <= 1.05x source
#   fleet        8 VMs through one daemon at MAX_CONCURRENT 1, 2, 4 against qemu-img one by one
#                (scripts/bench-daemon.sh fleet; reported, no target)
#   and over all cases run: hyper2kvm peak RSS <= 256 MiB.
#
# Limits: before the cases the script measures this disk's O_DIRECT write rate (`dd
# oflag=direct` of 512 MiB in 8 MiB blocks, then fsync; median of 3). Each row then shows the
# machine's limit for that conversion: for uncompressed output, the output's size at that rate;
# for compressed output, hyper2kvm's CPU time (user+sys) spread over every core (the codec's
# per-core rate times the cores). "h/limit" is how far hyper2kvm's wall time is from it.
#
# Method: the inputs are built once by scripts/bench-image.sh and cached under
# $BENCH_DIR/inputs/. Caches cannot be dropped reliably here, so the commands instead run
# BENCH_WARMUP times untimed, then BENCH_RUNS times timed, qemu-img and hyper2kvm alternating
# (drift on a shared machine then hits both alike). The warm-up is there to bring the source
# into the page cache and the binaries into memory, so only the first case reading a given
# source does it: the compressed cases read stream.vmdk after the stream case has, and a warm-up
# of qemu-img -c would cost over 30 s per GiB for nothing. Each case also reads its source files
# once before its first run: page cache left idle for minutes is reclaimed on these VMs, and a
# cold source makes a conversion several times slower; with BENCH_WARMUP=0 that cost would
# otherwise fall on whichever tool goes first. Reported: the median wall time (the lower
# middle one for an even count), and the user+sys CPU and max RSS of that median run, from
# `/usr/bin/time -f '%e %U %S %M'`. Wall time is taken with $EPOCHREALTIME around it, because %e
# only has centiseconds and the sparse/flat cases take well under a second. CPU and RSS include
# reaped child processes: while hyper2kvm still runs qemu-img underneath, its figures are
# qemu-img's (RSS is the larger of the two processes, not their sum).
#
# Checks: every hyper2kvm output must pass `qemu-img check` (exit 0: no corruption, no leaks),
# `qemu-img compare` with disk.raw (the ground truth; each VMDK was compared with it when it was
# made, and comparing with the raw file is much faster than inflating the stream VMDK each time),
# have the source's virtual size, and hold compressed clusters of the requested type exactly when
# compression was asked for (so that a fast result is an honest one). qemu-img's output gets the
# same checks once per case, to catch a wrong command line here.
#
# Output: the table on stdout, and as Markdown with the machine description in
# $BENCH_DIR/results.md (for docs/PERFORMANCE.md); every run in $BENCH_DIR/runs.tsv.
# Exit status: 0 when the benchmark ran, whether or not targets were met (the table is the
# product); 1 on errors, failed conversions and failed checks.
set -euo pipefail
# $EPOCHREALTIME and awk must agree on '.' as the decimal separator.
export LC_ALL=C

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=$TARGET_DIR/release/hyper2kvm

ALL_CASES="stream stream-zlib stream-zstd sparse flat e2e fleet"
# The cases bench-daemon.sh runs; the others are timed here.
DAEMON_CASES="e2e fleet"
RSS_TARGET_MIB=256

BENCH_DIR=${BENCH_DIR:-/var/tmp/hyper2kvm-bench}
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
    DATA_GIB=${BENCH_DATA_GIB:-0.2} DISK_GIB=${BENCH_DISK_GIB:-1} RUNS=${BENCH_RUNS:-1}
else
    DATA_GIB=${BENCH_DATA_GIB:-1} DISK_GIB=${BENCH_DISK_GIB:-4} RUNS=${BENCH_RUNS:-3}
fi
# Kept in quick runs too: without it the first conversion of a case, always qemu-img's, ran
# 2-3x slower than the second, even with its source in the page cache.
WARMUP=${BENCH_WARMUP:-1}
QEMU_DURABLE=${BENCH_QEMU_DURABLE:-sync}
read -r -a REQUESTED <<<"${BENCH_CASES:-$ALL_CASES}"
CASES=() RUN_DAEMON_CASES=()
for c in "${REQUESTED[@]}"; do
    if [[ " $DAEMON_CASES " == *" $c "* ]]; then RUN_DAEMON_CASES+=("$c"); else CASES+=("$c"); fi
done

START_SECONDS=$SECONDS
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
# fail MESSAGE [FILE]: a failed conversion or check, with the tool's own words.
fail() {
    printf '\nbench: FAILED: %s\n' "$1" >&2
    if [ $# -gt 1 ] && [ -s "$2" ]; then
        printf -- '--- last 30 lines of %s ---\n' "$2" >&2
        tail -n 30 "$2" >&2
        printf -- '---\n' >&2
    fi
    exit 1
}

# --- preflight --------------------------------------------------------------------------------

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, not '$RUNS'"
[[ $WARMUP =~ ^[0-9]+$ ]] || die "BENCH_WARMUP must be a non-negative integer, not '$WARMUP'"
[ ${#REQUESTED[@]} -gt 0 ] || die "BENCH_CASES is empty; choose from: $ALL_CASES"
case $QEMU_DURABLE in sync | none | unsafe) ;; *) die "BENCH_QEMU_DURABLE must be sync, none or unsafe, not '$QEMU_DURABLE'" ;; esac
for c in "${REQUESTED[@]}"; do
    [[ " $ALL_CASES " == *" $c "* ]] || die "unknown case '$c' in BENCH_CASES; choose from: $ALL_CASES"
done
for tool in qemu-img jq flock awk; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (make deps, or apt-get install $tool)"
done
# The bash builtin `time` has no max RSS: GNU time is needed (apt-get install time).
[ -x /usr/bin/time ] || die "/usr/bin/time not found (apt-get install time)"
[ -x "$BIN" ] || die "$BIN not found: run make build (make bench does)"

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd -P)
# Two runs at once would share the scratch directory and time each other.
exec 9>"$BENCH_DIR/.lock"
flock -n 9 || die "another benchmark is running in $BENCH_DIR"

# One cached input set per size; %g so that BENCH_DATA_GIB=1.0 finds the set made for 1.
INPUTS=$BENCH_DIR/inputs/$(awk -v d="$DATA_GIB" -v s="$DISK_GIB" 'BEGIN { printf "data%g-disk%g", d, s }')
OUT_DIR=$BENCH_DIR/out
LOG_DIR=$BENCH_DIR/logs
# An empty configuration directory: a local /etc/hyper2kvm (QEMU_CONVERT_OPTIONS=-c, say) must
# not change what is measured.
ETC_DIR=$BENCH_DIR/etc
TIME_FILE=$LOG_DIR/time.out
RUNS_TSV=$BENCH_DIR/runs.tsv
RESULTS=$BENCH_DIR/results.md
mkdir -p "$OUT_DIR" "$LOG_DIR" "$ETC_DIR"

clean_out() { find "$OUT_DIR" -mindepth 1 -delete; }
clean_out
trap clean_out EXIT

# Other work on the machine (a cargo build, say) skews every figure: say so, here and in results.md.
read -r LOAD _ </proc/loadavg
BUSY=$(awk -v l="$LOAD" -v n="$(nproc)" 'BEGIN { print (l >= n / 2) ? 1 : 0 }')
[ "$BUSY" = 0 ] ||
    printf 'bench: warning: load average %s on %s CPUs: other work will skew the figures\n' "$LOAD" "$(nproc)" >&2

# --- inputs -----------------------------------------------------------------------------------

"$ROOT/scripts/bench-image.sh" "$INPUTS" "$DATA_GIB" "$DISK_GIB"
INPUT_SECONDS=$((SECONDS - START_SECONDS))
RAW_SIZE=$(stat -c %s "$INPUTS/disk.raw")

mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
# The data actually in the file system, from its superblock.
ext4_used_mib() {
    dumpe2fs -h "$INPUTS/disk.raw" 2>/dev/null | awk -F: '
        /^Block count/ { n = $2 } /^Free blocks/ { f = $2 } /^Block size/ { s = $2 }
        END { printf "%.0f", (n - f) * s / 1048576 }'
}
INPUT_ROWS=()
for f in disk.raw stream.vmdk sparse.vmdk flat.vmdk flat-flat.vmdk; do
    INPUT_ROWS+=("$f $(mib "$(stat -c %s "$INPUTS/$f")") $(mib "$(($(stat -c %b "$INPUTS/$f") * 512))")")
done
EXT4_USED=$(ext4_used_mib)

# This disk's O_DIRECT write rate (MiB/s): the limit of every uncompressed conversion here.
disk_rate() {
    local f=$OUT_DIR/dd.out i rates=()
    for i in 1 2 3; do
        rates+=("$(dd if=/dev/zero of="$f" bs=8M count=64 oflag=direct conv=fsync 2>&1 |
            awk '/copied/ { for (i = 1; i < NF; i++) if ($i == "copied,") print 512 / $(i + 1) }')")
        rm -f "$f"
    done
    printf '%s\n' "${rates[@]}" | sort -g | sed -n 2p
}
DISK_MIBS=$(disk_rate)
[ -n "$DISK_MIBS" ] || die "could not measure the disk's write rate with dd"
printf 'O_DIRECT write rate of %s: %.0f MiB/s (dd, 512 MiB, median of 3)\n' "$BENCH_DIR" "$DISK_MIBS"

printf '\nInputs in %s (%s GiB of files, ext4 reports %s MiB used, in a %s GiB disk):\n' \
    "$INPUTS" "$DATA_GIB" "$EXT4_USED" "$DISK_GIB"
printf '  %-16s %10s %14s\n' file "size MiB" "allocated MiB"
for row in "${INPUT_ROWS[@]}"; do
    read -r f size alloc <<<"$row"
    printf '  %-16s %10s %14s\n' "$f" "$size" "$alloc"
done

# --- cases ------------------------------------------------------------------------------------

# describe_case NAME: sets LABEL, SRC, SRC_FILES (SRC and its extents), Q_ARGS, H_ARGS,
# COMPRESSION and TARGET (speed:N, cpu, none).
describe_case() {
    Q_ARGS=(convert -f vmdk -O qcow2)
    H_ARGS=()
    COMPRESSION=none
    case $1 in
        stream) LABEL="streamOptimized -> qcow2" SRC=stream.vmdk TARGET=speed:4 ;;
        stream-zlib)
            LABEL="stream -> qcow2 -c zlib" SRC=stream.vmdk TARGET=speed:5 COMPRESSION=zlib
            Q_ARGS+=(-c) H_ARGS=(--compress=zlib)
            ;;
        stream-zstd)
            LABEL="stream -> qcow2 -c zstd" SRC=stream.vmdk TARGET=none COMPRESSION=zstd
            Q_ARGS+=(-c -o compression_type=zstd) H_ARGS=(--compress=zstd)
            ;;
        sparse) LABEL="monolithicSparse -> qcow2" SRC=sparse.vmdk TARGET=cpu ;;
        flat) LABEL="monolithicFlat -> qcow2" SRC=flat.vmdk TARGET=cpu ;;
    esac
    SRC_FILES=("$INPUTS/$SRC")
    if [ "$SRC" = flat.vmdk ]; then SRC_FILES+=("$INPUTS/flat-flat.vmdk"); fi
}

# run_once TOOL KIND N: one conversion by TOOL (qemu-img or hyper2kvm) of the current case. Sets
# R_WALL (s, ms precision) R_USER R_SYS (s) R_RSS (KiB) R_SIZE (output bytes); the output stays
# in OUT (checked and removed by the caller).
run_once() {
    local tool=$1 kind=$2 n=$3 start end
    local log=$LOG_DIR/$CASE-$tool.log
    OUT=$OUT_DIR/$CASE-$tool.qcow2
    local -a cmd
    if [ "$tool" = qemu-img ]; then
        case $QEMU_DURABLE in
            # One timed command: the conversion and the flush of its output.
            sync) cmd=(sh -c 'qemu-img "$@" && exec sync "$OUT_FILE"' qemu-img "${Q_ARGS[@]}" "$INPUTS/$SRC" "$OUT") ;;
            none) cmd=(qemu-img "${Q_ARGS[@]}" -t none "$INPUTS/$SRC" "$OUT") ;;
            unsafe) cmd=(qemu-img "${Q_ARGS[@]}" "$INPUTS/$SRC" "$OUT") ;;
        esac
    else
        cmd=("$BIN" convert --config-dir "$ETC_DIR" "${H_ARGS[@]}" "$INPUTS/$SRC" -o "$OUT")
    fi
    clean_out
    printf '%s\n' "${cmd[*]}" >"$log"
    start=$EPOCHREALTIME
    OUT_FILE=$OUT /usr/bin/time -f '%e %U %S %M' -o "$TIME_FILE" "${cmd[@]}" >>"$log" 2>&1 ||
        fail "$CASE: $tool exited with status $? ($kind $n)" "$log"
    end=$EPOCHREALTIME
    R_WALL=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
    read -r _ R_USER R_SYS R_RSS <"$TIME_FILE"
    R_SIZE=$(stat -c %s "$OUT")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$CASE" "$tool" "$kind" "$n" "$R_WALL" "$R_USER" "$R_SYS" "$R_RSS" "$R_SIZE" >>"$RUNS_TSV"
}

# verify TOOL: the checks described at the top, on OUT.
verify() {
    local tool=$1 rc=0 check info vsize ctype compressed
    local what="$CASE: $tool output" log=$LOG_DIR/$CASE-$tool.check
    check=$(qemu-img check --output=json -f qcow2 "$OUT" 2>"$log") || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '%s\n' "$check" >>"$log"
        fail "$what: qemu-img check exited with $rc (2: corruption, 3: leaked clusters)" "$log"
    fi
    qemu-img compare -f raw -F qcow2 "$INPUTS/disk.raw" "$OUT" >"$log" 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || fail "$what: qemu-img compare with disk.raw exited with $rc (1: contents differ)" "$log"
    info=$(qemu-img info --output=json -f qcow2 "$OUT")
    vsize=$(jq -r '."virtual-size"' <<<"$info")
    [ "$vsize" = "$RAW_SIZE" ] || fail "$what: virtual size $vsize, the source has $RAW_SIZE"
    # qemu-img omits the key for zlib images (older qemu) and compressed-clusters when it is 0.
    ctype=$(jq -r '."format-specific".data."compression-type" // "zlib"' <<<"$info")
    compressed=$(jq -r '."compressed-clusters" // 0' <<<"$check")
    if [ "$COMPRESSION" = none ]; then
        [ "$compressed" -eq 0 ] || fail "$what: $compressed compressed clusters; none were asked for"
    elif [ "$compressed" -eq 0 ] || [ "$ctype" != "$COMPRESSION" ]; then
        fail "$what: $COMPRESSION compression was asked for; found $compressed compressed clusters, type $ctype"
    fi
}

# median RUN...: of "wall user sys rss size" lines, the one with the median wall time.
median() {
    printf '%s\n' "$@" | sort -n -k1,1 | sed -n "$((($# + 1) / 2))p"
}

declare -A RESULT=() WARM=()
: >"$RUNS_TSV"
printf '\n%s GiB of data, %s GiB disk: %s warm-up (per source) + %s timed run(s) of each command\n' \
    "$DATA_GIB" "$DISK_GIB" "$WARMUP" "$RUNS"
for CASE in "${CASES[@]}"; do
    describe_case "$CASE"
    printf '\n==> %s (%s)\n' "$LABEL" "$CASE"
    warmup=$WARMUP
    if [ -n "${WARM[$SRC]:-}" ] && [ "$WARMUP" -gt 0 ]; then
        printf '  (%s was read by an earlier case: no warm-up)\n' "$SRC"
        warmup=0
    fi
    WARM[$SRC]=1
    # cp --sparse=always skips the holes (SEEK_DATA), as the tools do: cat would fill the page
    # cache with the zeros of the whole virtual disk of the flat extent.
    for f in "${SRC_FILES[@]}"; do cp --sparse=always "$f" /dev/null; done
    q_runs=() h_runs=() q_checked=0
    total=$((warmup + RUNS))
    for ((i = 1; i <= total; i++)); do
        if [ "$i" -le "$warmup" ]; then
            kind=warm-up n=$i of=$warmup
        else
            kind=run n=$((i - warmup)) of=$RUNS
        fi
        run_once qemu-img "$kind" "$n"
        q="$R_WALL $R_USER $R_SYS $R_RSS $R_SIZE" q_wall=$R_WALL
        if [ "$q_checked" = 0 ]; then verify qemu-img; q_checked=1; fi
        clean_out
        # Both outputs are durable when their command returns (unless BENCH_QEMU_DURABLE=unsafe);
        # sync anyway so that no writeback of one run is paid for by the next.
        sync
        run_once hyper2kvm "$kind" "$n"
        h="$R_WALL $R_USER $R_SYS $R_RSS $R_SIZE"
        verify hyper2kvm
        clean_out
        sync
        if [ "$kind" = run ]; then q_runs+=("$q") h_runs+=("$h"); fi
        printf '  %-7s %d/%d   qemu-img %8.2f s   hyper2kvm %8.2f s   (hyper2kvm output checked)\n' \
            "$kind" "$n" "$of" "$q_wall" "$R_WALL"
    done
    RESULT[$CASE,q]=$(median "${q_runs[@]}")
    RESULT[$CASE,h]=$(median "${h_runs[@]}")
done

# --- report -----------------------------------------------------------------------------------

# row CASE: the table fields, tab-separated: label, q wall, h wall, speed-up, target text,
# cpu q/h, rss q/h, size q/h, status (OK, MISSED or -).
row() {
    local case=$1
    describe_case "$case"
    awk -v label="$LABEL" -v target="$TARGET" -v q="${RESULT[$case,q]}" -v h="${RESULT[$case,h]}" \
        -v disk="$DISK_MIBS" -v cores="$(nproc)" -v comp="$COMPRESSION" 'BEGIN {
        split(q, Q, " "); split(h, H, " ")
        speed = H[1] > 0 ? Q[1] / H[1] : 0
        cq = Q[2] + Q[3]; ch = H[2] + H[3]
        if (target ~ /^speed:/) {
            need = substr(target, 7) + 0
            text = sprintf(">=%gx", need); status = speed >= need ? "OK" : "MISSED"
        } else if (target == "cpu") {
            text = ">=1x,<cpu"; status = (speed >= 1 && ch < cq) ? "OK" : "MISSED"
        } else { text = "-"; status = "-" }
        # The machine limit: the output at the disk rate, or the CPU work spread over every core.
        limit = comp == "none" ? H[5] / 1048576 / disk : ch / cores
        printf "%s\t%.2f s\t%.2f s\t%.2fx\t%s\t%.2f/%.2f s\t%.0f/%.0f\t%.0f/%.0f\t%.2f s (%s)\t%.2fx\t%s\n",
            label, Q[1], H[1], speed, text, cq, ch, Q[4] / 1024, H[4] / 1024,
            Q[5] / 1048576, H[5] / 1048576, limit, comp == "none" ? "disk" : "cpu", H[1] / limit, status
    }'
}

HEADER=(case qemu-img hyper2kvm speed-up target "cpu(q/h)" "rss(q/h) MiB" "out(q/h) MiB" limit h/limit)
ROWS=()
for c in "${CASES[@]}"; do ROWS+=("$(row "$c")"); done

# target_lines: one "TARGET: OK|MISSED (figures)" line per target, "not run" for missing cases.
target_lines() {
    local pair c text status speed line fields
    for pair in "stream|streamOptimized -> qcow2 >= 4x faster than qemu-img" \
        "stream-zlib|compressed (zlib) output >= 5x faster than qemu-img -c" \
        "sparse|monolithicSparse -> qcow2 at least as fast, less CPU" \
        "flat|monolithicFlat -> qcow2 at least as fast, less CPU"; do
        c=${pair%%|*} text=${pair#*|}
        if [ -n "${RESULT[$c,h]:-}" ]; then
            line=$(row "$c")
            IFS=$'\t' read -r -a fields <<<"$line"
            status=${fields[10]} speed=${fields[3]}
            if [ "$c" = sparse ] || [ "$c" = flat ]; then
                printf '%s: %s (%s, cpu %s)\n' "$text" "$status" "$speed" "${fields[5]}"
            else
                printf '%s: %s (%s)\n' "$text" "$status" "$speed"
            fi
        else
            printf '%s: not run (BENCH_CASES)\n' "$text"
        fi
    done
    # Peak RSS of hyper2kvm over every timed run of every case, not only the median ones.
    if [ ${#CASES[@]} -eq 0 ]; then
        printf 'hyper2kvm peak RSS <= %d MiB: not run (BENCH_CASES)\n' "$RSS_TARGET_MIB"
        return
    fi
    awk -F'\t' -v limit="$RSS_TARGET_MIB" '
        $2 == "hyper2kvm" && $3 == "run" && $8 > max { max = $8; where = $1 }
        END { mib = max / 1024
              printf "hyper2kvm peak RSS <= %d MiB: %s (%.0f MiB, %s)\n",
                  limit, mib <= limit ? "OK" : "MISSED", mib, where }' "$RUNS_TSV"
}

print_table() {
    local fmt='%-27s %9s %11s %9s %10s %14s %13s %13s %15s %8s\n'
    # shellcheck disable=SC2059 # the format is ours
    printf "$fmt" "${HEADER[@]}"
    local r f
    for r in "${ROWS[@]}"; do
        IFS=$'\t' read -r -a f <<<"$r"
        # shellcheck disable=SC2059
        printf "$fmt" "${f[@]:0:10}"
    done
}

markdown_table() {
    local r f
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${HEADER[@]}"
    printf '|---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n'
    for r in "${ROWS[@]}"; do
        IFS=$'\t' read -r -a f <<<"$r"
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${f[@]:0:10}"
    done
}

TARGETS=$(target_lines)
printf '\n'
print_table
printf '\n%s\n' "$TARGETS"

# The daemon cases: their own script, their own tables (appended to results.md below).
for c in "${RUN_DAEMON_CASES[@]}"; do
    printf '\n==> daemon case %s (scripts/bench-daemon.sh %s)\n' "$c" "$c"
    rm -f "$BENCH_DIR/results-$c.md"
    BENCH_DIR=$BENCH_DIR BENCH_DATA_GIB=$DATA_GIB BENCH_DISK_GIB=$DISK_GIB BENCH_RUNS=$RUNS \
        BENCH_WARMUP=$WARMUP "$ROOT/scripts/bench-daemon.sh" "$c" || fail "the daemon case $c failed"
done

mem_gib=$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
cpu_model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
commit=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
{
    if [ "$QUICK" = 1 ]; then
        printf '# hyper2kvm convert vs qemu-img convert (quick smoke run: not representative)\n\n'
    else
        printf '# hyper2kvm convert vs qemu-img convert\n\n'
    fi
    # shellcheck disable=SC2016 # the backquotes are Markdown
    printf 'Produced by `make bench` (scripts/bench.sh) with `BENCH_DATA_GIB=%s BENCH_DISK_GIB=%s BENCH_RUNS=%s BENCH_WARMUP=%s`: ' \
        "$DATA_GIB" "$DISK_GIB" "$RUNS" "$WARMUP"
    printf 'median wall time of the timed runs; cpu (user+sys) and max RSS of the median run; '
    printf 'speed-up = qemu-img time / hyper2kvm time. Every hyper2kvm output passed qemu-img check and compare.\n\n'
    if [ "$BUSY" = 1 ]; then
        printf '**The machine was busy (load average %s on %s CPUs at the start): the figures are skewed.**\n\n' \
            "$LOAD" "$(nproc)"
    fi
    printf '| machine | |\n|---|---|\n'
    printf '| date | %s |\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf '| CPU | %s, nproc %s |\n' "$cpu_model" "$(nproc)"
    printf '| memory | %s GiB |\n' "$mem_gib"
    printf '| load average at the start | %s |\n' "$LOAD"
    printf '| kernel | %s |\n' "$(uname -r)"
    printf '| bench dir | %s (%s) |\n' "$BENCH_DIR" "$(df -PT "$BENCH_DIR" | awk 'NR == 2 { print $2 }')"
    printf '| qemu-img | %s |\n' "$(qemu-img --version | head -n 1)"
    printf '| hyper2kvm | %s (%s) |\n\n' "$("$BIN" --version)" "$commit"
    printf 'Inputs: %s GiB of real files (ext4 reports %s MiB used) in a %s GiB ext4 disk.\n\n' \
        "$DATA_GIB" "$EXT4_USED" "$DISK_GIB"
    printf '| input | size MiB | allocated MiB |\n|---|---:|---:|\n'
    for r in "${INPUT_ROWS[@]}"; do
        read -r f size alloc <<<"$r"
        printf '| %s | %s | %s |\n' "$f" "$size" "$alloc"
    done
    printf '\n'
    markdown_table
    printf '\n'
    while IFS= read -r line; do printf -- '- %s\n' "$line"; done <<<"$TARGETS"
    printf '\nqemu-img made durable by: %s. O_DIRECT write rate of the bench directory: %.0f MiB/s.\n' \
        "$QEMU_DURABLE" "$DISK_MIBS"
    for c in "${RUN_DAEMON_CASES[@]}"; do
        printf '\n'
        cat "$BENCH_DIR/results-$c.md"
    done
} >"$RESULTS"
printf '\nwritten: %s (Markdown) and %s (every run)\n' "$RESULTS" "$RUNS_TSV"
elapsed=$((SECONDS - START_SECONDS))
printf 'the benchmark took %dm%02ds (inputs: %ds)\n' $((elapsed / 60)) $((elapsed % 60)) "$INPUT_SECONDS"
