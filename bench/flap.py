"""The `flap` phase of bench/run.py: a flapping service with flap damping on
and off (issue 21), against real Consul and real etcd.

Per row: one tether (watch mode, interval 1 s, ttl 15 s) with two services,
`flappy` and `steady`, each on its own grpc-go server (tests/go/healthserver,
grpc-go's own health service, driven over stdin like examples/health_server).
After a quiet window (both SERVING), `flappy` is toggled SERVING/NOT_SERVING
every 25 ms for 20 s (about 800 transitions, ending SERVING); half-way, the
steady neighbour is flipped NOT_SERVING and back, and timed. Three settings
of tether's `[damping]` (tether.toml):

- `default`: damping on with its defaults (8 transitions in 30 s start an
  episode; hold 10 s; write budget 30/min, burst 10);
- `budget`: `enabled = false`, so no detection and no hold, but the write
  budget is still on;
- `off`: `enabled = false, writes_per_minute = 0`: every change is written.

What is measured over the 20 s of flapping (and the quiet window before, for
comparison):

- consumer wake-ups: Consul, a blocking query on
  `/v1/health/service/flappy?index=N&wait=30s` (as clients and
  consul-template run it), counting answers whose X-Consul-Index moved; etcd,
  `etcdctl watch services/flappy/flappy-1`, counting PUT/DELETE events. Each
  with its time (s since the toggling began) and whether the service was in
  the passing set, for the plot;
- registry operations tether made: the delta of its
  `tether_registry_operations_total{op}` (/metrics), writes apart from
  heartbeats and anti-entropy listings;
- CPU of the registry (the Consul dev agent, a new one per Consul row; etcd)
  and of tether: utime + stime from /proc/PID/stat (and schedstat);
- tether's log lines at info level (RUST_LOG=info, the default);
- when the flapping service is back in the passing set after the toggling
  stopped, and how long the neighbour's flip took to reach a consumer.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

from common import CpuWindow, Http, Poller, Procs, free_port, log, wait_until
from services import HealthServer, Tether, service_file

# (key, label, [damping] table in tether.toml)
SETTINGS = [
    ("default", "damping on (defaults)", ""),
    ("budget", "`enabled = false` (write budget on: 30/min, burst 10)", "\n[damping]\nenabled = false\n"),
    ("off", "`enabled = false, writes_per_minute = 0` (everything off)", "\n[damping]\nenabled = false\nwrites_per_minute = 0\n"),
]
EVERY = 0.025  # s between toggles
FLAPPY, STEADY = "flappy-1", "steady-1"
ETCD_KEYS = {FLAPPY: "services/flappy/flappy-1", STEADY: "services/steady/steady-1"}
# Registry operations that are not a service's writes.
NOT_WRITES = {"heartbeat", "list"}


# --- consumers -----------------------------------------------------------------


class Wakes:
    """A consumer's wake-ups, `(monotonic time, passing)`, under `cond`."""

    wakes: list[tuple[float, bool]]
    cond: threading.Condition

    def wait(self, passing: bool, after: float, timeout: float) -> float | None:
        """When the first wake-up at or after `after` showed `passing`; None after `timeout`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, p in self.wakes:
                    if t >= after and p == passing:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


class ConsulConsumer(Wakes, Poller):
    """A blocking query on /v1/health/service/NAME, as a client runs it: every
    answer whose X-Consul-Index moved is a wake-up, recorded (monotonic time,
    passing) where passing = some instance has all its checks passing."""

    def __init__(self, consul, name: str) -> None:
        self.http = Http(consul.port, timeout=45)
        self.name = name
        self.wakes: list[tuple[float, bool]] = []
        self.answers = 0
        self.passing: bool | None = None
        self.cond = threading.Condition()
        self.index = 0
        self._poll()  # the first answer (index 0) is not a wake-up
        self._start(name)

    def _poll(self) -> None:
        q = f"?index={self.index}&wait=30s" if self.index else ""
        status, headers, data = self.http.request("GET", f"/v1/health/service/{self.name}{q}", timeout=45)
        t = time.monotonic()
        if status != 200:
            raise RuntimeError(f"health/service/{self.name}: HTTP {status}")
        idx = int(headers.get("x-consul-index", "0"))
        entries = json.loads(data)
        passing = any(all(c["Status"] == "passing" for c in e["Checks"]) for e in entries)
        with self.cond:
            self.answers += 1
            if self.index and idx != self.index:
                self.wakes.append((t, passing))
            self.index = idx if idx > 0 else self.index
            self.passing = passing
            self.cond.notify_all()


class EtcdConsumer(Wakes):
    """`etcdctl watch KEY`, as grpc-go's resolver watches: every PUT (passing)
    or DELETE event, recorded with its monotonic time."""

    def __init__(self, procs: Procs, etcdctl: str, url: str, key: str, log_path: str) -> None:
        argv = [etcdctl, f"--endpoints={url}", "watch", key]
        self.proc = procs.start(f"etcdctl watch {key}", argv, stdout=subprocess.PIPE, stderr=open(log_path, "ab"),
                                env=dict(os.environ, ETCDCTL_API="3"), bufsize=0)  # fmt: skip
        self.wakes: list[tuple[float, bool]] = []
        self.errors: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, name=f"etcdctl-{key}", daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.strip()
            if line in (b"PUT", b"DELETE"):
                with self.cond:
                    self.wakes.append((time.monotonic(), line == b"PUT"))
                    self.cond.notify_all()

    @property
    def answers(self) -> int:
        return len(self.wakes)

    @property
    def passing(self) -> bool:
        """The key is there (it was when the watch started)."""
        with self.cond:
            return self.wakes[-1][1] if self.wakes else True

    def stop(self) -> None:
        Procs.stop(self.proc, timeout=5)


# --- tether's /metrics and log ---------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """tether's /metrics as {'name{labels}': value} (counters and gauges)."""
    http = Http(port, timeout=5)
    try:
        status, _, data = http.request("GET", "/metrics")
    finally:
        http.close()
    if status != 200:
        raise RuntimeError(f"tether /metrics: HTTP {status}")
    out = {}
    for line in data.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            try:
                out[key] = float(val)
            except ValueError:
                pass
    return out


def label(key: str, name: str) -> str | None:
    """The value of label `name` in a metrics key `metric{a="x",b="y"}`."""
    if "{" not in key:
        return None
    for part in key[key.index("{") + 1 : key.rindex("}")].split(","):
        k, _, v = part.partition("=")
        if k == name:
            return v.strip('"')
    return None


def delta(m0: dict, m1: dict, metric: str, by: str | None = None, where: dict | None = None) -> dict[str, int] | int:
    """Increase of `metric` between two scrapes, summed, or by label `by`;
    only series whose labels match `where`."""
    out: dict[str, int] = {}
    for key, v in m1.items():
        if key.split("{", 1)[0] != metric:
            continue
        if where and any(label(key, k) != want for k, want in where.items()):
            continue
        d = int(round(v - m0.get(key, 0.0)))
        k = label(key, by) if by else ""
        out[k] = out.get(k, 0) + d
    return out if by else out.get("", 0)


def ops(m0: dict, m1: dict) -> dict:
    by_op = {k: v for k, v in delta(m0, m1, "tether_registry_operations_total", "op").items() if v}
    return {"by_op": by_op, "writes": sum(v for k, v in by_op.items() if k not in NOT_WRITES)}


def log_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# --- one row ---------------------------------------------------------------------


def toggle(server: HealthServer, seconds: float, sent: list) -> None:
    """SERVING/NOT_SERVING every EVERY s for `seconds`, ending SERVING; the
    count of commands goes to sent[0], when the last was sent to sent[1]."""
    start = time.monotonic()
    serving = True
    while time.monotonic() - start < seconds:
        serving = not serving
        sent[1], _ = server.set("serving" if serving else "not_serving")
        sent[0] += 1
        time.sleep(EVERY)
    if not serving:
        sent[1], _ = server.set("serving")
        sent[0] += 1


def row(procs: Procs, args, cfg: dict, path, backend: str, setting: tuple[str, str, str], registry) -> dict:
    key, what, table = setting
    flap_s, quiet_s = cfg["flap_s"], cfg["flap_quiet_s"]
    log(f"flap: {backend}, {key}: {what}")
    tag = f"flap-{backend}-{key}"
    servers: list[HealthServer] = []
    consumers: dict[str, object] = {}
    t = None
    try:
        for name in ("flappy", "steady"):
            servers.append(HealthServer(procs, args.go_server, 0, [], path(f"{tag}-{name}-server.log")))
        flappy, steady = servers
        files = {f"{n}.toml": service_file(n, f"{n}-1", s.port, "", "watch") for n, s in (("flappy", flappy), ("steady", steady))}
        port = free_port()
        url = registry.url
        t = Tether(procs, args.tether, path(f"tether-{tag}", "x"), tag, backend, url, files, listen=f"127.0.0.1:{port}", extra_config=table)
        if backend == "consul":
            present = lambda sid: registry.count_status(f"tether:{sid}", "passing") == 1  # noqa: E731
        else:
            present = lambda sid: registry.count(ETCD_KEYS[sid]) == 1  # noqa: E731
        wait_until(lambda: t.alive() and present(FLAPPY) and present(STEADY), 60, 0.1, f"{backend}: both services passing")
        wait_until(lambda: scrape(port), 10, 0.1, "tether's /metrics")
        for sid in (FLAPPY, STEADY):
            if backend == "consul":
                consumers[sid] = ConsulConsumer(registry, sid.rsplit("-", 1)[0])
            else:
                consumers[sid] = EtcdConsumer(procs, os.path.join(args.tools, "etcdctl"), url, ETCD_KEYS[sid], path(f"{tag}-etcdctl.log"))
        time.sleep(2)
        pids = {"tether": t.pid, "registry": registry.pid, "server": flappy.proc.pid}

        def window(during=None) -> dict:
            m0, lines0, w = scrape(port), log_lines(t.log_path), CpuWindow(pids).start()
            t0 = time.monotonic()
            extra = during(t0) if during else {}
            out = w.stop()
            m1 = scrape(port)
            out.update({
                "t0": t0, "t1": time.monotonic(), "ops": ops(m0, m1), "log_lines": log_lines(t.log_path) - lines0,
                "transitions": delta(m0, m1, "tether_service_transitions_total", where={"service": FLAPPY}),
                "episodes": delta(m0, m1, "tether_flap_episodes_total", where={"service": FLAPPY}),
                "suppressed": delta(m0, m1, "tether_flap_suppressed_total", where={"service": FLAPPY}),
                "budget_waits": delta(m0, m1, "tether_write_budget_waits_total", where={"service": FLAPPY}),
                "m1": m1, **extra,
            })  # fmt: skip
            for name, c in consumers.items():
                out[f"wakes_{name}"] = sum(1 for tt, _ in c.wakes if t0 <= tt <= out["t1"])
            for k, v in list(out.items()):
                if k.startswith("registry_"):
                    out[k.replace("registry_", f"{backend}_", 1)] = v
            return out

        quiet = window(lambda _t0: time.sleep(quiet_s) or {})

        def flapping(t0: float) -> dict:
            sent = [0, None]
            th = threading.Thread(target=toggle, args=(flappy, flap_s, sent), name="toggle", daemon=True)
            th.start()
            time.sleep(flap_s / 2)
            # The steady neighbour, half-way: flipped NOT_SERVING and back.
            n0, _ = steady.set("not_serving")
            seen = consumers[STEADY].wait(False, n0, 10)
            time.sleep(0.5)
            n1, _ = steady.set("serving")
            back = consumers[STEADY].wait(True, n1, 10)
            th.join(flap_s + 30)
            return {
                "toggles_sent": sent[0], "last_toggle": sent[1],
                "neighbour_to_critical_ms": None if seen is None else round((seen - n0) * 1000, 2),
                "neighbour_back_ms": None if back is None else round((back - n1) * 1000, 2),
            }

        flap = window(flapping)
        end = flap.pop("last_toggle")  # the last command (SERVING) sent
        c = consumers[FLAPPY]
        # Back in the passing set after the toggling stopped (damped: after the hold).
        wait_until(lambda: c.passing, cfg["flap_back_s"], 0.05, "the flapping service back in the passing set")
        with c.cond:
            k = len(c.wakes)
            while k > 0 and c.wakes[k - 1][1]:
                k -= 1
            t_back = c.wakes[k][0] if k < len(c.wakes) else None
        time.sleep(1.0)
        m2 = scrape(port)
        after = {
            "back_after_s": None if t_back is None else round(t_back - end, 3),
            "ops": ops(flap["m1"], m2),
            "wakes": sum(1 for tt, _ in c.wakes if tt > flap["t1"]),
            "log_lines_total": log_lines(t.log_path),
        }
        t0 = flap["t0"]
        res = {
            "backend": backend, "setting": key, "what": what, "damping_table": table.strip(),
            "flap_s": flap_s, "quiet_s": quiet_s, "every_ms": EVERY * 1000,
            "quiet": {k: v for k, v in quiet.items() if k not in ("m1", "t0", "t1")},
            "flapping": {k: v for k, v in flap.items() if k not in ("m1", "t0", "t1")},
            "after": after,
            # Wake-ups of the flapping service's consumer from the quiet window on,
            # in s since the toggling began, with whether it was passing.
            "wakes_s": [[round(tt - t0, 4), p] for tt, p in c.wakes if tt >= quiet["t0"]],
            "neighbour_wakes_s": [[round(tt - t0, 4), p] for tt, p in consumers[STEADY].wakes if tt >= quiet["t0"]],
            "consumer_answers": c.answers,
            "consumer_errors": getattr(c, "errors", [])[-5:],
            "log_tail": tail(t.log_path, 12),
        }  # fmt: skip
        code, secs = t.stop()
        res["tether_exit"] = {"code": code, "seconds": round(secs, 2)}
        f = res["flapping"]
        log(f"flap: {backend} {key}: {f['wakes_' + FLAPPY]} wake-ups in {flap_s} s, {f['ops']['writes']} writes, "
            f"{backend} CPU {f.get('registry_cpu_pct')} %, tether CPU {f.get('tether_cpu_pct')} %, {f['log_lines']} log lines, "
            f"neighbour {f.get('neighbour_to_critical_ms')} ms, back {after['back_after_s']} s after")  # fmt: skip
        return res
    finally:
        for cons in consumers.values():
            cons.stop()
        if t is not None and t.alive():
            t.stop()
        for s in servers:
            s.stop()


def tail(path: str, n: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-n:]]
    except OSError:
        return []


def run(procs: Procs, args, cfg: dict, path, fresh_consul, etcd) -> dict:
    """The phase: `fresh_consul()` gives a new Consul dev agent (one per
    Consul row, so no row pays for another's leaked alias checks); `etcd` is
    the run's etcd."""
    if not args.go_server:
        raise SystemExit("flap phase: --go-server is required (scripts/bench.sh builds tests/go/healthserver)")
    res: dict = {"flap_s": cfg["flap_s"], "quiet_s": cfg["flap_quiet_s"], "every_ms": EVERY * 1000, "rows": []}
    for backend in ("consul", "etcd"):
        for setting in SETTINGS:
            registry = fresh_consul() if backend == "consul" else etcd
            res["rows"].append(row(procs, args, cfg, path, backend, setting, registry))
    return res


# --- report ------------------------------------------------------------------------


def _f(x, nd=1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def back(x) -> str:
    """When the flapping service was back in the passing set, s after the last
    toggle; negative: the registry already had it passing before then (the
    write budget held back the last changes, and the last one written was
    passing)."""
    if x is None:
        return "–"
    return f"{x:.2f}" if x >= 0 else f"in since {-x:.2f} s before"


def render(res: dict) -> str:
    """The Markdown section of report.md for the flap phase."""
    fl = res["flap"]
    out = [f"\n### Flapping service: damping on and off ({fl['flap_s']:g} s of toggling every {fl['every_ms']:g} ms)\n\n"]
    out.append(
        "One tether (watch mode, interval 1 s) with two services on two grpc-go servers (tests/go/healthserver); "
        f"`flappy` toggled SERVING/NOT_SERVING every {fl['every_ms']:g} ms for {fl['flap_s']:g} s (ending SERVING), "
        "`steady` flipped NOT_SERVING and back half-way. Consumer: Consul, a blocking query on `/v1/health/service/flappy` "
        "(wake-ups = answers with a new X-Consul-Index); etcd, `etcdctl watch` of the key (PUT/DELETE events). "
        "Registry writes: tether's `tether_registry_operations_total` (heartbeats and anti-entropy listings apart). "
        "CPU: utime+stime from /proc/PID/stat over the toggling, % of one core (a new Consul dev agent per Consul row). "
        f"Log lines: tether's at info level over the toggling. In parentheses: the {fl['quiet_s']:g} s quiet window before it.\n\n"
    )
    head = ["registry", "setting", "toggles sent", "transitions tether saw", "consumer wake-ups", "registry writes",
            "registry CPU (%)", "tether CPU (%)", "log lines", "back in passing after the toggling (s)", "neighbour → critical (ms)"]  # fmt: skip
    rows = []
    for r in fl["rows"]:
        f, q = r["flapping"], r["quiet"]
        reg = r["backend"]
        rows.append([
            "Consul" if reg == "consul" else "etcd", r["what"], f.get("toggles_sent"), f.get("transitions"),
            f"{f['wakes_' + FLAPPY]} ({q['wakes_' + FLAPPY]})", f"{f['ops']['writes']} ({q['ops']['writes']})",
            f"{_f(f.get(reg + '_cpu_pct'), 2)} ({_f(q.get(reg + '_cpu_pct'), 2)})",
            f"{_f(f.get('tether_cpu_pct'), 2)} ({_f(q.get('tether_cpu_pct'), 2)})",
            f"{f['log_lines']} ({q['log_lines']})", back(r["after"].get("back_after_s")), _f(f.get("neighbour_to_critical_ms"), 1),
        ])  # fmt: skip
    out.append("| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|\n")
    out.append("".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows))
    out.append("\nRegistry operations by kind during the toggling:\n\n")
    for r in fl["rows"]:
        by = r["flapping"]["ops"]["by_op"]
        out.append(f"- {r['backend']}, {r['setting']}: " + (", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none") + "\n")
    return "".join(out)


def target_rows(res: dict, verdict) -> list[list[str]]:
    """Targets: with damping on (defaults), a consumer of a service flapping
    for 20 s wakes at most 20 times (tests/damping's bound)."""
    fl = res.get("flap")
    if not fl:
        return []
    rows = []
    for r in fl["rows"]:
        if r["setting"] != "default":
            continue
        n = r["flapping"]["wakes_" + FLAPPY]
        off = next((x["flapping"]["wakes_" + FLAPPY] for x in fl["rows"] if x["backend"] == r["backend"] and x["setting"] == "off"), None)
        reg = "Consul blocking query" if r["backend"] == "consul" else "etcd watch"
        rows.append([f"flapping service ({r['flapping'].get('toggles_sent')} toggles in {fl['flap_s']:g} s): consumer wake-ups ≤ 20 with damping ({reg})",
                     f"{n}" + ("" if off is None else f" (damping and budget off: {off})"), verdict(n <= 20)])  # fmt: skip
    return rows
