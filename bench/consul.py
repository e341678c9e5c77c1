"""A Consul dev agent on free loopback ports, and ways to watch it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

from common import Http, Procs, free_port, log, wait_until

# Consul's in-memory metrics sink aggregates into 10 s intervals aligned on the
# wall clock; GET /v1/agent/metrics shows the last complete one.
METRICS_INTERVAL = 10


class Consul:
    def __init__(self, procs: Procs, binary: str, workdir: str) -> None:
        self.port = free_port()
        ports = [free_port() for _ in range(3)]
        self.log_path = os.path.join(workdir, "consul.log")
        argv = [
            binary, "agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1",
            f"-http-port={self.port}", "-dns-port=-1", "-grpc-port=-1",
            f"-serf-lan-port={ports[0]}", f"-serf-wan-port={ports[1]}", f"-server-port={ports[2]}",
            "-node=bench", "-log-level=warn",
        ]  # fmt: skip
        self.proc = procs.start("consul", argv, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = Http(self.port)

        def leader():
            if self.proc.poll() is not None:
                raise SystemExit(f"consul exited early; see {self.log_path}")
            return ":" in str(self.http.json("GET", "/v1/status/leader"))

        wait_until(leader, 30, 0.1, "Consul's leader")
        log(f"consul: {self.url} (pid {self.proc.pid})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def checks(self) -> dict:
        """The agent's local view: CheckID -> check."""
        return self.http.json("GET", "/v1/agent/checks")

    def statuses(self) -> dict[str, str]:
        """CheckID -> status, with tether's health of each service as `tether:<id>` (see tether_view)."""
        return tether_view({k: c["Status"] for k, c in self.checks().items()})

    def count_status(self, prefix: str, status: str) -> int:
        return sum(1 for k, s in self.statuses().items() if k.startswith(prefix) and s == status)

    def count_prefix(self, prefix: str) -> int:
        return sum(1 for k in self.statuses() if k.startswith(prefix))

    # Consul's own gRPC checks ---------------------------------------------------

    def register_grpc(self, sid: str, port: int, grpc_service: str, interval: str, check_id: str | None = None) -> None:
        target = f"127.0.0.1:{port}" + (f"/{grpc_service}" if grpc_service else "")
        body = {
            "ID": sid, "Name": sid, "Port": port,
            "Check": {"CheckID": check_id or f"consul-grpc:{sid}", "Name": "grpc", "GRPC": target, "Interval": interval, "Timeout": "1s"},
        }  # fmt: skip
        status, _, data = self.http.request("PUT", "/v1/agent/service/register", body)
        if status != 200:
            raise RuntimeError(f"registering {sid}: HTTP {status}: {data[:200]!r}")

    def deregister(self, sid: str) -> None:
        self.http.request("PUT", f"/v1/agent/service/deregister/{sid}")


def tether_view(statuses: dict[str, str]) -> dict[str, str]:
    """CheckID -> status, plus `tether:<id>` for every service tether
    registered: tether adds that health check only while the service is not
    passing, so where it is absent the service's health is its alias check's
    (`tether-alive:<id>`, passing while tether lives)."""
    view = dict(statuses)
    for cid, status in statuses.items():
        if cid.startswith("tether-alive:"):
            view.setdefault("tether:" + cid[len("tether-alive:"):], status)
    return view


def writes_of(counts: dict[str, int]) -> dict[str, int]:
    """The state-changing HTTP requests (PUT/POST/DELETE) among Consul's samples."""
    return {k[len("consul.http."):]: v for k, v in counts.items() if k.split(".")[2] in ("PUT", "POST", "DELETE")}


class CatalogObserver:
    """Blocking queries on /v1/health/state/any: every change of any check in
    Consul's catalog, time-stamped (time.monotonic) when the answer arrives.
    tether's services appear as `tether:<id>` (see tether_view).

    Event-driven: Consul answers a blocking query as soon as the catalog's
    check index moves, so the resolution is one loopback HTTP round trip plus
    decoding, not a polling period (see the calibration in the report).
    """

    def __init__(self, consul: Consul) -> None:
        self.http = Http(consul.port, timeout=40)
        self.state: dict[str, str] = {}
        self.events: list[tuple[float, str, str | None, str | None]] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        self.index = 0
        self._poll()  # initial state, synchronously
        self.thread = threading.Thread(target=self._run, name="consul-observer", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        status, headers, data = self.http.request("GET", f"/v1/health/state/any?index={self.index}&wait=20s", timeout=40)
        t = time.monotonic()
        if status != 200:
            raise RuntimeError(f"blocking query: HTTP {status}")
        idx = int(headers.get("x-consul-index", "0"))
        self.index = idx if idx >= self.index else 0  # an index that goes back resets
        new = tether_view({c["CheckID"]: c["Status"] for c in json.loads(data)})
        with self.cond:
            for cid in set(new) | set(self.state):
                old, cur = self.state.get(cid), new.get(cid)
                if old != cur:
                    self.events.append((t, cid, old, cur))
            self.state = new
            self.cond.notify_all()

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._poll()
            except BaseException as e:  # noqa: BLE001 - reported to the waiting thread
                if self.stopping:
                    return
                self.error = e
                time.sleep(0.05)

    def wait(self, pred, timeout: float) -> bool:
        """Wait until pred(state) holds; False after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.state):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def first_change(self, cid: str, to: str | None, after: float) -> float | None:
        """When check `cid` first turned `to` (None = disappeared) after `after`."""
        with self.cond:
            for t, c, _old, new in self.events:
                if t >= after and c == cid and new == to:
                    return t
        return None

    def stop(self) -> None:
        self.stopping = True
        self.http.abort()
        self.thread.join(5)
