#!/usr/bin/env python3
"""What one liveness heartbeat costs Consul 1.8 at 1,000 aliasing services,
and what it does to a flip sent meanwhile (ARCHITECTURE.md, "Heartbeat
cadence"). Talks to Consul directly; no tether. Python 3.11 stdlib only.

    python3 bench/liveness.py [--services 1000] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Http, Procs, summary  # noqa: E402
from consul import Consul  # noqa: E402
from scale import floor_registration  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVE, LIVENESS = "floor-live", "floor-liveness"


def timed_put(http: Http, path: str, body: dict) -> float:
    """Seconds one PUT took."""
    t0 = time.perf_counter()
    http.json("PUT", path, body, timeout=60)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tether-liveness-")
    procs = Procs()
    try:
        consul = Consul(procs, os.path.join(ROOT, ".tools/bin/consul"), work)
        # Two connections: a beat and a flip are in flight at the same time.
        flips, beats = Http(consul.port, 60), Http(consul.port, 60)
        consul.http.json("PUT", "/v1/agent/service/register?replace-existing-checks=true",
                         {"ID": LIVE, "Name": LIVE, "Checks": [{"CheckID": LIVENESS, "Name": "liveness", "TTL": "15s", "Status": "passing"}]})
        t0 = time.perf_counter()
        ids = [f"s{i}" for i in range(args.services)]
        for sid in ids:
            consul.http.json("PUT", "/v1/agent/service/register?replace-existing-checks=true", floor_registration(sid, 50000, LIVE))
        registrations = time.perf_counter() - t0

        def flip(r: int) -> float:
            status = "critical" if r % 2 else "passing"
            return timed_put(flips, f"/v1/agent/check/update/floor:{ids[r % len(ids)]}", {"Status": status, "Output": status})

        def beat(r: int, status: str = "passing") -> float:
            return timed_put(beats, f"/v1/agent/check/update/{LIVENESS}", {"Status": status, "Output": f"beat {r}"})

        def flip_during_beat(r: int) -> tuple[float, float]:
            """A beat, and a flip sent 20 ms into it: (beat s, flip s)."""
            out: list[float] = []
            th = threading.Thread(target=lambda: out.append(beat(r)))
            th.start()
            time.sleep(0.02)
            f = flip(r)
            th.join()
            return out[0], f

        time.sleep(2)
        alone = []
        for r in range(args.reps):
            alone.append(flip(r))
            time.sleep(0.2)
        steady = []
        for r in range(args.reps):
            steady.append(flip_during_beat(r))
            time.sleep(0.3)
        # A liveness update that changes its status (after a lapse): every alias re-evaluates.
        recovery = []
        for r in range(max(3, args.reps // 6)):
            beat(r, "critical")
            time.sleep(1.0)
            recovery.append(flip_during_beat(r))
            time.sleep(1.0)
        ms = lambda xs: summary([x * 1000 for x in xs])  # noqa: E731
        print(json.dumps({
            "services": args.services,
            "registrations_s": round(registrations, 2),
            "flip_alone_ms": ms(alone),
            "liveness_update_ms": ms([b for b, _ in steady]),
            "flip_during_liveness_ms": ms([f for _, f in steady]),
            "liveness_recovery_ms": ms([b for b, _ in recovery]),
            "flip_during_recovery_ms": ms([f for _, f in recovery]),
        }, indent=2))  # fmt: skip
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
