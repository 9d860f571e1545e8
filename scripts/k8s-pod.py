#!/usr/bin/python3
"""Runs one container of a Kubernetes manifest (DaemonSet or Job) on an unpacked image root, the
way the kubelet would, without a container runtime: scripts/container-test.sh uses it because
`podman run` is refused on the test machines.

Everything is read from the manifest and the image's configuration, never restated here:
command and args (against the image's Entrypoint and Cmd, with the Kubernetes rules), env
(the image's, then envFrom ConfigMaps found in the manifest's directory, then env), the user
and groups (securityContext, pod and container), readOnlyRootFilesystem, allowPrivilegeEscalation,
dropped capabilities, workingDir, volumeMounts (a PersistentVolumeClaim is a host directory
given with --volume; emptyDir is made fresh; a configMap is filled from --configmap or from the
ConfigMaps beside the manifest), probes and the preStop hook.

  k8s-pod.py run  --manifest M --rootfs R --image-config C [--volume NAME=DIR] [--configmap ...]
      set up mounts and exec the container's process; run it as
      `unshare --mount --pid --fork --net --uts --ipc --propagation private k8s-pod.py run ...`
  k8s-pod.py exec --manifest M --rootfs R --image-config C (--readiness | --prestop)
      run the readiness probe's or the preStop hook's command in a running pod; run it as
      `nsenter -t PID --mount --pid --net --uts --ipc -- k8s-pod.py exec ...`
  k8s-pod.py http --manifest M (--liveness | --startup)
      GET the httpGet probe's path and port on 127.0.0.1 and print the status (inside the pod's
      network namespace: `nsenter -t PID --net -- k8s-pod.py http ...`)
  k8s-pod.py show --manifest M ...
      print what would run, as JSON
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import yaml

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
LAST_CAP = 63
DEVICES = ["null", "zero", "full", "random", "urandom", "tty"]


def fail(message):
    sys.exit(f"k8s-pod: {message}")


def documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def pod_of(manifest):
    """The pod spec and its first container, from a DaemonSet, Deployment, Job or Pod."""
    for doc in documents(manifest):
        kind = doc.get("kind")
        if kind in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
            pod = doc["spec"]["template"]["spec"]
        elif kind == "Pod":
            pod = doc["spec"]
        else:
            continue
        return doc, pod, pod["containers"][0]
    fail(f"{manifest} has no workload")


def configmaps(directory):
    """Every ConfigMap in the YAML files of a directory, by name."""
    found = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith((".yaml", ".yml")):
            for doc in documents(os.path.join(directory, name)):
                if doc.get("kind") == "ConfigMap":
                    found[doc["metadata"]["name"]] = doc.get("data") or {}
    return found


def expand(value, env):
    """Kubernetes' $(VAR) references in command, args and env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


class Container:
    """What the kubelet would run for the manifest's first container."""

    def __init__(self, args):
        self.args = args
        self.workload, self.pod, self.c = pod_of(args.manifest)
        with open(args.image_config) as f:
            self.image = json.load(f)
        self.rootfs = os.path.abspath(args.rootfs)
        self.pod_name = args.pod_name
        self.maps = configmaps(os.path.dirname(os.path.abspath(args.manifest)))
        for item in args.configmap:
            name, rest = item.split("=", 1)
            key, path = rest.split(":", 1)
            with open(path) as f:
                self.maps.setdefault(name, {})[key] = f.read()
        self.env = self._env()
        self.argv = self._argv()

    def _env(self):
        env = dict(e.split("=", 1) for e in self.image.get("Env") or [])
        env["HOSTNAME"] = self.pod_name
        for source in self.c.get("envFrom", []):
            ref = source.get("configMapRef")
            if not ref:
                fail(f"envFrom {source} is not supported here")
            if ref["name"] not in self.maps:
                fail(f"envFrom: ConfigMap {ref['name']} is not in the manifest's directory")
            prefix = source.get("prefix", "")
            env.update({prefix + k: str(v) for k, v in self.maps[ref["name"]].items()})
        for var in self.c.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
            elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[var["name"]] = self.pod_name
            else:
                fail(f"env {var['name']}: only value and fieldRef metadata.name are supported here")
        return env

    def _argv(self):
        command = self.c.get("command")
        if command:
            argv = list(command) + list(self.c.get("args", []))
        else:
            entry = self.image.get("Entrypoint") or []
            argv = list(entry) + list(self.c["args"] if "args" in self.c else self.image.get("Cmd") or [])
        if not argv:
            fail("neither the container nor the image gives a command")
        return [expand(a, self.env) for a in argv]

    def security(self, key, default=None):
        value = self.c.get("securityContext", {}).get(key)
        if value is None:
            value = self.pod.get("securityContext", {}).get(key)
        return default if value is None else value

    def user(self):
        uid, gid = self.security("runAsUser"), self.security("runAsGroup")
        image_user = (self.image.get("User") or "0").split(":")
        if uid is None:
            uid = int(image_user[0])
        if gid is None:
            gid = int(image_user[1]) if len(image_user) > 1 else 0
        if self.security("runAsNonRoot", False) and uid == 0:
            fail("runAsNonRoot is set but the container would run as root")
        groups = [gid] + list(self.pod.get("securityContext", {}).get("supplementalGroups", []))
        fs_group = self.pod.get("securityContext", {}).get("fsGroup")
        if fs_group is not None:
            groups.append(fs_group)
        return uid, gid, groups

    def probe(self, name):
        probe = self.c.get(name)
        if not probe:
            fail(f"the container has no {name}")
        return probe

    def port(self, port):
        if isinstance(port, int):
            return port
        for p in self.c.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
        fail(f"no container port named {port}")

    def describe(self):
        uid, gid, groups = self.user()
        return {
            "argv": self.argv,
            "env": self.env,
            "user": [uid, gid, groups],
            "readOnlyRootFilesystem": self.security("readOnlyRootFilesystem", False),
            "workingDir": self.c.get("workingDir") or self.image.get("WorkingDir") or "/",
            "volumeMounts": self.c.get("volumeMounts", []),
            "terminationGracePeriodSeconds": self.pod.get("terminationGracePeriodSeconds", 30),
            "claims": self.claims(),
        }

    def claims(self):
        """The PersistentVolumeClaim volumes and where the container mounts them."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", []) if "persistentVolumeClaim" in v}
        return [
            {"volume": m["name"], "claimName": volumes[m["name"]]["persistentVolumeClaim"]["claimName"],
             "mountPath": m["mountPath"]}
            for m in self.c.get("volumeMounts", []) if m["name"] in volumes
        ]


def sh(*argv):
    subprocess.run(argv, check=True)


def volume_source(container, volume, scratch):
    """A host directory standing for one of the pod's volumes."""
    name = volume["name"]
    given = dict(v.split("=", 1) for v in container.args.volume)
    if name in given:
        return given[name]
    if "persistentVolumeClaim" in volume:
        fail(f"volume {name} is a PersistentVolumeClaim: give its directory with --volume {name}=DIR")
    if "emptyDir" in volume:
        path = tempfile.mkdtemp(prefix=f"emptydir-{name}-", dir=scratch)
        os.chmod(path, 0o777)
        return path
    if "configMap" in volume:
        ref = volume["configMap"]
        data = container.maps.get(ref["name"])
        if data is None:
            fail(f"volume {name}: ConfigMap {ref['name']} not found (--configmap {ref['name']}=KEY:FILE)")
        path = tempfile.mkdtemp(prefix=f"configmap-{name}-", dir=scratch)
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                fail(f"volume {name}: ConfigMap {ref['name']} has no key {item['key']}")
            target = os.path.join(path, item["path"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                f.write(data[item["key"]])
            os.chmod(target, 0o644)
        os.chmod(path, 0o755)
        return path
    fail(f"volume {name}: only persistentVolumeClaim, emptyDir and configMap are supported here")


def set_up_mounts(container):
    """The pod's file system view, inside a private mount namespace: the image root (read-only
    when asked), /proc, a minimal /dev, /sys read-only, and the volumes at their mount paths."""
    root = container.rootfs
    scratch = container.args.scratch
    volumes = {v["name"]: v for v in container.pod.get("volumes", [])}
    sh("mount", "--bind", root, root)
    for m in container.c.get("volumeMounts", []):
        if m["name"] not in volumes:
            fail(f"volumeMount {m['name']} names no volume")
        source = volume_source(container, volumes[m["name"]], scratch)
        target = root + m["mountPath"]
        os.makedirs(target, exist_ok=True)
        sh("mount", "--bind", source, target)
        if m.get("readOnly"):
            sh("mount", "-o", "remount,bind,ro", target)
    sh("mount", "-t", "proc", "proc", root + "/proc")
    sh("mount", "-t", "tmpfs", "-o", "nosuid,mode=0755,size=1m", "tmpfs", root + "/dev")
    for dev in DEVICES:
        open(f"{root}/dev/{dev}", "w").close()
        sh("mount", "--bind", f"/dev/{dev}", f"{root}/dev/{dev}")
    sh("mount", "-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", root + "/sys")
    if container.security("readOnlyRootFilesystem", False):
        sh("mount", "-o", "remount,bind,ro", root)


def become(container, argv):
    """chroot into the image, drop to the pod's user with no capabilities, exec argv."""
    uid, gid, groups = container.user()
    libc = ctypes.CDLL(None, use_errno=True)
    os.chroot(container.rootfs)
    workdir = container.c.get("workingDir") or container.image.get("WorkingDir") or "/"
    os.chdir(workdir)
    drop = container.security("capabilities", {}).get("drop", [])
    if "ALL" in drop:
        for cap in range(LAST_CAP + 1):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    elif drop or container.security("capabilities", {}).get("add"):
        fail("only capabilities drop ALL is supported here")
    if container.security("privileged", False):
        fail("privileged containers are not supported here")
    if not container.security("allowPrivilegeEscalation", True):
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            fail("prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.setgroups(sorted(set(groups)))
    os.setgid(gid)
    os.setuid(uid)
    program = argv[0]
    if "/" not in program:
        program = shutil.which(program, path=container.env.get("PATH", "/usr/bin:/bin")) or fail(
            f"{argv[0]} not found in the image's PATH"
        )
    os.execve(program, argv, container.env)


def cmd_run(container):
    if os.getpid() != 1:
        fail("run must be PID 1 of a new PID namespace (unshare --pid --fork)")
    set_up_mounts(container)
    socket.sethostname(container.pod_name)
    sh("ip", "link", "set", "lo", "up")
    become(container, container.argv)


def cmd_exec(container, args):
    if args.readiness:
        command = container.probe("readinessProbe").get("exec", {}).get("command")
    else:
        command = container.c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if not command:
        fail("no exec command for that probe or hook")
    become(container, [expand(a, container.env) for a in command])


def cmd_http(container, args):
    probe = container.probe("livenessProbe" if args.liveness else "startupProbe")["httpGet"]
    url = f"http://127.0.0.1:{container.port(probe['port'])}{probe.get('path', '/')}"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            print(answer.status, answer.read().decode(errors="replace").strip())
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode(errors="replace").strip())
    except OSError as e:
        print(0, e)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["run", "exec", "http", "show"])
    p.add_argument("--manifest", required=True)
    p.add_argument("--rootfs", default="/nonexistent")
    p.add_argument("--image-config", required=True, help="the image's .Config as JSON (podman image inspect)")
    p.add_argument("--pod-name", default="pod-0")
    p.add_argument("--volume", action="append", default=[], help="NAME=DIR for a volume of the pod")
    p.add_argument("--configmap", action="append", default=[], help="NAME=KEY:FILE, a ConfigMap's key")
    p.add_argument("--scratch", default=tempfile.gettempdir(), help="where emptyDir and configMap volumes are made")
    p.add_argument("--readiness", action="store_true")
    p.add_argument("--prestop", action="store_true")
    p.add_argument("--liveness", action="store_true")
    p.add_argument("--startup", action="store_true")
    args = p.parse_args()
    container = Container(args)
    if args.mode == "show":
        print(json.dumps(container.describe(), indent=2))
    elif args.mode == "run":
        cmd_run(container)
    elif args.mode == "exec":
        cmd_exec(container, args)
    else:
        cmd_http(container, args)


if __name__ == "__main__":
    main()
