"""The grpc-go client of the interop tests (tests/go/etcdclient) as the
benchmark runs it: etcd's own resolver, round_robin, Health/Check in a loop;
its JSON lines (resolver updates and per-window "who answered") are read on a
thread, each kept with the client's own wall-clock stamp (t_ns)."""

from __future__ import annotations

import json
import subprocess
import threading
import time

from common import Procs, log


class GoClient:
    def __init__(self, procs: Procs, binary: str, etcd_url: str, target: str, log_path: str, every: str = "500us", window: str = "20ms") -> None:
        argv = [binary, f"-endpoints={etcd_url}", f"-target={target}", f"-every={every}", f"-window={window}"]
        self.proc = procs.start("etcdclient", argv, stdout=subprocess.PIPE, stderr=open(log_path, "ab"), bufsize=0)
        self.windows: list[dict] = []
        self.resolved: list[dict] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, name="etcdclient-reader", daemon=True).start()
        log(f"etcdclient: pid {self.proc.pid}, target {target}, a call every {every}")

    def _read(self) -> None:
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            with self.cond:
                (self.windows if ev.get("event") == "window" else self.resolved).append(ev)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait(self, pred, timeout: float) -> bool:
        """Wait until pred(windows, resolved) holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.windows, self.resolved):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return False
                self.cond.wait(min(left, 0.5))
            return True

    def stop(self) -> None:
        Procs.stop(self.proc, timeout=5)
