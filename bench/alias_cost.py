#!/usr/bin/env python3
"""What 1,000 services cost a Consul 1.8 agent at idle, by the checks each one
carries, on a new dev agent per shape (ARCHITECTURE.md, "What the alias checks
cost Consul"). Talks to Consul directly; no tether. Python 3.11 stdlib only.

    python3 bench/alias_cost.py [--services 1000] [--seconds 120] [--shapes ttl+alias,ttl,alias,none]
    python3 bench/alias_cost.py --shapes ttl+alias --churn 2   # after 2 x 1,000 services came and went

Shapes: `alias` is tether's for a passing service (an alias of one liveness
service; its health check exists only while it is not passing), `ttl+alias`
tether's earlier one (also a TTL health check, always), `ttl` a TTL check
only, `none` no check. A liveness heartbeat (output only) goes every 5 s, as tether's does.
The idle window should be whole minutes: the alias checks' cost comes in one
burst a minute. `--churn K` first registers and deregisters K rounds of 1,000 services
(`ttl+alias`, as in the figures already recorded; either shape leaks one alias
check per service): Consul before the fix of hashicorp/consul#14935 never stops a
deregistered alias check, so those go on costing CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import CpuWindow, Procs, status_kb  # noqa: E402
from consul import Consul  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVE, LIVENESS = "live", "liveness"
SHAPES = ("ttl+alias", "ttl", "alias", "none")


def registration(sid: str, shape: str) -> dict:
    ttl = {"CheckID": f"h:{sid}", "Name": "health", "TTL": "24h", "Status": "passing"}
    alias = {"CheckID": f"a:{sid}", "Name": "alive", "AliasService": LIVE}
    checks = {"ttl+alias": [ttl, alias], "ttl": [ttl], "alias": [alias], "none": []}[shape]
    return {"ID": sid, "Name": sid, "Address": "127.0.0.1", "Port": 50000, "Checks": checks}


def measure(shape: str, n: int, seconds: float, churn: int) -> dict:
    work = tempfile.mkdtemp(prefix="tether-alias-cost-")
    procs = Procs()
    try:
        consul = Consul(procs, os.path.join(ROOT, ".tools/bin/consul"), work)
        h = consul.http
        put = lambda path, body=None: h.json("PUT", path, body or {}, timeout=60)  # noqa: E731
        put("/v1/agent/service/register", {"ID": LIVE, "Name": LIVE, "Checks": [{"CheckID": LIVENESS, "Name": "liveness", "TTL": "15s", "Status": "passing"}]})
        for k in range(churn):
            for i in range(n):
                put("/v1/agent/service/register", registration(f"old{k}-{i}", "ttl+alias"))
            for i in range(n):
                put(f"/v1/agent/service/deregister/old{k}-{i}")
        for i in range(n):
            put("/v1/agent/service/register", registration(f"s-{i}", shape))
        time.sleep(20)  # let the registrations' own work settle
        w = CpuWindow({"consul": consul.pid}).start()
        per5s, beat, t_end = [], 0, time.monotonic() + seconds
        last = CpuWindow({"consul": consul.pid}).start()
        while time.monotonic() < t_end:
            time.sleep(5)
            beat += 1
            put(f"/v1/agent/check/update/{LIVENESS}", {"Status": "passing", "Output": f"beat {beat}"})
            per5s.append(last.stop()["consul_cpu_ns_pct"])
            last = CpuWindow({"consul": consul.pid}).start()
        r = w.stop()
        return {
            "shape": shape, "services": n, "churned": churn * n, "seconds": r["seconds"],
            "consul_cpu_pct": r["consul_cpu_ns_pct"], "consul_rss_mb": round(status_kb(consul.pid, "VmRSS") / 1024, 1),
            "per_5s_pct": [round(x, 1) for x in per5s],
        }  # fmt: skip
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=120, help="idle window; whole minutes (see above)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--churn", type=int, default=0)
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
        print(json.dumps(measure(shape, args.services, args.seconds, args.churn)), flush=True)


if __name__ == "__main__":
    main()
