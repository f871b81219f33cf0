#!/usr/bin/env python3
"""A fleet on loopback: ROUTERS routers in front of REPLICAS echo replicas found through one DNS
name, served by `wsload dns` from a zone file this script rewrites.

Replicas listen on 127.0.0.2, 127.0.0.3, ... (one port for all, as pods behind a headless
service) and report their sessions and a capacity of CAPACITY in their health answers.

Phase 1, capacity: through every router at once, sessions are opened in small batches until
the fleet is asked for 1.3x its capacity; reports how many were admitted, and each replica's
peak of sessions (from its own health answer) against its capacity.

Phase 2, churn: echo load through every router (long sessions, below capacity) plus short
sessions opened and closed in a loop, while replicas leave DNS and come back one after
another. Reports errors (must be 0: sessions on replicas that stay are never touched, and
those on a replica that leaves run on while it drains) and sessions per replica.

    load-tests/fleet_churn.py            # about 1 minute; PROFILE=debug for a debug build

Everything binds loopback addresses, every process stops by itself, and all are stopped at exit.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTERS = int(os.environ.get("ROUTERS", 2))
REPLICAS = int(os.environ.get("REPLICAS", 4))
CAPACITY = int(os.environ.get("CAPACITY", 25))
DURATION = float(os.environ.get("DURATION", 20))
PROFILE = os.environ.get("PROFILE", "release")
NAME = "fleet.wsload.test"
processes = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args, log=None):
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(list(args), stdout=subprocess.PIPE if log is None else out, stderr=out)
    processes.append(p)
    return p


def get_json(url):
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def until(what, check, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"fleet_churn: timed out waiting for {what}")


def main():
    args = ["cargo", "build", "-q", "-p", "wsrouter", "-p", "wsload"] + (["--release"] if PROFILE == "release" else [])
    subprocess.run(args, cwd=ROOT, check=True)
    bin_dir = os.path.join(ROOT, "target", PROFILE)
    wsload, wsrouter = os.path.join(bin_dir, "wsload"), os.path.join(bin_dir, "wsrouter")
    work = tempfile.mkdtemp(prefix="fleet-churn-")
    limit = 600  # seconds: every process stops by itself

    port, dns_port = free_port(), free_port()
    hosts = [f"127.0.0.{i + 2}" for i in range(REPLICAS)]
    zone = os.path.join(work, "zone")

    def publish(members):
        with open(zone + ".new", "w") as f:
            f.writelines(f"{NAME} {host} 1\n" for host in members)
        os.replace(zone + ".new", zone)

    publish(hosts)
    start(wsload, "dns", "--port", str(dns_port), "--zone", zone, "--max-seconds", str(limit),
          log=os.path.join(work, "dns.log"))
    for host in hosts:
        start(wsload, "replica", "--host", host, "--port", str(port), "--max-sessions", str(CAPACITY),
              "--max-seconds", str(limit), log=os.path.join(work, f"replica-{host}.log"))
    routers = []
    for r in range(ROUTERS):
        listen, admin = free_port(), free_port()
        config = os.path.join(work, f"router-{r}.toml")
        with open(config, "w") as f:
            f.write(f"""[listen]
host = "127.0.0.1"
port = {listen}
workers = 1
[admin]
listen = "127.0.0.1:{admin}"
[health_check]
interval_seconds = 0.2
timeout_seconds = 0.5
[limits]
max_connections_per_client = 0
max_sessions_per_client = 0
[balance]
policy = "least_sessions"
[discovery]
nameserver = "127.0.0.1:{dns_port}"
[[replica_groups]]
name = "gpu"
dns = "{NAME}"
port = {port}
""")
        start(wsrouter, "--config", config, log=os.path.join(work, f"router-{r}.log"))
        routers.append((listen, admin))
    for _, admin in routers:
        until("every replica healthy", lambda: sum(
            rep["status"] == "healthy" for rep in get_json(f"http://127.0.0.1:{admin}/status")["replicas"]) == REPLICAS)

    # Each replica's own count of sessions, polled while the phases run.
    peaks = {host: 0 for host in hosts}
    polling = threading.Event()

    def poll():
        while not polling.is_set():
            for host in hosts:
                try:
                    sessions = get_json(f"http://{host}:{port}/health")["sessions"]
                    peaks[host] = max(peaks[host], sessions)
                except OSError:
                    pass
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()

    # Phase 1: ask for 1.3x the fleet's capacity, 5 sessions per router at a time.
    capacity = REPLICAS * CAPACITY
    wanted = int(capacity * 1.3)
    batch = 5
    idles = []
    hold = 3 + (wanted / (batch * ROUTERS)) * 0.25
    opened = 0
    while opened < wanted:
        for listen, _ in routers:
            idles.append(start(wsload, "idle", "--url", f"ws://127.0.0.1:{listen}/v1/stream",
                               "--connections", str(batch), "--hold", f"{hold:.1f}"))
            opened += batch
        time.sleep(0.25)
    admitted = 0
    for p in idles:
        out, _ = p.communicate(timeout=120)
        line = json.loads(out.decode().strip().splitlines()[-1])
        admitted += line["held"] - line["dead_after_hold"]
    polling.set()
    poller.join()
    phase1 = {"phase": "capacity", "routers": ROUTERS, "replicas": REPLICAS, "capacity_each": CAPACITY,
              "asked": opened, "admitted": admitted, "fleet_capacity": capacity,
              "peak_sessions": peaks, "over_capacity": {h: max(0, n - CAPACITY) for h, n in peaks.items()}}
    print(json.dumps(phase1), flush=True)
    until("the phase-1 sessions to end", lambda: all(
        get_json(f"http://{host}:{port}/health")["sessions"] == 0 for host in hosts))

    # Phase 2: long echo sessions and short ones through every router while replicas churn.
    echo_conns = max(1, (CAPACITY * (REPLICAS - 1)) // (2 * ROUTERS))
    loads = []
    for listen, _ in routers:
        url = f"ws://127.0.0.1:{listen}/v1/stream"
        loads.append(start(wsload, "echo", "--url", url, "--connections", str(echo_conns), "--size", "64",
                           "--duration", str(DURATION), "--warmup", "0", "--rate", "2000"))
        loads.append(start(wsload, "handshake", "--url", url, "--concurrency", "2", "--duration", str(DURATION)))
    churned = []
    started = time.time()
    step = DURATION / (2 * REPLICAS + 1)
    i = 0
    while time.time() - started < DURATION - step:
        gone = hosts[i % REPLICAS]
        publish([h for h in hosts if h != gone])
        churned.append(gone)
        time.sleep(step)
        publish(hosts)
        time.sleep(step)
        i += 1
    results = []
    for p in loads:
        out, _ = p.communicate(timeout=DURATION + 60)
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    per_replica = {}
    for _, admin in routers:
        for rep in get_json(f"http://127.0.0.1:{admin}/status")["replicas"]:
            per_replica[rep["name"]] = per_replica.get(rep["name"], 0) + rep["total_sessions"]
    phase2 = {"phase": "churn", "duration_s": DURATION, "churned": churned,
              "echo_errors": sum(r.get("errors", 0) for r in results if r["mode"] == "echo"),
              "echo_mismatches": sum(r.get("mismatches", 0) for r in results if r["mode"] == "echo"),
              "echo_msgs_per_s": round(sum(r.get("msgs_per_s", 0) for r in results if r["mode"] == "echo")),
              "short_sessions": sum(r.get("handshakes", 0) for r in results if r["mode"] == "handshake"),
              "short_session_errors": sum(r.get("errors", 0) for r in results if r["mode"] == "handshake"),
              "sessions_per_replica": per_replica}
    print(json.dumps(phase2), flush=True)
    failed = phase2["echo_errors"] or phase2["echo_mismatches"] or phase2["short_session_errors"]
    print(f"capacity: {admitted} of {opened} asked admitted for a fleet capacity of {capacity}; "
          f"peak per replica {sorted(peaks.values())} against {CAPACITY} each", file=sys.stderr)
    print(f"churn: {phase2['echo_errors']} echo errors, {phase2['short_session_errors']} short-session errors "
          f"over {phase2['short_sessions']} short sessions while {len(churned)} replicas left DNS and came back",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        for p in processes:
            if p.poll() is None:
                p.terminate()
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
