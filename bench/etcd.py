"""A single-node etcd on free loopback ports, spoken to through its JSON
gateway (/v3/kv/*, /v3/watch), and a watch-based observer."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import threading
import time

from common import Http, Procs, free_port, log, wait_until


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def unb64(s: str) -> str:
    return base64.b64decode(s).decode(errors="replace")


def prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Etcd:
    def __init__(self, procs: Procs, binary: str, workdir: str) -> None:
        self.port, peer = free_port(), free_port()
        self.data_dir = os.path.join(workdir, "etcd-data")
        self.log_path = os.path.join(workdir, "etcd.log")
        c, p = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
        argv = [
            binary, "--name", "b", "--data-dir", self.data_dir,
            "--listen-client-urls", c, "--advertise-client-urls", c,
            "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
            "--initial-cluster", f"b={p}", "--log-level=warn",
        ]  # fmt: skip
        self.proc = procs.start("etcd", argv, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        self.url = c
        self.http = Http(self.port)

        def up():
            if self.proc.poll() is not None:
                raise SystemExit(f"etcd exited early; see {self.log_path}")
            return self.revision() > 0

        wait_until(up, 30, 0.1, "etcd")
        log(f"etcd: {self.url} (pid {self.proc.pid}, data in {self.data_dir})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def revision(self) -> int:
        r = self.http.json("POST", "/v3/kv/range", {"key": b64("bench/none")})
        return int(r["header"]["revision"])

    def keys(self, prefix: str) -> dict[str, str]:
        r = self.http.json("POST", "/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in r.get("kvs", [])}

    def count(self, prefix: str) -> int:
        r = self.http.json("POST", "/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), "count_only": True})
        return int(r.get("count", 0))

    def put(self, key: str, value: str) -> None:
        self.http.json("POST", "/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def delete(self, key: str) -> None:
        self.http.json("POST", "/v3/kv/deleterange", {"key": b64(key)})

    def metrics(self, names: tuple[str, ...]) -> dict[str, float]:
        """Selected counters from etcd's Prometheus endpoint."""
        _, _, data = self.http.request("GET", "/metrics")
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, val = line.rpartition(" ")
                if name in names:
                    out[name] = float(val)
        return out


class WatchObserver:
    """A watch on a key prefix through the JSON gateway: every PUT/DELETE,
    time-stamped (time.monotonic) when its message arrives."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self.etcd, self.prefix = etcd, prefix
        self.state: dict[str, str] = {}
        self.events: list[tuple[float, str, str]] = []  # (t, key, "PUT"|"DELETE")
        self.cond = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        r = etcd.http.json("POST", "/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        self.state = {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in r.get("kvs", [])}
        self.rev = int(r["header"]["revision"])
        self.conn: http.client.HTTPConnection | None = None
        self.created = threading.Event()
        self.thread = threading.Thread(target=self._run, name="etcd-observer", daemon=True)
        self.thread.start()
        if not self.created.wait(10):
            raise TimeoutError("etcd watch not created")

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._watch()
            except BaseException as e:  # noqa: BLE001
                if self.stopping:
                    return
                self.error = e
                time.sleep(0.05)

    def _watch(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.etcd.port, timeout=None)
        body = {"create_request": {"key": b64(self.prefix), "range_end": b64(prefix_end(self.prefix)), "start_revision": self.rev + 1}}
        self.conn.request("POST", "/v3/watch", body=json.dumps(body))
        resp = self.conn.getresponse()
        while not self.stopping:
            line = resp.readline()
            t = time.monotonic()
            if not line:
                return  # stream ended: re-open from the last revision
            line = line.strip()
            if not line.startswith(b"{"):
                continue
            msg = json.loads(line).get("result", {})
            if msg.get("created"):
                self.created.set()
            evs = msg.get("events") or []
            with self.cond:
                for ev in evs:
                    kv = ev["kv"]
                    key = unb64(kv["key"])
                    kind = ev.get("type", "PUT")  # PUT is the default (0), omitted in JSON
                    if kind == "PUT":
                        self.state[key] = unb64(kv.get("value", ""))
                    else:
                        self.state.pop(key, None)
                    self.events.append((t, key, kind))
                    self.rev = max(self.rev, int(kv.get("mod_revision", self.rev)))
                if evs:
                    self.cond.notify_all()

    def wait(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.state):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def first_event(self, key: str, kind: str, after: float) -> float | None:
        with self.cond:
            for t, k, e in self.events:
                if t >= after and k == key and e == kind:
                    return t
        return None

    def stop(self) -> None:
        self.stopping = True
        if self.conn is not None and self.conn.sock is not None:
            try:
                self.conn.sock.shutdown(2)
            except OSError:
                pass
        self.thread.join(5)
