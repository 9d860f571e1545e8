#!/usr/bin/env bash
# Validates k8s/ offline (in `make test`):
#
# - every Kubernetes manifest (k8s/*.yaml but kustomization.yaml) against the OpenAPI schemas
#   of two Kubernetes versions, strictly (unknown fields are errors), with PyPI's
#   kubernetes-validate, installed into a venv under target/;
# - kustomization.yaml lists exactly the manifests it should (all but job-template.yaml), and
#   monitoring/kustomization.yaml its two resources;
# - values several files must agree on: METRICS_ADDR's port (containerPort, scrape annotation,
#   Service, NetworkPolicy), terminationGracePeriodSeconds at least DRAIN_SECONDS + 30 s, and
#   runAsUser/runAsGroup equal to the Containerfile's UID/GID;
# - k8s/examples/*.json are JSON objects naming an operation;
# - k8s/monitoring/ holds Prometheus Operator resources (CRDs, which those schemas do not know):
#   its rule groups are checked with promtool (`check rules` and the unit tests in
#   k8s/monitoring/prometheusrule.test.yaml), taken from Debian's prometheus package without
#   installing it.
#
# Needs python3 with venv and PyYAML (Debian: python3-venv, python3-yaml; installed with apt-get
# when missing) and network to PyPI and the Debian mirror the first time.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.29.0 1.35.0"}
KV_VERSION=1.37.0
VENV=target/k8s-validate-venv
TOOLS=$(pwd)/target/k8s-validate-tools
PY=/usr/bin/python3

say() { printf '==> k8s-validate: %s\n' "$*"; }
fail() { printf 'k8s-validate: FAILED: %s\n' "$*" >&2; exit 1; }

apt_install() {
    command -v apt-get >/dev/null || fail "needs $* and apt-get is not available to install them"
    apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$@" >/dev/null \
        || fail "could not install $*"
}

[ -x "$PY" ] || apt_install python3
"$PY" -c 'import yaml' 2>/dev/null || apt_install python3-yaml
"$PY" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv

if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KV_VERSION"; then
    say "installing kubernetes-validate $KV_VERSION into $VENV"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi

manifests=()
for f in k8s/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
[ "${#manifests[@]}" -gt 0 ] || fail "no manifests under k8s/"
for v in $KUBE_VERSIONS; do
    say "Kubernetes $v: ${#manifests[@]} files, strict"
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "${manifests[@]}" \
        || fail "k8s/ does not validate against Kubernetes $v"
done

say "kustomization.yaml, examples, values the files share (port, drain, uid)"
"$PY" - <<'EOF'
import glob, json, os, sys, yaml

kust = yaml.safe_load(open("k8s/kustomization.yaml"))
listed = set(kust.get("resources", []))
present = {os.path.basename(p) for p in glob.glob("k8s/*.yaml")} - {"kustomization.yaml", "job-template.yaml"}
if listed != present:
    sys.exit(f"kustomization.yaml resources {sorted(listed)} != manifests {sorted(present)}")
listed = set(yaml.safe_load(open("k8s/monitoring/kustomization.yaml")).get("resources", []))
present = {os.path.basename(p) for p in glob.glob("k8s/monitoring/*.yaml")} - {"kustomization.yaml", "prometheusrule.test.yaml"}
if listed != present:
    sys.exit(f"monitoring/kustomization.yaml resources {sorted(listed)} != {sorted(present)}")
# Values that several files must agree on.
def docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]
config = next(d for d in docs("k8s/configmap.yaml") if d["kind"] == "ConfigMap")["data"]
ds = docs("k8s/daemonset.yaml")[0]
pod = ds["spec"]["template"]["spec"]
worker = pod["containers"][0]
port = int(config["METRICS_ADDR"].rsplit(":", 1)[1])
ports = {
    "DaemonSet containerPort metrics": next(p["containerPort"] for p in worker["ports"] if p["name"] == "metrics"),
    "DaemonSet prometheus.io/port": int(ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]),
    "Service port": docs("k8s/service.yaml")[0]["spec"]["ports"][0]["port"],
    "NetworkPolicy ingress port": docs("k8s/networkpolicy.yaml")[0]["spec"]["ingress"][0]["ports"][0]["port"],
}
for what, value in ports.items():
    if value != port:
        sys.exit(f"{what} is {value}, METRICS_ADDR's port is {port}")
drain = float(config["DRAIN_SECONDS"])
grace = pod["terminationGracePeriodSeconds"]
if grace < drain + 30:
    sys.exit(f"terminationGracePeriodSeconds {grace} leaves under 30 s past DRAIN_SECONDS {drain:g} to release jobs")
arg = lambda name: next(l.split("=", 1)[1].strip() for l in open("Containerfile") if l.startswith(f"ARG {name}="))
for path in ("k8s/daemonset.yaml", "k8s/job-template.yaml"):
    ctx = docs(path)[0]["spec"]["template"]["spec"]["securityContext"]
    if (str(ctx["runAsUser"]), str(ctx["runAsGroup"])) != (arg("UID"), arg("GID")):
        sys.exit(f"{path}: runAsUser/runAsGroup differ from the Containerfile's UID/GID {arg('UID')}/{arg('GID')}")
examples = sorted(glob.glob("k8s/examples/*.json"))
if not examples:
    sys.exit("no k8s/examples/*.json")
for path in examples:
    spec = json.load(open(path))
    if not isinstance(spec, dict) or not spec.get("operation"):
        sys.exit(f"{path}: not a job spec with an operation")
EOF

promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
    promtool=$TOOLS/usr/bin/promtool
    if [ ! -x "$promtool" ]; then
        say "fetching promtool (Debian package prometheus, unpacked into $TOOLS, not installed)"
        command -v apt-get >/dev/null || fail "no promtool and no apt-get to fetch it"
        mkdir -p "$TOOLS"
        (cd "$TOOLS" && rm -f prometheus_*.deb && apt-get download prometheus >/dev/null 2>&1) \
            || { apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null; (cd "$TOOLS" && apt-get download prometheus >/dev/null 2>&1); } \
            || fail "could not download the prometheus package for promtool"
        dpkg-deb -x "$TOOLS"/prometheus_*.deb "$TOOLS"
    fi
fi
say "monitoring/: rule groups with $("$promtool" --version 2>&1 | head -n 1)"
rules_dir=$(mktemp -d)
trap 'rm -rf "$rules_dir"' EXIT
"$PY" - "$rules_dir" <<'EOF'
import sys, yaml
out = sys.argv[1]
for doc in yaml.safe_load_all(open("k8s/monitoring/prometheusrule.yaml")):
    assert doc["kind"] == "PrometheusRule", doc["kind"]
    yaml.safe_dump({"groups": doc["spec"]["groups"]}, open(f"{out}/prometheusrule.rules.yaml", "w"))
sm = yaml.safe_load(open("k8s/monitoring/servicemonitor.yaml"))
svc = yaml.safe_load(open("k8s/service.yaml"))
ports = {p["name"] for p in svc["spec"]["ports"]}
for ep in sm["spec"]["endpoints"]:
    assert ep["port"] in ports, f"ServiceMonitor port {ep['port']} is not a port of k8s/service.yaml"
labels = svc["metadata"]["labels"]
for k, v in sm["spec"]["selector"]["matchLabels"].items():
    assert labels.get(k) == v, f"ServiceMonitor selector {k}={v} does not match k8s/service.yaml"
EOF
"$promtool" check rules "$rules_dir/prometheusrule.rules.yaml" >/dev/null || fail "promtool check rules"
cp k8s/monitoring/prometheusrule.test.yaml "$rules_dir/"
(cd "$rules_dir" && "$promtool" test rules prometheusrule.test.yaml) || fail "promtool test rules"
say "ok"
