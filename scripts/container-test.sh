#!/usr/bin/env bash
# The container test (in `make test`): builds the image from the Containerfile and runs it the
# way k8s/ deploys it.
#
#   scripts/container-test.sh
#
# 1. A minimal Debian bookworm root is debootstrapped once and cached
#    (CONTAINER_TEST_CACHE, default /var/cache/hyper2kvm-container/base-<key>), then imported as
#    a local base image: no image registry is needed.
# 2. `podman build --isolation chroot` builds the Containerfile with BINARY=prebuilt (the host's
#    `cargo build --release` binary; this host's rustc, not Debian's, meets the MSRV) and that
#    base as BASE_IMAGE.
# 3. The image's file system is exported and the DaemonSet's container (command, args, env,
#    user, read-only root, mounts — read out of k8s/daemonset.yaml by scripts/k8s-pod.py, not
#    restated here) runs in its own mount, PID, network, UTS and IPC namespaces against a
#    directory standing for the PVC. `podman run` is refused on these machines by an rlimit
#    policy, hence the namespaces by hand. Checked: the startup and liveness probes (/healthz),
#    a manifest dropped into the queue becomes V.qcow2 (qemu-img check, same content), a bad one
#    becomes V.error, the readiness probe (capabilities) passes, and fails once WATCH_DIR is
#    read-only, the metrics the PrometheusRule
#    uses are served, logs are JSON lines, and the preStop hook drains and stops the daemon
#    within terminationGracePeriodSeconds.
# 4. The Job template's container (k8s/job-template.yaml) runs `hyper2kvm run` on each
#    k8s/examples/*.json spec.
#
# Where the machine cannot do this (not root, no podman and no apt-get to install it, no network
# for the first debootstrap) it prints why and exits 0 when CONTAINER_TEST_OPTIONAL=1 (as
# `make test` runs it), 1 otherwise. Any check that fails makes it exit 1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)
OPTIONAL=${CONTAINER_TEST_OPTIONAL:-0}
CACHE=${CONTAINER_TEST_CACHE:-/var/cache/hyper2kvm-container}
MIRROR=${CONTAINER_TEST_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# What the runtime stage installs; in the base already, so the build needs no network.
BASE_PACKAGES=qemu-utils,libvirt0,tini
IMAGE=localhost/hyper2kvm:container-test
POD=hyper2kvm-worker-test
JOB_SECONDS=120
PY=/usr/bin/python3

say() { printf '\n==> container-test: %s\n' "$*"; }
skip() {
    printf '\ncontainer-test: SKIPPED: %s\n' "$*" >&2
    [ "$OPTIONAL" = 1 ] && exit 0
    exit 1
}
failures=()
check_failed() {
    printf 'container-test: FAILED: %s\n' "$*" >&2
    failures+=("$*")
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---- can this machine do it? ----
[ "$(id -u)" -eq 0 ] || skip "needs root (podman build, namespaces, mounts); run: sudo scripts/container-test.sh"
missing=()
have podman || missing+=(podman)
have debootstrap || missing+=(debootstrap)
have qemu-img || missing+=(qemu-utils)
have unshare && have nsenter || missing+=(util-linux)
have ip || missing+=(iproute2)
[ -x "$PY" ] && "$PY" -c 'import yaml' 2>/dev/null || missing+=(python3 python3-yaml)
if [ "${#missing[@]}" -gt 0 ]; then
    have apt-get || skip "needs ${missing[*]} and apt-get is not available to install them"
    say "installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null || skip "apt-get update failed (no network to the mirror?)"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends \
        "${missing[@]}" >/dev/null || skip "could not install ${missing[*]}"
fi

# ---- the base image: Debian, debootstrapped once ----
key=$(printf '%s\n' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
base=$CACHE/base-$key
base_image=localhost/hyper2kvm-debian:$SUITE-$key
if [ ! -e "$base/.complete" ]; then
    say "debootstrapping Debian $SUITE into $base (once; a minute or two)"
    mkdir -p "$CACHE"
    rm -rf "$base.tmp"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$base.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { rm -rf "$base.tmp"; skip "debootstrap failed (no network to the Debian mirror?); see $CACHE/debootstrap.log"; }
    rm -rf "$base.tmp"/var/cache/apt/archives/*.deb "$base.tmp"/var/lib/apt/lists/*
    touch "$base.tmp/.complete"
    rm -rf "$base"
    mv "$base.tmp" "$base"
fi
if ! podman image exists "$base_image"; then
    say "importing $base as $base_image"
    tar -C "$base" --exclude=./.complete -c . | podman import --quiet - "$base_image" >/dev/null
fi

# ---- the image ----
say "building the binary (cargo build --release)"
cargo build --release --quiet
# The prebuilt binary comes from this host's toolchain; the registry build's BUILD_IMAGE must
# still be new enough for every locked dependency the binary compiles.
run_meta=$(mktemp)
host_triple=$(rustc -vV | sed -n 's/^host: //p')
build_rust=$(sed -n 's/^ARG BUILD_IMAGE=.*rust:\([0-9][0-9.]*\)-.*/\1/p' Containerfile)
cargo metadata --format-version 1 --locked --offline --filter-platform "$host_triple" >"$run_meta" 2>/dev/null \
    || cargo metadata --format-version 1 --locked --filter-platform "$host_triple" >"$run_meta"
"$PY" - "$run_meta" "$build_rust" <<'EOF' || check_failed "the Containerfile's BUILD_IMAGE (rust ${build_rust:-?}) is older than a locked dependency needs (above)"
import json, sys
meta, have = json.load(open(sys.argv[1])), sys.argv[2]
version = lambda v: tuple((list(map(int, v.split("."))) + [0, 0])[:3])
if not have:
    sys.exit("no rust:<version>-... default in the Containerfile's ARG BUILD_IMAGE")
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
seen, todo = set(), [meta["resolve"]["root"]]
while todo:
    node = todo.pop()
    if node not in seen:
        seen.add(node)
        todo += [d["pkg"] for d in nodes[node]["deps"] if any(k["kind"] in (None, "build") for k in d["dep_kinds"])]
needs = max((version(packages[i]["rust_version"]), packages[i]["name"] + " " + packages[i]["version"])
            for i in seen if packages[i].get("rust_version"))
print(f"BUILD_IMAGE rust {have}; the locked dependencies need {'.'.join(map(str, needs[0]))} ({needs[1]})")
if version(have) < needs[0]:
    sys.exit(1)
EOF
rm -f "$run_meta"
say "building $IMAGE from the Containerfile (BINARY=prebuilt, BASE_IMAGE=$base_image)"
build_started=$(date +%s)
# The build's intermediate images are removed at the end; images that were there before stay.
dangling_before=$(podman images --quiet --filter dangling=true --no-trunc | sort)
podman build --isolation chroot --quiet --build-arg BINARY=prebuilt --build-arg BASE_IMAGE="$base_image" \
    -t "$IMAGE" -f Containerfile . >/dev/null
echo "built in $(($(date +%s) - build_started)) s"

run=$(mktemp -d /var/tmp/hyper2kvm-container-test.XXXXXX)
ctr=
pod_pid=
cleanup() {
    if [ -n "$pod_pid" ] && kill -0 "$pod_pid" 2>/dev/null; then
        kill -KILL "$pod_pid" 2>/dev/null || true
        wait "$pod_pid" 2>/dev/null || true
    fi
    [ -n "$ctr" ] && podman rm --force "$ctr" >/dev/null 2>&1 || true
    rm -rf "$run"
    podman rmi "$IMAGE" >/dev/null 2>&1 || true
    comm -13 <(echo "$dangling_before") <(podman images --quiet --filter dangling=true --no-trunc | sort) \
        | xargs -r podman rmi >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "exporting the image's file system"
podman image inspect --format '{{json .Config}}' "$IMAGE" >"$run/image-config.json"
ctr=$(podman create "$IMAGE")
mkdir "$run/rootfs"
podman export "$ctr" | tar -C "$run/rootfs" -x
podman rm "$ctr" >/dev/null
ctr=

pod() { "$PY" "$ROOT/scripts/k8s-pod.py" "$@" --rootfs "$run/rootfs" --image-config "$run/image-config.json" --pod-name "$POD"; }
grace=$(pod show --manifest k8s/daemonset.yaml | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["terminationGracePeriodSeconds"])')
# The PersistentVolumeClaim's volume: one directory stands for it in the DaemonSet and the Job.
claim() { # manifest, field
    pod show --manifest "$1" | "$PY" -c 'import json,sys
claims = json.load(sys.stdin)["claims"]
assert len(claims) == 1, f"expected one PersistentVolumeClaim mount, found {claims}"
print(claims[0][sys.argv[1]])' "$2"
}
pvc_path=$(claim k8s/daemonset.yaml mountPath)
pvc_volume=$(claim k8s/daemonset.yaml volume)
[ "$(claim k8s/job-template.yaml claimName)" = "$(claim k8s/daemonset.yaml claimName)" ] \
    && [ "$(claim k8s/job-template.yaml mountPath)" = "$pvc_path" ] \
    || check_failed "the Job template does not mount the DaemonSet's claim at the same path"

# ---- the PVC: an export with a source disk, writable by the image's user ----
uid=$(pod show --manifest k8s/daemonset.yaml | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["user"][0])')
gid=$(pod show --manifest k8s/daemonset.yaml | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["user"][1])')
pvc=$run/pvc
mkdir -p "$pvc/exports/web01"
# A 64 MiB disk with data in a few places, as a streamOptimized VMDK like HyperSDK's exports.
qemu-img create -q -f raw "$run/web01.raw" 64M
for offset in 0 7 31 63; do
    head -c 1048576 /dev/urandom | dd of="$run/web01.raw" bs=1M seek="$offset" conv=notrunc status=none
done
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized "$run/web01.raw" "$pvc/exports/web01/web01.vmdk"
chown -R "$uid:$gid" "$pvc"

# ---- the DaemonSet's worker ----
say "starting the DaemonSet's container (k8s/daemonset.yaml) as PID 1 of its own namespaces"
pod show --manifest k8s/daemonset.yaml >"$run/daemonset-container.json"
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print("argv:", d["argv"]); print("user:", d["user"], "readOnlyRootFilesystem:", d["readOnlyRootFilesystem"])' "$run/daemonset-container.json"
unshare --mount --pid --fork --net --uts --ipc --propagation private \
    "$PY" "$ROOT/scripts/k8s-pod.py" run --manifest k8s/daemonset.yaml --rootfs "$run/rootfs" \
    --image-config "$run/image-config.json" --pod-name "$POD" --volume "$pvc_volume=$pvc" --scratch "$run" \
    >"$run/daemon.out" 2>"$run/daemon.log" &
pod_pid=$!
inner=
for _ in $(seq 1 50); do
    inner=$(cat "/proc/$pod_pid/task/$pod_pid/children" 2>/dev/null | awk '{print $1}')
    [ -n "$inner" ] && break
    sleep 0.1
done
[ -n "$inner" ] || { cat "$run/daemon.log" >&2; skip "could not start the pod's namespaces (unshare)"; }
in_pod() { nsenter -t "$inner" --mount --pid --net --uts --ipc -- "$@"; }
http_probe() { nsenter -t "$inner" --net -- "$PY" "$ROOT/scripts/k8s-pod.py" http --manifest k8s/daemonset.yaml \
    --image-config "$run/image-config.json" "$@"; }

status=
for _ in $(seq 1 60); do
    kill -0 "$pod_pid" 2>/dev/null || break
    status=$(http_probe --startup 2>/dev/null || true)
    [ "${status%% *}" = 200 ] && break
    sleep 1
done
if [ "${status%% *}" = 200 ]; then
    echo "startup probe: $status"
    status=$(http_probe --liveness || true)
    [ "${status%% *}" = 200 ] && echo "liveness probe: $status" || check_failed "liveness probe answered: $status"
else
    check_failed "the startup probe never answered 200 (last: ${status:-nothing}); daemon log: $(tail -n 5 "$run/daemon.log")"
fi

say "dropping manifests into the queue"
queue=$(pod show --manifest k8s/daemonset.yaml | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["env"]["WATCH_DIR"])')
output=$(pod show --manifest k8s/daemonset.yaml | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["env"]["OUTPUT_DIR"])')
case "$queue$output" in "$pvc_path"/*"$pvc_path"/*) ;; *) check_failed "WATCH_DIR $queue or OUTPUT_DIR $output is not on the PVC ($pvc_path)";; esac
host_queue=$pvc${queue#"$pvc_path"}
host_output=$pvc${output#"$pvc_path"}
for _ in $(seq 1 50); do [ -d "$host_queue" ] && break; sleep 0.1; done
[ -d "$host_queue" ] || check_failed "the daemon did not create WATCH_DIR $queue"
manifest() { # vm_name, local_path
    printf '{"manifest_version":"1.0","source":{"vm_name":"%s"},"vm":{"cpu":2,"mem_gb":4,"firmware":"bios"},"disks":[{"id":"disk-0","source_format":"vmdk","local_path":"%s","disk_type":"boot"}]}\n' "$1" "$2"
}
manifest web01 "$pvc_path/exports/web01/web01.vmdk" >"$host_queue/.web01.tmp"
manifest broken01 "$pvc_path/exports/broken01/missing.vmdk" >"$host_queue/.broken01.tmp"
mv "$host_queue/.web01.tmp" "$host_queue/web01.json"
mv "$host_queue/.broken01.tmp" "$host_queue/broken01.json"
for _ in $(seq 1 "$JOB_SECONDS"); do
    [ -e "$host_output/web01.qcow2" ] && [ -e "$host_output/broken01.error" ] && break
    kill -0 "$pod_pid" 2>/dev/null || break
    sleep 1
done
if [ -e "$host_output/web01.qcow2" ]; then
    qemu-img check -q "$host_output/web01.qcow2" || check_failed "qemu-img check: web01.qcow2 is damaged"
    qemu-img compare -q -f raw -F qcow2 "$run/web01.raw" "$host_output/web01.qcow2" \
        || check_failed "web01.qcow2 does not hold the source disk's content"
    owner=$(stat -c %u:%g "$host_output/web01.qcow2")
    [ "$owner" = "$uid:$gid" ] || check_failed "web01.qcow2 is owned by $owner, not by the image's user $uid:$gid"
    echo "web01.qcow2: qemu-img check and compare ok, owner $owner"
else
    check_failed "no web01.qcow2 in OUTPUT_DIR within $JOB_SECONDS s; daemon log: $(tail -n 5 "$run/daemon.log")"
fi
if [ -e "$host_output/broken01.error" ]; then
    echo "broken01.error: $(head -n 1 "$host_output/broken01.error")"
else
    check_failed "no broken01.error for a manifest whose disk does not exist"
fi

say "readiness probe (exec, as the kubelet runs it in the container)"
if in_pod "$PY" "$ROOT/scripts/k8s-pod.py" exec --readiness --manifest "$ROOT/k8s/daemonset.yaml" \
    --rootfs "$run/rootfs" --image-config "$run/image-config.json" --pod-name "$POD" >"$run/readiness.out" 2>&1; then
    echo "readiness probe: exit 0"
else
    check_failed "readiness probe exited non-zero: $(tail -n 3 "$run/readiness.out")"
fi

# A worker that cannot write its queue must leave the Service's endpoints: the probe must fail.
chmod 0555 "$host_queue"
if in_pod "$PY" "$ROOT/scripts/k8s-pod.py" exec --readiness --manifest "$ROOT/k8s/daemonset.yaml" \
    --rootfs "$run/rootfs" --image-config "$run/image-config.json" --pod-name "$POD" >"$run/readiness.out" 2>&1; then
    check_failed "readiness probe exited 0 with WATCH_DIR not writable (capabilities' exit status comes with the Worker Job Protocol, branch e2-worker)"
else
    echo "readiness probe with WATCH_DIR read-only: exit non-zero, as it should ($(grep -o 'WATCH_DIR[^"]*writable' "$run/readiness.out" | head -n 1))"
fi
chmod 0755 "$host_queue"

say "metrics the PrometheusRule uses"
nsenter -t "$inner" --net -- "$PY" - "$(pod show --manifest k8s/daemonset.yaml | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["env"]["METRICS_ADDR"].rsplit(":",1)[1])')" >"$run/metrics.txt" <<'EOF' || check_failed "GET /metrics failed"
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())
EOF
"$PY" - "$run/metrics.txt" <<'EOF' || check_failed "the PrometheusRule uses metrics the daemon does not serve (those in the message above)"
import re, sys, yaml
served = {line.split("{")[0].split(" ")[0] for line in open(sys.argv[1]) if line.startswith("hyper2kvm_")}
used = set()
for doc in yaml.safe_load_all(open("k8s/monitoring/prometheusrule.yaml")):
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bhyper2kvm_[a-z0-9_]+", rule["expr"]))
missing = sorted(m for m in used if m not in served)
print(f"{len(used)} metric names used, {len(served)} served")
if missing:
    print("not served: " + ", ".join(missing) + " (the migration metrics come with the Worker Job Protocol, branch e2-worker)")
    sys.exit(1)
EOF

say "logs"
if "$PY" -c 'import json,sys
lines=[l for l in open(sys.argv[1]) if l.strip()]
assert lines, "no log lines"
for l in lines: json.loads(l)
print(f"{len(lines)} log lines, all JSON")' "$run/daemon.log"; then :; else
    check_failed "the daemon's log is not JSON lines: $(head -n 2 "$run/daemon.log")"
fi

say "preStop hook, then the kubelet's SIGTERM (terminationGracePeriodSeconds: $grace)"
# The kubelet's order: run the hook (the grace period counts from here), SIGTERM the
# container's PID 1 once the hook returns, SIGKILL when the grace period is over. The hook is
# meant to drain and stop the daemon itself, so the pod must be gone when the hook returns.
stop_started=$(date +%s)
in_pod "$PY" "$ROOT/scripts/k8s-pod.py" exec --prestop --manifest "$ROOT/k8s/daemonset.yaml" \
    --rootfs "$run/rootfs" --image-config "$run/image-config.json" --pod-name "$POD" >"$run/prestop.out" 2>&1 &
prestop_pid=$!
timeout "$grace" tail --pid="$prestop_pid" -f /dev/null || true
sleep 1
if kill -0 "$pod_pid" 2>/dev/null; then
    check_failed "the daemon was still running when the preStop hook returned ($(cat "$run/prestop.out"))"
    kill -TERM "$inner" 2>/dev/null || true
    left=$((grace - ($(date +%s) - stop_started)))
    timeout "$((left > 1 ? left : 1))" tail --pid="$pod_pid" -f /dev/null || kill -KILL "$pod_pid" 2>/dev/null || true
fi
wait "$prestop_pid" 2>/dev/null || true
wait "$pod_pid" && exit_status=0 || exit_status=$?
pod_pid=
if [ "$exit_status" -eq 0 ]; then
    echo "the daemon drained and exited 0, $(($(date +%s) - stop_started)) s after the preStop hook started"
else
    check_failed "the daemon exited $exit_status after the preStop hook"
fi
grep -q '"message":"stopping' "$run/daemon.log" || check_failed "the daemon's log does not show the drain (\"stopping: …\")"

# ---- the Job template ----
say "the Job template's container (k8s/job-template.yaml) on each k8s/examples/*.json"
pod show --manifest k8s/job-template.yaml >"$run/job-container.json"
"$PY" -c 'import json,sys; print("argv:", json.load(open(sys.argv[1]))["argv"])' "$run/job-container.json"
spec_map=$("$PY" -c 'import yaml
for d in yaml.safe_load_all(open("k8s/job-template.yaml")):
    spec = d["spec"]["template"]["spec"]
    print(next(v["configMap"]["name"] + "=" + v["configMap"]["items"][0]["key"] for v in spec["volumes"] if "configMap" in v))')
if ! chroot "$run/rootfs" /usr/bin/hyper2kvm --help | grep -qE '^ +run +'; then
    check_failed "the image's hyper2kvm has no \`run\` command (the Worker Job Protocol, branch e2-worker): the Job template cannot run"
else
    for spec in k8s/examples/*.json; do
        name=$(basename "$spec" .json)
        rc=0
        unshare --mount --pid --fork --net --uts --ipc --propagation private \
            "$PY" "$ROOT/scripts/k8s-pod.py" run --manifest k8s/job-template.yaml --rootfs "$run/rootfs" \
            --image-config "$run/image-config.json" --pod-name "hyper2kvm-run-$name" --volume "$(claim k8s/job-template.yaml volume)=$pvc" \
            --configmap "${spec_map}:$spec" --scratch "$run" >"$run/$name.out" 2>"$run/$name.log" || rc=$?
        if [ "$rc" -ne 0 ]; then
            check_failed "$name: hyper2kvm run exited $rc: $(tail -n 3 "$run/$name.log")"
            continue
        fi
        # The result file (docs/WORKER.md): <output_path>/<job_id>.result.json, state completed;
        # a convert job's outputs must be the source disk, as qcow2.
        if ! "$PY" - "$spec" "$pvc" "$pvc_path" "$run/web01.raw" <<'EOF'; then
import json, subprocess, sys
spec, pvc, mount, raw = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
host = lambda path: pvc + path[len(mount):] if path.startswith(mount + "/") else sys.exit(f"{path} is not on the PVC")
result = json.load(open(host(f"{spec['artifacts']['output_path']}/{spec['job_id']}.result.json")))
if result.get("state") != "completed" or result.get("exit_code") != 0:
    sys.exit(f"result: state {result.get('state')}, exit_code {result.get('exit_code')}, error {result.get('error')}")
if spec["operation"] == "convert":
    outputs = result.get("outputs") or sys.exit("result: no outputs")
    qcow = host(outputs[0]["path"])
    subprocess.run(["qemu-img", "check", "-q", qcow], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", raw, qcow], check=True)
    print(f"{spec['job_id']}: completed, {outputs[0]['path']} checked and compared with the source")
else:
    print(f"{spec['job_id']}: completed, result has {', '.join(k for k in ('inspection', 'image') if k in result)}")
EOF
            check_failed "$name: the job's result is not what it should be (above)"
        fi
    done
fi

if [ "${#failures[@]}" -gt 0 ]; then
    printf '\ncontainer-test: %d check(s) failed:\n' "${#failures[@]}" >&2
    printf '  - %s\n' "${failures[@]}" >&2
    exit 1
fi
say "all checks passed"
