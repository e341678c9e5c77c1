#!/usr/bin/env python3
"""tether's benchmark suite: detection latency, crash detection, config
pick-up, footprint and registry cost, against one Consul dev agent and one
single-node etcd, all on loopback. Run it through scripts/bench.sh.

Writes OUT/results.json (every figure and the raw samples) and OUT/report.md
(the tables for docs/BENCHMARKS.md). Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import CpuWindow, Procs, log, status_kb, summary, system_cpu, wait_until  # noqa: E402
from consul import METRICS_INTERVAL, CatalogObserver, Consul, writes_of  # noqa: E402
from etcd import Etcd, WatchObserver  # noqa: E402
from grpcgo import GoClient  # noqa: E402
from services import HealthServer, Tether, drop_file, service_file  # noqa: E402
import cross  # noqa: E402
import flap  # noqa: E402
import scale  # noqa: E402
import report  # noqa: E402

# Scale phase rows: (backend, services, interval, idle window in s or None for
# the default). One service gets a 60 s window: at 10 ms clock ticks, 30 s
# would resolve only 0.033 % steps against a 0.05 % target. Consul at 1,000
# services gets 120 s: each alias check (one per service) re-reads all the
# agent's checks once a minute, and those of services registered together fire
# together, about 3 s of CPU at 1,000 services in one burst (bench/alias_cost.py),
# so a 30 s window holds one burst or none.
SCALE_ROWS = [
    ("consul", 1, "1s", 60), ("consul", 100, "1s", None),
    ("consul", 1000, "1s", 120), ("consul", 1000, "5s", 120),
    ("etcd", 1, "1s", 60), ("etcd", 100, "1s", None),
    ("etcd", 1000, "1s", None), ("etcd", 1000, "5s", None),
]
FULL = dict(flips=50, etcd_flips=50, rotation_flips=50, crashes=10, etcd_crashes=5, config_reps=20, calib=40,
            ns=[10, 100, 1000], cost_ns=[100, 1000], etcd_ns=[100, 1000], idle_intervals=2, flip_intervals=1,
            scale_idle_s=30, scale_flip_reps=5, scale_rows=SCALE_ROWS, cross_flips=30,
            flap_s=20, flap_quiet_s=20, flap_back_s=60)  # fmt: skip
QUICK = dict(flips=10, etcd_flips=10, rotation_flips=10, crashes=3, etcd_crashes=2, config_reps=5, calib=15,
             ns=[10, 100], cost_ns=[100], etcd_ns=[100], idle_intervals=1, flip_intervals=1,
             scale_idle_s=10, scale_flip_reps=3, scale_rows=SCALE_ROWS, cross_flips=10,
             flap_s=20, flap_quiet_s=10, flap_back_s=60)  # fmt: skip
PHASES = ["calibration", "baseline", "detection", "crash", "config", "etcd", "rotation", "footprint", "scale", "flap", "cross"]
# Phases that bring their own registry (cross: a 3-server Consul cluster with
# two client agents, bench/cross.py) and need neither the dev agent nor etcd.
OWN_REGISTRY = {"cross"}
# Phases that need the catalog observer (blocking queries on all of /v1/health/state/any).
OBSERVED = {"calibration", "detection", "crash", "config"}

# Check IDs in the detection runs.
WATCH, POLL, OWN = "tether:orders-watch", "tether:orders-poll", "consul-grpc"
ETCD_KEY = "services/orders/orders-1"


def ms(t: float | None, t0: float) -> float | None:
    return None if t is None else round((t - t0) * 1000, 3)


def sleep_dephased(lo: float, hi: float) -> None:
    time.sleep(random.uniform(lo, hi))


class Bench:
    def __init__(self, args, cfg: dict) -> None:
        self.args, self.cfg = args, cfg
        self.procs = Procs()
        self.work = tempfile.mkdtemp(prefix="tether-bench-")
        self.results: dict = {"settings": cfg, "phases": {}}
        self.consul: Consul | None = None
        self.etcd: Etcd | None = None
        self.obs: CatalogObserver | None = None

    # ---------------------------------------------------------------- plumbing

    def path(self, *parts: str) -> str:
        p = os.path.join(self.work, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def window(self, pids: dict[str, int], intervals: int, during=None) -> dict:
        return self.windows(pids, [("w", intervals, during)])["w"]

    def windows(self, pids: dict[str, int], plan: list[tuple[str, int, object]], snapshot=None) -> dict[str, dict]:
        """Back-to-back measurement windows, each a whole number of the 10 s
        intervals of Consul's metrics sink (aligned on the wall clock). For each
        window: CPU of `pids` (and of the whole machine), their RSS at its end,
        Consul's HTTP writes and Raft applies, etcd's revisions and lease
        renewals. A window's `during(elapsed)` is called about every 50 ms.
        `snapshot()` (a dict) is taken at each window's start and end; the
        number of keys whose value changed is reported as `snapshot_changed`."""
        now = time.time()
        t = (int(now) // METRICS_INTERVAL + 1) * METRICS_INTERVAL
        if t - now < 0.5:  # too close to catch cleanly: take the next one
            t += METRICS_INTERVAL
        spans = []
        for name, intervals, during in plan:
            spans.append((name, t, t + intervals * METRICS_INTERVAL, during))
            t += intervals * METRICS_INTERVAL
        final = t
        # Consul shows only the last complete interval: read each one just
        # after it completes (one GET per 10 s).
        fetch_at = [spans[0][1] + (k + 1) * METRICS_INTERVAL + 0.6 for k in range(int((final - spans[0][1]) // METRICS_INTERVAL))]
        fetched: dict[str, tuple[dict, int]] = {}
        results: dict[str, dict] = {}
        time.sleep(max(0.0, spans[0][1] - time.time()))
        for name, s_wall, e_wall, during in spans:
            rev0 = self.etcd.revision() if self.etcd else None
            lease0 = self.etcd_lease_renewals()
            snap0 = snapshot() if snapshot else None
            w = CpuWindow(pids).start()
            while True:
                now = time.time()
                if now >= e_wall:
                    break
                if during:
                    during(now - s_wall)
                if fetch_at and now >= fetch_at[0]:
                    fetch_at.pop(0)
                    stamp, counts, raft = self.consul_interval()
                    fetched[stamp] = (counts, raft)
                nxt = min([e_wall] + fetch_at[:1])
                time.sleep(min(0.05, max(0.0, nxt - time.time())))
            out = w.stop()
            for pname, pid in pids.items():
                out[f"{pname}_rss_kb"] = status_kb(pid, "VmRSS")
                out[f"{pname}_hwm_kb"] = status_kb(pid, "VmHWM")
            if snapshot:
                snap1 = snapshot()
                out["snapshot_changed"] = sum(1 for k in set(snap0) | set(snap1) if snap0.get(k) != snap1.get(k))
                out["snapshot_size"] = len(snap1)
            if self.etcd:
                out["etcd_revisions"] = self.etcd.revision() - rev0
                lease1 = self.etcd_lease_renewals()
                if lease0 is not None and lease1 is not None:
                    out["etcd_lease_renewals"] = int(lease1 - lease0)
            out["wall_start"] = s_wall
            results[name] = out
        while fetch_at:
            time.sleep(max(0.0, fetch_at[0] - time.time()))
            fetch_at.pop(0)
            stamp, counts, raft = self.consul_interval()
            fetched[stamp] = (counts, raft)
        for name, s_wall, e_wall, _ in spans:
            out = results[name]
            expected = [self._stamp(x) for x in range(int(s_wall), int(e_wall), METRICS_INTERVAL)]
            http_writes: dict[str, int] = {}
            applies = 0
            for st in expected:
                if st in fetched:
                    for k, v in writes_of(fetched[st][0]).items():
                        http_writes[k] = http_writes.get(k, 0) + v
                    applies += fetched[st][1]
            out["consul_intervals"] = [st for st in expected if st in fetched]
            out["consul_intervals_missed"] = [st for st in expected if st not in fetched]
            out["consul_http_writes"] = http_writes
            out["consul_http_writes_total"] = sum(http_writes.values())
            out["consul_raft_applies"] = applies
        return results

    @staticmethod
    def _stamp(wall: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(wall))

    def consul_interval(self) -> tuple[str, dict, int]:
        m = self.consul.http.json("GET", "/v1/agent/metrics")
        counts = {s["Name"]: s["Count"] for s in m.get("Samples", []) if s["Name"].startswith("consul.http.")}
        raft = sum(c["Count"] for c in m.get("Counters", []) if c["Name"] == "consul.raft.apply")
        return m["Timestamp"], counts, raft

    def etcd_lease_renewals(self) -> float | None:
        if not self.etcd:
            return None
        return self.etcd.metrics(("etcd_debugging_lease_renewed_total",)).get("etcd_debugging_lease_renewed_total")

    # ---------------------------------------------------------------- phases

    def run(self) -> None:
        self.results["meta"] = machine_info(self.args)
        phases = self.args.phases.split(",") if self.args.phases else PHASES
        if set(phases) - OWN_REGISTRY:
            self.consul = Consul(self.procs, os.path.join(self.args.tools, "consul"), self.work)
            self.etcd = Etcd(self.procs, os.path.join(self.args.tools, "etcd"), self.work)
        if OBSERVED & set(phases):
            self.obs = CatalogObserver(self.consul)
        for name in PHASES:
            if name not in phases:
                continue
            log(f"== phase {name}")
            t0 = time.monotonic()
            busy0 = system_cpu()
            getattr(self, f"phase_{name}")()
            busy1 = system_cpu()
            machine = 100.0 * (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * (os.cpu_count() or 1)
            self.results["phases"][name] = {"seconds": round(time.monotonic() - t0, 1), "machine_cpu_pct": round(machine, 1)}
        if self.obs:
            self.obs.stop()

    def phase_cross(self) -> None:
        """A flip on client agent A of a 3-server Consul cluster until a
        consumer's blocking query on client agent B sees it: tether (watch
        mode) against Consul's own gRPC check and a TTL floor (bench/cross.py)."""
        self.results["cross"] = cross.run(self.procs, self.args, self.cfg, self.path)

    def phase_flap(self) -> None:
        """A grpc-go server toggled SERVING/NOT_SERVING every 25 ms for 20 s
        beside a steady one, with flap damping on, with only the write budget,
        and with everything off: consumer wake-ups, registry writes, Consul's,
        etcd's and tether's CPU, tether's log lines (bench/flap.py)."""
        self.end_latency_setup()

        def fresh() -> Consul:
            self.fresh_consul()
            return self.consul

        self.results["flap"] = flap.run(self.procs, self.args, self.cfg, self.path, fresh, self.etcd)

    def phase_calibration(self) -> None:
        """The observers' own floor: a write made directly by this script, until
        the observer sees it (Consul: TTL check update → catalog blocking query;
        etcd: put/delete → watch event)."""
        c = self.consul
        c.http.json("PUT", "/v1/agent/check/register", {"ID": "bench-calib", "Name": "bench calibration", "TTL": "10m"})
        self.obs.wait(lambda s: "bench-calib" in s, 10)
        consul_ms, put_ms = [], []
        status = "critical"
        for _ in range(self.cfg["calib"]):
            sleep_dephased(0.02, 0.08)
            status = "passing" if status == "critical" else "critical"
            t0 = time.monotonic()
            c.http.json("PUT", f"/v1/agent/check/update/bench-calib", {"Status": status, "Output": status})
            t1 = time.monotonic()
            if self.obs.wait(lambda s: s.get("bench-calib") == status, 5):
                consul_ms.append(ms(self.obs.first_change("bench-calib", status, t0), t0))
                put_ms.append(ms(t1, t0))
        c.http.request("PUT", "/v1/agent/check/deregister/bench-calib")

        e = self.etcd
        w = WatchObserver(e, "bench/")
        etcd_ms = []
        try:
            for i in range(self.cfg["calib"]):
                sleep_dephased(0.02, 0.08)
                t0 = time.monotonic()
                if i % 2 == 0:
                    e.put("bench/calib", "x")
                    kind = "PUT"
                    ok = w.wait(lambda s: "bench/calib" in s, 5)
                else:
                    e.delete("bench/calib")
                    kind = "DELETE"
                    ok = w.wait(lambda s: "bench/calib" not in s, 5)
                if ok:
                    etcd_ms.append(ms(w.first_event("bench/calib", kind, t0), t0))
        finally:
            w.stop()
        self.results["calibration"] = {
            "consul_update_to_catalog": summary(consul_ms),
            "consul_update_put_roundtrip": summary(put_ms),
            "etcd_write_to_watch": summary(etcd_ms),
        }
        log("calibration:", json.dumps(self.results["calibration"]))

    def phase_baseline(self) -> None:
        """Consul and etcd with nothing registered, nothing running."""
        r = self.window({"consul": self.consul.pid, "etcd": self.etcd.pid}, self.cfg["idle_intervals"])
        self.results["baseline"] = r
        log("baseline:", json.dumps(r))

    def start_detection_setup(self) -> None:
        if getattr(self, "hs", None) is not None:
            return
        self.hs = HealthServer(self.procs, self.args.health_server, 0, [], self.path("health_server.log"))
        files = {
            "orders-watch.toml": service_file("orders-watch", "orders-watch", self.hs.port, "", "watch"),
            "orders-poll.toml": service_file("orders-poll", "orders-poll", self.hs.port, "", "poll"),
        }
        self.tether = Tether(self.procs, self.args.tether, self.path("tether-consul", "x"), "bench", "consul", self.consul.url, files)
        self.consul.register_grpc("c-orders", self.hs.port, "", "1s", check_id=OWN)
        ok = self.obs.wait(lambda s: all(s.get(c) == "passing" for c in (WATCH, POLL, OWN)), 30)
        if not ok:
            raise RuntimeError(f"detection setup: not all passing: {self.obs.state}")
        time.sleep(2)

    def phase_detection(self) -> None:
        """Flip NOT_SERVING/SERVING; time until each checker's status changes in
        Consul's catalog. All three watch the same server at the same time."""
        self.start_detection_setup()
        res = {c: {"critical": [], "passing": []} for c in (WATCH, POLL, OWN)}
        ack, missed = [], 0
        held = []  # per flip back to SERVING: (how long it was NOT_SERVING, tether watch's latency), ms
        t_prev = time.monotonic()
        for i in range(self.cfg["flips"]):
            for target, want in (("not_serving", "critical"), ("serving", "passing")):
                sleep_dephased(0.2, 1.2)
                t0, t1 = self.hs.set(target)
                ack.append(ms(t1, t0))
                if not self.obs.wait(lambda s: all(s.get(c) == want for c in res), 6):
                    missed += 1
                for c in res:
                    v = ms(self.obs.first_change(c, want, t0), t0)
                    if v is not None:
                        res[c][want].append(v)
                if want == "passing":
                    held.append((ms(t0, t_prev), ms(self.obs.first_change(WATCH, want, t0), t0)))
                t_prev = t0
            if (i + 1) % 10 == 0:
                log(f"detection: {i + 1}/{self.cfg['flips']} flip cycles")
        self.results["detection_consul"] = {
            "checks": {c: {k: summary(v) for k, v in d.items()} for c, d in res.items()},
            "raw_ms": res,
            "watch_passing_by_hold_ms": held,
            "flip_ack": summary(ack),
            "missed": missed,
        }
        log("detection:", json.dumps(self.results["detection_consul"]["checks"]))

    def phase_crash(self) -> None:
        """SIGKILL the server; time until each checker shows critical. Then
        restart it on the same port and time the way back to passing."""
        self.start_detection_setup()
        cids = (WATCH, POLL, OWN)
        crit = {c: [] for c in cids}
        back = {c: [] for c in cids}
        for i in range(self.cfg["crashes"]):
            sleep_dephased(0.3, 1.3)
            t0 = self.hs.kill()
            self.obs.wait(lambda s: all(s.get(c) == "critical" for c in cids), 8)
            for c in cids:
                v = ms(self.obs.first_change(c, "critical", t0), t0)
                if v is not None:
                    crit[c].append(v)
            t1 = time.monotonic()
            self.hs.restart()
            self.obs.wait(lambda s: all(s.get(c) == "passing" for c in cids), 15)
            for c in cids:
                v = ms(self.obs.first_change(c, "passing", t1), t1)
                if v is not None:
                    back[c].append(v)
        self.results["crash_consul"] = {
            "critical": {c: summary(v) for c, v in crit.items()},
            "restart_to_passing": {c: summary(v) for c, v in back.items()},
            "raw_ms": crit,
        }
        log("crash:", json.dumps(self.results["crash_consul"]["critical"]))

    def phase_config(self) -> None:
        """Drop a service file into services.d: time until it is passing in
        Consul; remove it: time until it is gone."""
        self.start_detection_setup()
        registered, passing, gone = [], [], []
        for i in range(self.cfg["config_reps"]):
            sid = f"cfg-{i}"
            cid = f"tether:{sid}"
            path = os.path.join(self.tether.services_dir, f"{sid}.toml")
            sleep_dephased(0.2, 0.7)
            t0 = drop_file(path, service_file(sid, sid, self.hs.port, "", "watch"))
            if self.obs.wait(lambda s: s.get(cid) == "passing", 10):
                passing.append(ms(self.obs.first_change(cid, "passing", t0), t0))
                first = min((t for t, c, old, _ in self.obs.events if c == cid and old is None and t >= t0), default=None)
                registered.append(ms(first, t0))
            sleep_dephased(0.2, 0.7)
            t0 = time.monotonic()
            os.unlink(path)
            if self.obs.wait(lambda s: cid not in s, 10):
                gone.append(ms(self.obs.first_change(cid, None, t0), t0))
        self.results["config"] = {
            "file_to_registered": summary([x for x in registered if x is not None]),
            "file_to_passing": summary(passing),
            "unlink_to_gone": summary(gone),
            "raw_ms": {"passing": passing, "gone": gone},
        }
        log("config:", json.dumps({k: v for k, v in self.results["config"].items() if k != "raw_ms"}))

    def stop_detection_setup(self) -> None:
        if getattr(self, "tether", None) is None and getattr(self, "hs", None) is None:
            return
        if getattr(self, "tether", None) is not None:
            code, secs = self.tether.stop()
            self.results.setdefault("notes", {})["detection_tether_exit"] = {"code": code, "seconds": round(secs, 2)}
            self.tether = None
        self.consul.deregister("c-orders")

    def end_latency_setup(self) -> None:
        """Before the load phases (footprint, scale): stop the detection setup,
        its server and the catalog observer, whose whole-catalog answers would
        load Consul at 2,000 checks."""
        self.stop_detection_setup()
        if getattr(self, "hs", None) is not None:
            self.hs.stop()
            self.hs = None
        if self.obs:
            self.obs.stop()
            self.obs = None

    def phase_etcd(self) -> None:
        """The same flips and kills with tether (watch mode) on etcd: time
        until the key is gone / back, seen by a watch."""
        self.stop_detection_setup()
        if getattr(self, "hs", None) is None:
            self.hs = HealthServer(self.procs, self.args.health_server, 0, [], self.path("health_server.log"))
        w = WatchObserver(self.etcd, "services/")
        try:
            files = {"orders.toml": service_file("orders", "orders-1", self.hs.port, "", "watch")}
            t = Tether(self.procs, self.args.tether, self.path("tether-etcd", "x"), "bench-etcd", "etcd", self.etcd.url, files)
            if not w.wait(lambda s: ETCD_KEY in s, 30):
                raise RuntimeError("etcd: the key never appeared")
            time.sleep(2)
            gone, back, ack = [], [], []
            for i in range(self.cfg["etcd_flips"]):
                sleep_dephased(0.05, 0.6)
                t0, t1 = self.hs.set("not_serving")
                ack.append(ms(t1, t0))
                if w.wait(lambda s: ETCD_KEY not in s, 6):
                    gone.append(ms(w.first_event(ETCD_KEY, "DELETE", t0), t0))
                sleep_dephased(0.05, 0.6)
                t0, t1 = self.hs.set("serving")
                ack.append(ms(t1, t0))
                if w.wait(lambda s: ETCD_KEY in s, 6):
                    back.append(ms(w.first_event(ETCD_KEY, "PUT", t0), t0))
            crash, crash_back = [], []
            for i in range(self.cfg["etcd_crashes"]):
                sleep_dephased(0.3, 1.0)
                t0 = self.hs.kill()
                if w.wait(lambda s: ETCD_KEY not in s, 8):
                    crash.append(ms(w.first_event(ETCD_KEY, "DELETE", t0), t0))
                t1 = time.monotonic()
                self.hs.restart()
                if w.wait(lambda s: ETCD_KEY in s, 15):
                    crash_back.append(ms(w.first_event(ETCD_KEY, "PUT", t1), t1))
            code, secs = t.stop()
        finally:
            w.stop()
        self.results["detection_etcd"] = {
            "key_gone": summary(gone),
            "key_back": summary(back),
            "flip_ack": summary(ack),
            "kill_to_gone": summary(crash),
            "restart_to_back": summary(crash_back),
            "raw_ms": {"gone": gone, "back": back, "kill": crash},
            "tether_exit": {"code": code, "seconds": round(secs, 2)},
        }
        log("etcd:", json.dumps({k: v for k, v in self.results["detection_etcd"].items() if k != "raw_ms"}))

    def phase_rotation(self) -> None:
        """A real grpc-go client (etcd's own resolver, round_robin, a
        Health/Check every 0.5 ms) over two backends that tether (watch mode)
        registers in etcd. Flip one NOT_SERVING: time until the client sent its
        last call to it (it left the client's rotation); flip it back: time
        until the client sent it its first call again. Also when the
        client's resolver reported the change. Times come from the client's
        own wall clock (Go's time.Now, CLOCK_REALTIME) against the benchmark's
        time.time_ns() taken just before the flip command."""
        if not self.args.go_client:
            raise SystemExit("rotation phase: --go-client is required (scripts/bench.sh builds tests/go/etcdclient)")
        servers = [HealthServer(self.procs, self.args.health_server, 0, [], self.path(f"rotation-server-{i}.log")) for i in range(2)]
        flipped, steady = servers
        a, b = f"127.0.0.1:{flipped.port}", f"127.0.0.1:{steady.port}"
        files = {f"rot-{i}.toml": service_file("rotation", f"rot-{i}", s.port, "", "watch") for i, s in enumerate(servers)}
        t = Tether(self.procs, self.args.tether, self.path("tether-rotation", "x"), "bench-rotation", "etcd", self.etcd.url, files)
        c = GoClient(self.procs, self.args.go_client, self.etcd.url, "services/rotation/", self.path("etcdclient.log"))

        def rotation_is(want: set[str], after_ns: int):
            # Two complete windows in a row, both begun after `after_ns`, answered by exactly `want`.
            def pred(windows, _resolved):
                w = [x for x in windows[-2:] if x["t_ns"] - 20_000_000 > after_ns]
                return len(w) == 2 and all(set(x["served"]) == want for x in w)

            return pred

        out_ms, back_ms, res_out_ms, res_back_ms, missed = [], [], [], [], 0
        try:
            if not c.wait(rotation_is({a, b}, 0), 30):
                raise RuntimeError(f"rotation: the Go client never used both backends; see {self.path('etcdclient.log')}")
            for i in range(self.cfg["rotation_flips"]):
                sleep_dephased(0.05, 0.6)
                t0 = time.time_ns()
                flipped.set("not_serving")
                if not c.wait(rotation_is({b}, t0), 10):
                    missed += 1
                else:
                    with c.cond:
                        lasts = [w["last_ns"][a] for w in c.windows if w["t_ns"] >= t0 and a in w.get("last_ns", {})]
                        res = [r["t_ns"] for r in c.resolved if r["t_ns"] >= t0 and all(x["addr"] != a for x in r["addrs"])]
                    # The last call sent to it after the flip (none: it was out before the first call after t0).
                    out_ms.append(round((max(lasts) - t0) / 1e6, 3) if lasts else 0.0)
                    if res:
                        res_out_ms.append(round((res[0] - t0) / 1e6, 3))
                sleep_dephased(0.05, 0.6)
                t1 = time.time_ns()
                flipped.set("serving")
                if not c.wait(rotation_is({a, b}, t1), 10):
                    missed += 1
                else:
                    with c.cond:
                        firsts = [w["first_ns"][a] for w in c.windows if w["t_ns"] >= t1 and a in w.get("first_ns", {})]
                        res = [r["t_ns"] for r in c.resolved if r["t_ns"] >= t1 and any(x["addr"] == a for x in r["addrs"])]
                    if firsts:
                        back_ms.append(round((min(firsts) - t1) / 1e6, 3))
                    if res:
                        res_back_ms.append(round((res[0] - t1) / 1e6, 3))
                if (i + 1) % 10 == 0:
                    log(f"rotation: {i + 1}/{self.cfg['rotation_flips']} flip cycles")
            with c.cond:
                calls = sum(sum(w["served"].values()) for w in c.windows)
                span = (c.windows[-1]["t_ns"] - c.windows[0]["t_ns"]) / 1e9 if len(c.windows) > 1 else 0
        finally:
            c.stop()
            code, secs = t.stop()
            for s in servers:
                s.stop()
        self.results["rotation_etcd"] = {
            "out_of_rotation": summary(out_ms),
            "back_in_rotation": summary(back_ms),
            "resolver_drops": summary(res_out_ms),
            "resolver_adds": summary(res_back_ms),
            "missed": missed,
            "calls_per_s": round(calls / span, 1) if span else None,
            "raw_ms": {"out": out_ms, "back": back_ms},
            "tether_exit": {"code": code, "seconds": round(secs, 2)},
        }
        log("rotation:", json.dumps({k: v for k, v in self.results["rotation_etcd"].items() if k != "raw_ms"}))

    def fresh_consul(self) -> None:
        """Replace the Consul agent with a new one. Consul before the fix of
        hashicorp/consul#14935 (1.8.7 included) never stops the alias check of
        a service it deregisters: each keeps copying all the agent's checks
        once a minute until the agent restarts. An agent that has seen
        thousands of tether's services come and go (the earlier phases and
        rows) costs several times the CPU of a new one at idle, whoever is
        registered now (bench/alias_cost.py), so rows that measure Consul's
        CPU start from a new agent. Needs the catalog observer stopped."""
        assert self.obs is None, "the catalog observer watches the old agent"
        Procs.stop(self.consul.proc)
        self.consul = Consul(self.procs, os.path.join(self.args.tools, "consul"), self.work)

    def phase_footprint(self) -> None:
        """tether with N services (one server, N health service names): RSS and
        CPU idle and while flipping, registry writes, and the registry's own
        CPU beside Consul running the same checks itself."""
        self.end_latency_setup()
        fp, cost = [], []
        self.results["footprint"], self.results["registry_cost"] = fp, cost
        for n in self.cfg["ns"]:
            hs = HealthServer(self.procs, self.args.health_server, 0, [f"svc-{i}" for i in range(n)], self.path(f"health_server-{n}.log"))
            try:
                for mode in ("watch", "poll"):
                    fp.append(self.tether_footprint(hs, n, mode, "consul"))
                if n in self.cfg["cost_ns"]:
                    for interval in ("1s", "10s"):
                        self.fresh_consul()  # no alias checks leaked by the rows before
                        cost.append(self.consul_own_checks(hs, n, interval))
                if n in self.cfg["etcd_ns"]:
                    fp.append(self.tether_footprint(hs, n, "watch", "etcd"))
            finally:
                hs.stop()

    def tether_footprint(self, hs: HealthServer, n: int, mode: str, backend: str) -> dict:
        log(f"footprint: {n} services, {mode}, {backend}")
        files = {f"fp-{i}.toml": service_file(f"fp-{i}", f"fp-{i}", hs.port, f"svc-{i}", mode) for i in range(n)}
        t0 = time.monotonic()
        t = Tether(self.procs, self.args.tether, self.path(f"tether-{backend}-{n}-{mode}", "x"), f"fp-{backend}", backend, self.url(backend), files)
        try:
            if backend == "consul":
                count = lambda: self.consul.count_status("tether:fp-", "passing")  # noqa: E731
            else:
                count = lambda: self.etcd.count("services/fp-")  # noqa: E731
            wait_until(lambda: t.alive() and count() == n, 180, 0.25, f"{n} services passing ({backend})")
            startup = time.monotonic() - t0
            rss_start = status_kb(t.pid, "VmRSS")
            time.sleep(2)
            pids = {"tether": t.pid, "server": hs.proc.pid, backend: self.consul.pid if backend == "consul" else self.etcd.pid}
            period = METRICS_INTERVAL * self.cfg["flip_intervals"] / 4
            flips = []

            def flip(elapsed: float) -> None:
                k = int(elapsed // period)
                if k >= len(flips) and k < 4:
                    hs.set("not_serving" if k % 2 == 0 else "serving")
                    flips.append(k)

            snapshot = self.tether_check_indexes if backend == "consul" else None
            ws = self.windows(pids, [("idle", self.cfg["idle_intervals"], None), ("flipping", self.cfg["flip_intervals"], flip)], snapshot)
            idle, flipping = ws["idle"], ws["flipping"]
            flipping["flips"] = len(flips)
            if hs.status != "serving":
                hs.set("serving")
            wait_until(lambda: count() == n, 60, 0.25, "all passing again after flipping")
            idle_after_flip_rss = status_kb(t.pid, "VmRSS")
            # One more flip of the whole server, timed until the registry shows
            # all N changed (polled every 100 ms: a coarse figure).
            time.sleep(1.5)
            t1, _ = hs.set("not_serving")
            wait_until(lambda: count() == 0, 90, 0.1, "all N not passing")
            all_critical = time.monotonic() - t1
            time.sleep(1.5)
            t1, _ = hs.set("serving")
            wait_until(lambda: count() == n, 90, 0.1, "all N passing")
            all_passing = time.monotonic() - t1
            code, stop_secs = t.stop()
        finally:
            if t.alive():
                t.stop()
        if backend == "consul":
            wait_until(lambda: self.consul.count_prefix("tether:fp-") == 0, 60, 0.25, "deregistration")
        r = {
            "backend": backend, "n": n, "mode": mode, "interval": "1s",
            "startup_to_all_passing_s": round(startup, 2), "rss_kb_at_all_passing": rss_start,
            "idle": idle, "flipping": flipping, "rss_kb_after_flipping": idle_after_flip_rss,
            "flip_all_to_not_passing_s": round(all_critical, 2), "flip_all_to_passing_s": round(all_passing, 2),
            "shutdown_s": round(stop_secs, 2), "exit_code": code,
        }  # fmt: skip
        log("footprint:", json.dumps(r))
        return r

    def phase_scale(self) -> None:
        """1,000 services on one agent: 10 health servers with 100 names each;
        Consul's own floor for the same writes; one tether per row (1, 100 and
        1,000 services; interval 1 s and 5 s; Consul and etcd): start → all
        passing, idle CPU and RSS, liveness, and a 100-service flip."""
        self.end_latency_setup()
        cfg = self.cfg
        res: dict = {"idle_s": cfg["scale_idle_s"], "flip_reps": cfg["scale_flip_reps"], "rows": []}
        self.results["scale"] = res
        servers: list[HealthServer] = []
        try:
            servers = scale.start_servers(self.procs, self.args.health_server, scale.SERVERS, lambda k: self.path(f"scale-server-{k}.log"))
            if cfg["scale_floor"]:
                log("scale: Consul's own floor")
                self.fresh_consul()
                # Registration alone at 1 and 100 (the plot of start → all passing), then 1,000 in full.
                res["consul_floor_small"] = [scale.consul_registration_floor(self.consul, k) for k in (1, 100)]
                self.fresh_consul()
                res["consul_floor"] = scale.consul_floor(self.consul, 1000, 100, cfg["scale_flip_reps"])
            for backend, n, interval, idle_s in cfg["scale_rows"]:
                if backend == "consul":
                    self.fresh_consul()
                res["rows"].append(self.scale_row(servers, backend, n, interval, idle_s or cfg["scale_idle_s"]))
            if cfg["scale_floor"]:
                # Again at the end, on the agent of the last Consul row, which has
                # seen that row's 1,000 services and their alias checks go (leaked).
                log("scale: Consul's own floor, again")
                res["consul_floor_after"] = scale.consul_floor(self.consul, 1000, 100, cfg["scale_flip_reps"])
        finally:
            for hs in servers:
                hs.stop()

    def scale_row(self, servers: list[HealthServer], backend: str, n: int, interval: str, idle_s: float) -> dict:
        log(f"scale: {n} services, interval {interval}, {backend}")
        files = scale.service_files(servers, n, interval)
        node = f"scale-{backend}-{n}-{interval}"
        watch = None
        t0 = time.monotonic()
        t = Tether(self.procs, self.args.tether, self.path(f"tether-scale-{backend}-{n}-{interval}", "x"), node, backend, self.url(backend), files)
        try:
            if backend == "consul":
                watch = scale.LivenessWatch(self.consul, "tether", f"tether-liveness:{node}")
                done = lambda: scale.consul_all_passing(self.consul, "tether", n)  # noqa: E731
                every = 0.2 if n > 100 else 0.05
            else:
                done = lambda: self.etcd.count("services/sc-") == n  # noqa: E731
                every = 0.05
            wait_until(lambda: t.alive() and done(), 300, every, f"{n} services passing ({backend})")
            startup = time.monotonic() - t0
            rss_start = status_kb(t.pid, "VmRSS")
            time.sleep(3)
            pids = {"tether": t.pid, backend: self.consul.pid if backend == "consul" else self.etcd.pid}
            w = CpuWindow(pids).start()
            time.sleep(idle_s)
            idle = w.stop()
            for pname, pid in pids.items():
                idle[f"{pname}_rss_kb"] = status_kb(pid, "VmRSS")
                idle[f"{pname}_hwm_kb"] = status_kb(pid, "VmHWM")
            log(f"scale: idle: {json.dumps(idle)}")
            flips, backs = [], []
            if n >= scale.PER_SERVER:
                hs = servers[0]
                for r in range(self.cfg["scale_flip_reps"]):
                    time.sleep(1.0)
                    if backend == "consul":
                        regex = "^tether:sc-0-"
                        _, index = scale.consul_state(self.consul, "critical", regex)
                        t1, _ = hs.set("not_serving")
                        seen = scale.consul_wait_count(self.consul, "critical", regex, scale.PER_SERVER, index, 60)
                        flips.append(None if seen is None else round((seen - t1) * 1000, 2))
                        time.sleep(1.0)
                        _, index = scale.consul_state(self.consul, "critical", regex)
                        t1, _ = hs.set("serving")
                        seen = scale.consul_wait_count(self.consul, "critical", regex, 0, index, 60)
                        backs.append(None if seen is None else round((seen - t1) * 1000, 2))
                    else:
                        ew = WatchObserver(self.etcd, "services/sc-0-")
                        try:
                            t1, _ = hs.set("not_serving")
                            if ew.wait(lambda s: len(s) == 0, 60):
                                flips.append(round((max(tt for tt, _, e in ew.events if e == "DELETE" and tt >= t1) - t1) * 1000, 2))
                            time.sleep(1.0)
                            t1, _ = hs.set("serving")
                            if ew.wait(lambda s: len(s) == scale.PER_SERVER, 60):
                                backs.append(round((max(tt for tt, _, e in ew.events if e == "PUT" and tt >= t1) - t1) * 1000, 2))
                        finally:
                            ew.stop()
                    log(f"scale: flip of 100: → not passing {flips[-1] if flips else None} ms, back {backs[-1] if backs else None} ms")
                if hs.status != "serving":
                    hs.set("serving")
                wait_until(done, 60, 0.2, "all passing again after the flips")
            alive_at_end = t.alive()
            code, stop_secs = t.stop()
        finally:
            if watch:
                watch.stop()
            if t.alive():
                t.stop()
        liveness = None
        if backend == "consul":
            wait_until(lambda: self.consul.count_prefix("tether:sc-") == 0, 120, 0.25, "deregistration")
            liveness = {
                "statuses_seen": [s for _, s in watch.seen], "ever_critical": not watch.never_critical(),
                "consul_ttl_expired_log_lines": scale.consul_ttl_expired_lines(self.consul, f"tether-liveness:{node}"),
            }  # fmt: skip
        else:
            wait_until(lambda: self.etcd.count("services/sc-") == 0, 60, 0.25, "keys removed")
        r = {
            "backend": backend, "n": n, "servers": max(1, -(-n // scale.PER_SERVER)), "interval": interval, "mode": "watch",
            "startup_to_all_passing_s": round(startup, 3), "rss_kb_at_all_passing": rss_start, "idle": idle,
            "flip100_to_not_passing_ms": flips, "flip100_back_ms": backs,
            "flip100_to_not_passing_p50_ms": scale.median([x for x in flips if x is not None]),
            "flip100_back_p50_ms": scale.median([x for x in backs if x is not None]),
            "liveness": liveness, "alive_at_end": alive_at_end, "exit_code": code, "shutdown_s": round(stop_secs, 2),
        }  # fmt: skip
        log("scale:", json.dumps(r))
        return r

    def tether_check_indexes(self) -> dict[str, int]:
        """ModifyIndex of every tether check in Consul's catalog: any catalog
        write to one of them (a status or output change) moves it."""
        checks = self.consul.http.json("GET", "/v1/health/state/any")
        return {c["CheckID"]: c["ModifyIndex"] for c in checks if c["CheckID"].startswith("tether")}

    def url(self, backend: str) -> str:
        return self.consul.url if backend == "consul" else self.etcd.url

    def consul_own_checks(self, hs: HealthServer, n: int, interval: str) -> dict:
        """N Consul gRPC checks (one per service name) at `interval`."""
        log(f"registry cost: Consul's own gRPC checks, {n} at {interval}")
        t0 = time.monotonic()
        for i in range(n):
            self.consul.register_grpc(f"cg-{i}", hs.port, f"svc-{i}", interval)
        reg_s = time.monotonic() - t0
        try:
            wait_until(lambda: self.consul.count_status("consul-grpc:cg-", "passing") == n, 120, 0.5, f"{n} Consul checks passing")
            time.sleep(2)
            r = self.window({"consul": self.consul.pid, "server": hs.proc.pid}, self.cfg["idle_intervals"])
        finally:
            for i in range(n):
                self.consul.deregister(f"cg-{i}")
        out = {"registry": "consul", "who": "consul", "n": n, "interval": interval, "register_s": round(reg_s, 2), "window": r}
        log("registry cost:", json.dumps(out))
        return out


def machine_info(args) -> dict:
    def sh(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirty = sh(["git", "-C", root, "status", "--porcelain", "--", "src", "Cargo.toml", "examples"])
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "nproc": sh(["nproc"]),
        "free_m": sh(["free", "-m"]),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "consul_version": sh([os.path.join(args.tools, "consul"), "version"]).splitlines()[0],
        "etcd_version": sh([os.path.join(args.tools, "etcd"), "--version"]).splitlines()[0],
        "python": platform.python_version(),
        "tether_commit": sh(["git", "-C", root, "rev-parse", "--short", "HEAD"]),
        "tether_worktree_dirty": bool(dirty),
        "tether_binary": os.path.abspath(args.tether),
        "command": args.command or " ".join(sys.argv),
        "quick": args.quick,
        "seed": args.seed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tether", required=True)
    ap.add_argument("--health-server", required=True)
    ap.add_argument("--tools", required=True, help="folder with consul and etcd")
    ap.add_argument("--go-client", help="tests/go/etcdclient, built (the rotation phase needs it)")
    ap.add_argument("--go-server", help="tests/go/healthserver, built (the flap phase needs it)")
    ap.add_argument("--plots-python", help="a Python with matplotlib: draw the plots (bench/plots.py) into OUT/img at the end")
    ap.add_argument("--flap-seconds", type=float, help="flap phase: how long the service is toggled (default 20) and the quiet window before")
    ap.add_argument("--out", required=True, help="folder for results.json, report.md and logs")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 flips, 10 and 100 services, short windows")
    ap.add_argument("--flips", type=int, help="flip cycles (NOT_SERVING then SERVING) against Consul and etcd")
    ap.add_argument("--services", help="comma-separated service counts for the footprint (default 10,100,1000; quick 10,100)")
    ap.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--scale-rows", help="comma-separated subset of the scale phase's rows as BACKEND:N:INTERVAL "
                    "(e.g. consul:1:1s,consul:1000:1s); default all eight")
    ap.add_argument("--no-floor", action="store_true", help="scale phase: skip Consul's own floor (quicker, for one row)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder (configs, logs)")
    ap.add_argument("--command", help="the command line to record in the report")
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.flips:
        cfg["flips"] = cfg["etcd_flips"] = cfg["rotation_flips"] = cfg["cross_flips"] = args.flips
    if args.flap_seconds:
        cfg["flap_s"] = cfg["flap_quiet_s"] = args.flap_seconds
    if args.services:
        cfg["ns"] = [int(x) for x in args.services.split(",")]
        cfg["cost_ns"] = [n for n in cfg["ns"] if n >= 100]
        cfg["etcd_ns"] = [n for n in cfg["ns"] if n >= 100]
    if args.scale_rows:
        want = args.scale_rows.split(",")
        known = {f"{b}:{n}:{i}": (b, n, i, w) for b, n, i, w in SCALE_ROWS}
        if set(want) - set(known):
            ap.error(f"unknown scale rows: {', '.join(sorted(set(want) - set(known)))} (known: {', '.join(known)})")
        cfg["scale_rows"] = [known[r] for r in want]
    cfg["scale_floor"] = not args.no_floor
    unknown = set(args.phases.split(",")) - set(PHASES) if args.phases else set()
    if unknown:
        ap.error(f"unknown phases: {', '.join(sorted(unknown))} (known: {', '.join(PHASES)})")
    random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    def on_term(signum, _frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.signal(signal.SIGINT, on_term)
    bench = Bench(args, cfg)
    t0 = time.monotonic()
    ok = False
    try:
        bench.run()
        ok = True
    finally:
        bench.procs.stop_all()
        res = bench.results
        res.setdefault("meta", {})["total_s"] = round(time.monotonic() - t0, 1)
        res["meta"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        res["meta"]["complete"] = ok
        logs = os.path.join(args.out, "logs")
        shutil.rmtree(logs, ignore_errors=True)
        shutil.copytree(bench.work, logs, ignore=shutil.ignore_patterns("etcd-data", "*.toml", "services.d"), dirs_exist_ok=True)
        if not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
        if ok:
            with open(os.path.join(args.out, "report.md"), "w") as f:
                f.write(report.render(res))
            log(f"done in {res['meta']['total_s']} s: {args.out}/report.md, {args.out}/results.json")
        else:
            log(f"incomplete run; partial results in {args.out}/results.json")
        if args.plots_python:
            # The plots, from results.json alone (bench/plots.py; matplotlib in the venv of
            # scripts/install-deps.sh): of what the run has, complete or not.
            plots = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots.py")
            img = os.path.join(args.out, "img")
            try:
                r = subprocess.run([args.plots_python, plots, args.out, img], capture_output=True, text=True, timeout=300)
                drawn = r.stdout.split()
                log(f"plots: {', '.join(drawn) or 'none'}" + (f" (exit {r.returncode}: {r.stderr.strip()[-500:]})" if r.returncode else ""))
            except (OSError, subprocess.TimeoutExpired) as e:
                log(f"plots: not drawn: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
