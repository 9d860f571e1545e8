#!/usr/bin/env bash
# Builds (or reuses) the input disks of scripts/bench.sh.
#
#   scripts/bench-image.sh DIR DATA_GIB DISK_GIB
#
# DIR receives:
#   disk.raw           an ext4 file system of DISK_GIB GiB holding about DATA_GIB GiB of real files
#                      (copied from /usr/lib, /usr/share, /usr/bin and the Rust toolchain), written
#                      by `mke2fs -t ext4 -d`; the ground truth the converted images are compared to
#   stream.vmdk        the same disk as a streamOptimized VMDK (what OVA exports carry)
#   sparse.vmdk        monolithicSparse
#   flat.vmdk          monolithicFlat: a descriptor, plus its extent flat-flat.vmdk
#   params             the parameters the set was built with; written last, so a set without it
#                      (an interrupted run) is rebuilt rather than trusted
# Each VMDK is checked against disk.raw with `qemu-img compare` once, when it is made.
#
# Fractional sizes are fine (DATA_GIB=3.8). The set is reused when `params` matches; otherwise DIR
# is emptied and rebuilt. Needs qemu-img, mke2fs (e2fsprogs), GNU tar, shuf and awk.
set -euo pipefail

# Bump when the way the image is built changes, so that cached sets are rebuilt.
GENERATOR=1

die() { printf 'bench-image: %s\n' "$*" >&2; exit 1; }
say() { printf 'bench-image: [%3ds] %s\n' "$SECONDS" "$*"; }

[ $# -eq 3 ] || die "usage: $0 DIR DATA_GIB DISK_GIB"
DIR=$1
DATA_GIB=$2
DISK_GIB=$3

for tool in qemu-img mke2fs tar shuf awk; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (mke2fs is in e2fsprogs)"
done

# GiB (possibly fractional) to bytes / MiB, validated by awk rather than by bash, which has no floats.
gib_to() { # gib_to UNIT VALUE  (UNIT = 1 for bytes, 1048576 for MiB)
    awk -v v="$2" -v u="$1" 'BEGIN {
        if (v !~ /^[0-9]+(\.[0-9]+)?$/ || v + 0 <= 0) exit 1
        printf "%.0f\n", v * 1073741824 / u }' || die "not a positive number of GiB: $2"
}
DATA_BYTES=$(gib_to 1 "$DATA_GIB")
DISK_MIB=$(gib_to 1048576 "$DISK_GIB")
# ext4 metadata (inode tables, journal) and per-file slack take room too: keep a margin.
[ $((DATA_BYTES / 1048576)) -le $((DISK_MIB * 85 / 100)) ] ||
    die "$DATA_GIB GiB of files do not fit in a $DISK_GIB GiB disk (keep data under 85 %)"

PARAMS="generator=$GENERATOR data_bytes=$DATA_BYTES disk_mib=$DISK_MIB"
if [ -f "$DIR/params" ] && [ "$(cat "$DIR/params")" = "$PARAMS" ]; then
    say "reusing the inputs in $DIR"
    exit 0
fi

# Peak use while building: the staging copy, the raw image's data, and three VMDKs (stream
# about half the data, sparse and flat about all of it). Fail early rather than halfway.
mkdir -p "$DIR"
need_mib=$((DATA_BYTES * 9 / 2 / 1048576 + 512))
free_mib=$(df -Pm "$DIR" | awk 'NR == 2 { print $4 }')
[ "$free_mib" -ge "$need_mib" ] ||
    die "$DIR has $free_mib MiB free; building a $DATA_GIB GiB input set needs about $need_mib MiB"

say "building the inputs in $DIR ($DATA_GIB GiB of files in a $DISK_GIB GiB ext4 disk)"
find "$DIR" -mindepth 1 -delete
STAGING=$DIR/staging
LIST=$DIR/files.list
trap 'rm -rf "$STAGING" "$LIST"' EXIT
mkdir "$STAGING"

# Candidate files: real binaries, libraries, docs and data, i.e. what a guest disk holds, with its
# compressibility. Shuffled with a fixed random source, so that a set mixes all the directories
# (rather than, say, only /usr/bin and the start of /usr/lib) and is the same from run to run.
SOURCES=()
for d in /usr/lib /usr/share /usr/bin "${RUSTUP_HOME:-$HOME/.rustup}"; do
    [ -d "$d" ] && SOURCES+=("$d")
done
[ ${#SOURCES[@]} -gt 0 ] || die "none of /usr/lib /usr/share /usr/bin ~/.rustup exists"
# Entries are "SIZE PATH", the path made relative to / (for tar -C /) by sed.
mapfile -d '' candidates < <(
    { find "${SOURCES[@]}" -xdev -type f -readable -size -512M -printf '%s %p\0' 2>/dev/null || true; } |
        sed -z 's,^\([0-9]*\) /,\1 ,' | shuf -z --random-source=<(yes hyper2kvm-bench))
[ ${#candidates[@]} -gt 0 ] || die "no readable files found under ${SOURCES[*]}"

# Take files until the budget is met. When the machine has less than that, go round again into
# pass-N/ directories: duplicated files are still real data, grain for grain.
copied=0
pass=1
while [ "$copied" -lt "$DATA_BYTES" ]; do
    pass_bytes=0
    for entry in "${candidates[@]}"; do
        [ "$copied" -lt "$DATA_BYTES" ] || break
        size=${entry%% *}
        printf '%s\0' "${entry#* }"
        copied=$((copied + size))
        pass_bytes=$((pass_bytes + size))
    done >"$LIST"
    [ "$pass_bytes" -gt 0 ] || die "the source files hold no data"
    # --hard-dereference: a hard link would be stored once by mke2fs and the data would fall short.
    tar -C / --null -T "$LIST" --hard-dereference --transform "s,^,pass-$pass/," -cf - |
        tar -C "$STAGING" -xf -
    pass=$((pass + 1))
done
say "copied $((copied / 1048576)) MiB of files in $((pass - 1)) pass(es)"

truncate -s "${DISK_MIB}M" "$DIR/disk.raw"
mke2fs -q -t ext4 -L hyper2kvm-bench -d "$STAGING" -F "$DIR/disk.raw"
rm -rf "$STAGING" "$LIST"

for subformat in streamOptimized monolithicSparse monolithicFlat; do
    case $subformat in
        streamOptimized) out=stream.vmdk ;;
        monolithicSparse) out=sparse.vmdk ;;
        monolithicFlat) out=flat.vmdk ;;
    esac
    say "writing $out ($subformat)"
    qemu-img convert -f raw -O vmdk -o "subformat=$subformat" "$DIR/disk.raw" "$DIR/$out"
    qemu-img compare -q -f raw -F vmdk "$DIR/disk.raw" "$DIR/$out" ||
        die "$out differs from disk.raw right after qemu-img wrote it"
done

printf '%s\n' "$PARAMS" >"$DIR/params"
say "inputs ready"
