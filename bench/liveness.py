#!/usr/bin/env python3
"""What one liveness heartbeat costs Consul 1.8 at 1,000 aliasing services,
and what it does to a flip sent meanwhile (ARCHITECTURE.md, "heartbeat
cadence"). Talks to Consul directly; no tether. Python 3.11 stdlib only.

    python3 bench/liveness.py [--services 1000] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def put(base: str, path: str, body: dict | None = None) -> float:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="PUT")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
    return time.perf_counter() - t0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tether-liveness-")
    http = free_port()
    ports = [free_port() for _ in range(3)]
    consul = subprocess.Popen(
        [os.path.join(ROOT, ".tools/bin/consul"), "agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-dns-port=-1",
         "-grpc-port=-1", "-log-level=warn", f"-http-port={http}", f"-serf-lan-port={ports[0]}",
         f"-serf-wan-port={ports[1]}", f"-server-port={ports[2]}"],
        stdout=open(os.path.join(work, "consul.log"), "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(base + "/v1/status/leader", timeout=1) as r:
                    if len(r.read()) > 2:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        put(base, "/v1/agent/service/register?replace-existing-checks=true",
            {"ID": "tether-x", "Name": "tether", "Port": 0,
             "Checks": [{"CheckID": "liveness", "Name": "l", "TTL": "15s", "Status": "passing"}]})
        t0 = time.perf_counter()
        for i in range(args.services):
            put(base, "/v1/agent/service/register?replace-existing-checks=true",
                {"ID": f"s{i}", "Name": f"s{i}", "Port": 1000 + i,
                 "Checks": [{"CheckID": f"tether:s{i}", "Name": "h", "TTL": "24h", "Status": "passing"},
                            {"CheckID": f"alive:s{i}", "Name": "a", "AliasService": "tether-x"}]})
        reg = time.perf_counter() - t0
        flip = lambda i, st: put(base, f"/v1/agent/check/update/tether:s{i % args.services}", {"Status": st, "Output": st})  # noqa: E731
        beat = lambda n: put(base, "/v1/agent/check/update/liveness", {"Status": "passing", "Output": f"beat {n}"})  # noqa: E731
        time.sleep(2)
        alone, beats, during = [], [], []
        for r in range(args.reps):
            alone.append(flip(r, "critical" if r % 2 else "passing"))
            time.sleep(0.2)
        for r in range(args.reps):
            out: list[float] = []
            th = threading.Thread(target=lambda: out.append(beat(r)))
            th.start()
            time.sleep(0.02)
            during.append(flip(r, "critical" if r % 2 else "passing"))
            th.join()
            beats.extend(out)
            time.sleep(0.3)
        # A liveness update that changes its status (after a lapse): every alias re-evaluates.
        recover, during_recover = [], []
        for r in range(max(3, args.reps // 6)):
            put(base, "/v1/agent/check/update/liveness", {"Status": "critical", "Output": "lapsed"})
            time.sleep(1.0)
            out = []
            th = threading.Thread(target=lambda: out.append(beat(r)))
            th.start()
            time.sleep(0.02)
            during_recover.append(flip(r, "critical" if r % 2 else "passing"))
            th.join()
            recover.extend(out)
            time.sleep(1.0)
        res = {
            "services": args.services,
            "registrations_s": round(reg, 2),
            "flip_alone_ms": {"p50": round(pct(alone, 50) * 1000, 1), "p99": round(pct(alone, 99) * 1000, 1)},
            "liveness_update_ms": {"p50": round(pct(beats, 50) * 1000, 1), "p99": round(pct(beats, 99) * 1000, 1)},
            "flip_during_liveness_ms": {"p50": round(pct(during, 50) * 1000, 1), "p99": round(pct(during, 99) * 1000, 1)},
            "liveness_recovery_ms": {"p50": round(pct(recover, 50) * 1000, 1), "max": round(max(recover) * 1000, 1)},
            "flip_during_recovery_ms": {"p50": round(pct(during_recover, 50) * 1000, 1), "max": round(max(during_recover) * 1000, 1)},
        }
        print(json.dumps(res, indent=2))
    finally:
        consul.terminate()
        try:
            consul.wait(10)
        except subprocess.TimeoutExpired:
            consul.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.dont_write_bytecode = True
    main()
