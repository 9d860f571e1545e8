#!/usr/bin/env python3
"""/healthz latency of a hyper2kvm daemon while clients hold connections open (loopback only).

usage: scripts/healthz-latency.py BINARY PORT   e.g. target/release/hyper2kvm 19381
Starts the daemon on empty temporary directories with METRICS_ADDR=127.0.0.1:PORT, then for
0, 8, 64 and 500 idle connections and for one client that pipelines 2000 scrapes without
reading, prints the median, p99 and max of /healthz and the daemon's thread count.
The figures in docs/DECISIONS.md ("Metrics: ...") came from it."""
import os, shutil, socket, statistics, subprocess, sys, tempfile, time

binary, port = sys.argv[1], int(sys.argv[2])
ADDR = ("127.0.0.1", port)

def get(path, timeout=10.0):
    t0 = time.perf_counter()
    try:
        s = socket.create_connection(ADDR, timeout=timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    except OSError as e:
        status = f"error:{type(e).__name__}"
    return status, (time.perf_counter() - t0) * 1000

def threads(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Threads:"):
            return int(line.split()[1])

def probe(label, pid, n=200, timeout=10.0):
    lat, bad = [], {}
    for _ in range(n):
        status, ms = get("/healthz", timeout)
        lat.append(ms)
        if status != 200:
            bad[status] = bad.get(status, 0) + 1
    lat.sort()
    print(f"{label:34s} median {statistics.median(lat):6.2f} ms  p99 {lat[int(0.99 * n) - 1]:7.2f} ms  "
          f"max {lat[-1]:7.1f} ms  non-200 {bad or 0}  threads {threads(pid)}", flush=True)

root = tempfile.mkdtemp(prefix="r2m-bench-")
dirs = {k: os.path.join(root, k) for k in ("etc", "queue", "output", "exports")}
for d in dirs.values():
    os.makedirs(d)
env = {"PATH": os.environ["PATH"], "POLL_INTERVAL": "0.2", "SETTLE_SECONDS": "0.3", "SOURCE_ROOTS": dirs["exports"],
       "LOG_LEVEL": "info", "USE_INOTIFY": "false", "METRICS_ADDR": f"127.0.0.1:{port}"}
log = open(os.path.join(root, "daemon.log"), "w")
daemon = subprocess.Popen([binary, "--config-dir", dirs["etc"], "daemon", "--watch-dir", dirs["queue"],
                           "--output-dir", dirs["output"]], env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
try:
    deadline = time.time() + 30
    while get("/healthz", 1)[0] != 200:
        if time.time() > deadline or daemon.poll() is not None:
            sys.exit("daemon not healthy: " + open(os.path.join(root, "daemon.log")).read()[-2000:])
        time.sleep(0.1)
    idle = []
    for held in (0, 8, 64):
        while len(idle) < held:
            idle.append(socket.create_connection(ADDR))
        time.sleep(0.3)
        probe(f"{held} idle connections", daemon.pid)
    # Past our server's 5 s read deadline: are the idle connections still held?
    time.sleep(6)
    print(f"after 6 s: threads {threads(daemon.pid)}", flush=True)
    for s in idle:
        s.close()
    idle = []
    time.sleep(1)
    # Many idle connections: are threads bounded?
    for _ in range(500):
        idle.append(socket.create_connection(ADDR))
    time.sleep(1)
    probe("500 idle connections", daemon.pid, n=50)
    for s in idle:
        s.close()
    time.sleep(1)
    # One client pipelines 2000 scrapes and reads nothing.
    hog = socket.create_connection(ADDR)
    hog.setblocking(False)
    req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    try:
        hog.send(req)
    except BlockingIOError:
        pass
    time.sleep(1)
    probe("a pipelining client not reading", daemon.pid, n=10, timeout=2.0)
    hog.close()
finally:
    daemon.terminate()
    try:
        daemon.wait(20)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
    log.close()
    shutil.rmtree(root, ignore_errors=True)
