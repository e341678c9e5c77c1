"""The scale phase ("1,000 services on one agent"): one tether with 1,000
service files over 10 health servers, Consul's own floor for the same writes,
the single-service footprint. Python 3.11 standard library only."""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
import urllib.parse

from common import CpuWindow, Http, log, wait_until
from services import HealthServer, service_file

SERVERS, PER_SERVER = 10, 100
# Consul's idle window with the floor's registrations: two of its alias checks'
# once-a-minute refreshes (bench/alias_cost.py).
FLOOR_IDLE_S = 120


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def svc_name(server: int, i: int) -> str:
    return f"sc-{server}-{i}"


def placed(n: int):
    """(j, server index, service name) of each of n services, PER_SERVER to a server."""
    for j in range(n):
        k, i = divmod(j, PER_SERVER)
        yield j, k, svc_name(k, i)


def start_servers(procs, binary: str, count: int, log_path) -> list[HealthServer]:
    """`count` health servers, server k serving its PER_SERVER names; `log_path(k)`."""
    servers: list[HealthServer] = []
    try:
        for k in range(count):
            servers.append(HealthServer(procs, binary, 0, [svc_name(k, i) for i in range(PER_SERVER)], log_path(k)))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def service_files(servers: list[HealthServer], n: int, interval: str) -> dict[str, str]:
    """tether's service files for n services over `servers` (watch mode, ttl 15 s)."""
    return {
        f"{name}.toml": service_file(name, name, servers[k].port, name, "watch", interval=interval, ttl="15s") for _, k, name in placed(n)
    }


def consul_state(consul, state: str, regex: str, index: int = 0, wait: str = "10s", http: Http | None = None) -> tuple[list, int]:
    """/v1/health/state/<state> filtered on CheckID (a blocking query when
    index > 0); (checks, X-Consul-Index)."""
    q = urllib.parse.urlencode({"filter": f'CheckID matches "{regex}"', **({"index": index, "wait": wait} if index else {})})
    status, headers, data = (http or consul.http).request("GET", f"/v1/health/state/{state}?{q}", timeout=40)
    if status != 200:
        raise RuntimeError(f"health/state/{state}: HTTP {status}: {data[:200]!r}")
    return json.loads(data), int(headers.get("x-consul-index", "0"))


def consul_wait_count(consul, state: str, regex: str, want: int, index: int, timeout: float) -> float | None:
    """Blocking queries from `index` until exactly `want` checks matching
    `regex` are in `state`; when that answer was read (monotonic), or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checks, idx = consul_state(consul, state, regex, index, "5s")
        t = time.monotonic()
        if len(checks) == want:
            return t
        index = idx if idx > index else 0
    return None


def consul_all_passing(consul, prefix: str, n: int) -> bool:
    """All n services passing in the catalog: the alias check of each
    (`<prefix>-alive:<id>`) passing, and no health check (`<prefix>:<id>`,
    there only while a service is not passing)."""
    checks, _ = consul_state(consul, "any", f"^{prefix}(-alive)?:sc-")
    alive = sum(1 for c in checks if c["CheckID"].startswith(f"{prefix}-alive:") and c["Status"] == "passing")
    return alive == n and not any(c["CheckID"].startswith(f"{prefix}:") for c in checks)


class LivenessWatch:
    """Blocking queries on /v1/health/checks/<service>: every status the
    liveness check `check_id` was seen in (a thread; tiny answers)."""

    def __init__(self, consul, service: str, check_id: str) -> None:
        self.consul, self.service, self.check_id = consul, service, check_id
        self.http = Http(consul.port, timeout=40)
        self.seen: list[tuple[float, str]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="liveness-watch")
        self.thread.start()

    def _run(self) -> None:
        index = 0
        while not self.stopping:
            try:
                q = f"?index={index}&wait=10s" if index else ""
                status, headers, data = self.http.request("GET", f"/v1/health/checks/{self.service}{q}", timeout=40)
                if status == 200:
                    for c in json.loads(data):
                        if c["CheckID"] == self.check_id and (not self.seen or self.seen[-1][1] != c["Status"]):
                            self.seen.append((time.monotonic(), c["Status"]))
                    idx = int(headers.get("x-consul-index", "0"))
                    index = idx if idx > index else 0
            except Exception:  # noqa: BLE001 - keep watching
                if self.stopping:
                    return
                time.sleep(0.1)

    def never_critical(self) -> bool:
        return all(s == "passing" for _, s in self.seen)

    def stop(self) -> None:
        self.stopping = True
        self.http.abort()
        self.thread.join(5)


def consul_ttl_expired_lines(consul, check_id: str) -> int:
    """Consul's own log lines about `check_id`'s TTL expiring (log level warn)."""
    try:
        with open(consul.log_path, errors="replace") as f:
            return sum(1 for line in f if "TTL expired" in line and check_id in line)
    except OSError:
        return -1


def floor_notes(sid: str, port: int) -> str:
    return f"grpc.health.v1 watch of 127.0.0.1:{port} service {sid!r} by the benchmark"


def floor_registration(sid: str, port: int, live: str) -> dict:
    """The same shape as tether's registration of a passing service
    (src/registry/consul/mod.rs): an alias of a liveness service only."""
    return {
        "ID": sid, "Name": sid, "Address": "127.0.0.1", "Port": port, "Tags": [],
        "Meta": {"managed-by": "bench-floor", "tether-node": "floor"},
        "Checks": [
            {"CheckID": f"floor-alive:{sid}", "Name": "agent alive (floor)", "Notes": floor_notes(sid, port), "Status": "passing",
             "AliasService": live, "DeregisterCriticalServiceAfter": "1m0s"},
        ],
    }  # fmt: skip


def floor_critical_check(sid: str, port: int) -> dict:
    """What tether adds to a service that turns critical: a critical TTL check."""
    return {
        "ID": f"floor:{sid}", "Name": "gRPC health (floor)", "ServiceID": sid, "Notes": floor_notes(sid, port),
        "TTL": "24h0m0s", "Status": "critical", "DeregisterCriticalServiceAfter": "1m0s",
    }  # fmt: skip


@contextlib.contextmanager
def floor_registrations(consul, n: int, poll: float):
    """n registrations as tether makes them (and the one liveness service
    their alias checks follow), PUT sequentially on one keep-alive
    connection and timed until the catalog shows all n passing (polled every
    `poll` s). Yields (ids, seconds of PUTs, seconds to all passing); all
    are deregistered afterwards."""
    h = consul.http
    live = "floor-live"
    live_reg = {"ID": live, "Name": "floor-live", "Checks": [{"CheckID": "floor-liveness", "Name": "liveness", "TTL": "10m", "Status": "passing"}]}
    h.json("PUT", "/v1/agent/service/register?replace-existing-checks=true", live_reg)
    ids = [f"sc-f-{i}" for i in range(n)]
    try:
        t0 = time.monotonic()
        for sid in ids:
            h.json("PUT", "/v1/agent/service/register?replace-existing-checks=true", floor_registration(sid, 50000, live))
        t_put = time.monotonic() - t0
        wait_until(lambda: consul_all_passing(consul, "floor", n), 120, poll, f"floor: {n} passing")
        t_all = time.monotonic() - t0
        log(f"floor: {n} registrations PUT in {t_put:.3f} s, all passing in the catalog after {t_all:.3f} s")
        yield ids, t_put, t_all
    finally:
        for sid in ids:
            h.request("PUT", f"/v1/agent/service/deregister/{sid}")
        h.request("PUT", f"/v1/agent/service/deregister/{live}")


def consul_registration_floor(consul, n: int) -> dict:
    """Consul's floor for registering n services alone (no idle window, no
    flips; for the small counts beside consul_floor's 1,000)."""
    with floor_registrations(consul, n, 0.01) as (_, t_put, t_all):
        return {"n": n, "register_put_s": round(t_put, 4), "register_to_all_passing_s": round(t_all, 4)}


def consul_floor(consul, n: int, updates: int, reps: int) -> dict:
    """Consul's own floor: n registrations ([floor_registrations]), Consul
    idle with them, then `updates` services flipped critical and back by the
    write tether makes for it (a critical check registered, then
    deregistered), timed by the PUTs and until the catalog shows them."""
    h = consul.http
    with floor_registrations(consul, n, 0.1) as (ids, t_put, t_all):
        # Consul with these n registrations and nothing else running: its own
        # periodic cost (each alias check re-reads all checks once a minute).
        idle = CpuWindow({"consul": consul.pid}).start()
        time.sleep(FLOOR_IDLE_S)
        idle = idle.stop()
        log(f"floor: Consul idle with {n} registrations, nothing else running: {idle['consul_cpu_pct']} % over {idle['seconds']} s")
        upd_put, upd_seen = [], []
        targets = ids[:updates]
        for r in range(2 * reps):
            status = "critical" if r % 2 == 0 else "passing"
            time.sleep(1.0)
            _, index = consul_state(consul, "critical", "^floor:sc-f-")
            t0 = time.monotonic()
            for sid in targets:
                if status == "critical":
                    h.json("PUT", "/v1/agent/check/register", floor_critical_check(sid, 50000))
                else:
                    h.json("PUT", f"/v1/agent/check/deregister/floor:{sid}")
            t1 = time.monotonic()
            seen = consul_wait_count(consul, "critical", "^floor:sc-f-", updates if status == "critical" else 0, index, 60)
            if status == "critical":  # the flip direction the target is about
                upd_put.append(round(t1 - t0, 4))
                upd_seen.append(None if seen is None else round(seen - t0, 4))
            log(f"floor: {updates} services → {status}: PUTs {t1 - t0:.3f} s, catalog {None if seen is None else round(seen - t0, 3)} s")
        return {
            "n": n, "register_put_s": round(t_put, 3), "register_to_all_passing_s": round(t_all, 3), "idle": idle,
            "updates": updates, "update_put_s": upd_put, "update_to_catalog_s": upd_seen,
            "update_put_p50_s": median(upd_put), "update_to_catalog_p50_s": median([x for x in upd_seen if x is not None]),
        }  # fmt: skip
