#!/usr/bin/env python3
"""What 1,000 services cost a Consul 1.8 agent at idle, by the checks each one
carries, on a new dev agent per shape (ARCHITECTURE.md, "What the alias checks
cost Consul"). Talks to Consul directly; no tether. Python 3.11 stdlib only.

    python3 bench/alias_cost.py [--services 1000] [--seconds 120] [--shapes ttl+alias,ttl,alias,none]
    python3 bench/alias_cost.py --shapes ttl+alias --churn 2   # after 2 x 1,000 services came and went
    python3 bench/alias_cost.py --shapes grpc,tether-1s,tether-5s --rounds 3   # issue 11's Consul-CPU target

The last form answers "Consul's CPU under tether as a share of Consul running
the same 1,000 gRPC checks itself at 1 s" with the rows interleaved, so that a
busy or quiet spell of the machine falls on both sides of the ratio.

Shapes: `alias` is tether's for a passing service (an alias of one liveness
service; its health check exists only while it is not passing), `ttl+alias`
tether's earlier one (also a TTL health check, always), `ttl` a TTL check
only, `none` no check. A liveness heartbeat (output only) goes every 5 s, as tether's does.
`grpc` is Consul running the services' gRPC checks itself (interval 1 s), and
`tether-1s`/`tether-5s` a real tether (release build) checking them at that
interval; both over 10 health servers of 100 service names each, as in the
benchmark's scale phase. `empty` is the agent with no services at all (and no
liveness): what Consul costs whatever checks the services.
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
import statistics
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scale  # noqa: E402
from common import CpuWindow, Procs, log, status_kb, wait_until  # noqa: E402
from consul import Consul  # noqa: E402
from services import HealthServer, Tether  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVE, LIVENESS = "live", "liveness"
ALIAS_SHAPES = ("ttl+alias", "ttl", "alias", "none")
SHAPES = (*ALIAS_SHAPES, "grpc", "tether-1s", "tether-5s", "empty")


def registration(sid: str, shape: str) -> dict:
    ttl = {"CheckID": f"h:{sid}", "Name": "health", "TTL": "24h", "Status": "passing"}
    alias = {"CheckID": f"a:{sid}", "Name": "alive", "AliasService": LIVE}
    checks = {"ttl+alias": [ttl, alias], "ttl": [ttl], "alias": [alias], "none": []}[shape]
    return {"ID": sid, "Name": sid, "Address": "127.0.0.1", "Port": 50000, "Checks": checks}


def measure(shape: str, n: int, seconds: float, churn: int, servers: list[HealthServer], tether_bin: str) -> dict:
    work = tempfile.mkdtemp(prefix="tether-alias-cost-")
    procs = Procs()
    try:
        consul = Consul(procs, os.path.join(ROOT, ".tools/bin/consul"), work)
        h = consul.http
        put = lambda path, body=None: h.json("PUT", path, body or {}, timeout=60)  # noqa: E731
        # tether registers and beats its own liveness; the other shapes get one.
        beats = not shape.startswith("tether") and shape != "empty"
        if beats:
            put("/v1/agent/service/register", {"ID": LIVE, "Name": LIVE, "Checks": [{"CheckID": LIVENESS, "Name": "liveness", "TTL": "15s", "Status": "passing"}]})
        for k in range(churn):
            for i in range(n):
                put("/v1/agent/service/register", registration(f"old{k}-{i}", "ttl+alias"))
            for i in range(n):
                put(f"/v1/agent/service/deregister/old{k}-{i}")
        pids = {"consul": consul.pid}
        if shape == "empty":
            pass
        elif shape in ALIAS_SHAPES:
            for i in range(n):
                put("/v1/agent/service/register", registration(f"s-{i}", shape))
        elif shape == "grpc":
            for j, k, name in scale.placed(n):
                consul.register_grpc(f"cg-{j}", servers[k].port, name, "1s")
            wait_until(lambda: consul.count_status("consul-grpc:cg-", "passing") == n, 180, 0.5, f"{n} Consul gRPC checks passing")
        else:
            files = scale.service_files(servers, n, shape.split("-", 1)[1])
            t = Tether(procs, tether_bin, os.path.join(work, "tether"), "alias-cost", "consul", consul.url, files)
            def passing() -> bool:
                if not t.alive():
                    raise SystemExit(f"tether exited; see {t.log_path}")
                return scale.consul_all_passing(consul, "tether", n)

            wait_until(passing, 300, 0.2, f"{n} tether services passing")
            pids["tether"] = t.pid
        time.sleep(20)  # let the registrations' own work settle
        w = CpuWindow(pids).start()
        per5s, beat, t_end = [], 0, time.monotonic() + seconds
        last = CpuWindow({"consul": consul.pid}).start()
        while time.monotonic() < t_end:
            time.sleep(5)
            beat += 1
            if beats:
                put(f"/v1/agent/check/update/{LIVENESS}", {"Status": "passing", "Output": f"beat {beat}"})
            per5s.append(last.stop()["consul_cpu_ns_pct"])
            last = CpuWindow({"consul": consul.pid}).start()
        r = w.stop()
        out = {
            "shape": shape, "services": n, "churned": churn * n, "seconds": r["seconds"],
            "consul_cpu_pct": r["consul_cpu_ns_pct"], "consul_rss_mb": round(status_kb(consul.pid, "VmRSS") / 1024, 1),
            "machine_cpu_pct": r["machine_cpu_pct"], "per_5s_pct": [round(x, 1) for x in per5s],
        }  # fmt: skip
        if "tether" in pids:
            out["tether_cpu_pct"] = r["tether_cpu_ns_pct"]
        return out
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def shares(rows: list[dict]) -> dict:
    """Each tether row's Consul CPU as a share of Consul's own gRPC checks:
    against the grpc row of the same round, and median against median."""
    out: dict = {}
    grpc = [r for r in rows if r["shape"] == "grpc"]
    for shape in ("tether-1s", "tether-5s", "alias"):
        mine = [r for r in rows if r["shape"] == shape]
        if not grpc or not mine:
            continue
        per_round = [round(100 * m["consul_cpu_pct"] / g["consul_cpu_pct"], 1) for m, g in zip(mine, grpc)]
        med = statistics.median(m["consul_cpu_pct"] for m in mine) / statistics.median(g["consul_cpu_pct"] for g in grpc)
        out[shape] = {"share_pct_per_round": per_round, "share_pct_of_medians": round(100 * med, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=120, help="idle window; whole minutes (see above)")
    ap.add_argument("--shapes", default=",".join(ALIAS_SHAPES))
    ap.add_argument("--rounds", type=int, default=1, help="measure the shapes, in order, this many times")
    ap.add_argument("--churn", type=int, default=0)
    ap.add_argument("--tether", default=os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/tether"))
    ap.add_argument("--health-server", default=os.path.join(ROOT, "target/release/examples/health_server"))
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    for shape in shapes:
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    if len(set(shapes)) != len(shapes):
        raise SystemExit("each shape once per round (--rounds repeats them)")
    servers, procs, logs = [], Procs(), tempfile.mkdtemp(prefix="tether-alias-cost-servers-")
    try:
        if any(s in ("grpc", "tether-1s", "tether-5s") for s in shapes):
            count = -(-args.services // scale.PER_SERVER)
            servers = scale.start_servers(procs, args.health_server, count, lambda k: os.path.join(logs, f"server-{k}.log"))
        rows = []
        for r in range(args.rounds):
            for shape in shapes:
                log(f"round {r + 1}/{args.rounds}: {shape}")
                rows.append(measure(shape, args.services, args.seconds, args.churn, servers, args.tether))
                print(json.dumps(rows[-1]), flush=True)
        if any(r["shape"] == "grpc" for r in rows):
            print(json.dumps({"shares": shares(rows)}), flush=True)
    finally:
        for s in servers:
            s.stop()
        procs.stop_all()
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
