"""Shared helpers for the tether benchmarks (Python 3.11 standard library only).

Processes: every child is started through `Procs`, from the main thread, with
PR_SET_PDEATHSIG = SIGKILL, so that it dies with the benchmark even if the
benchmark itself is killed; `Procs.stop_all()` (called from a `finally`)
stops the rest politely.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def free_port() -> int:
    """A free loopback TCP port (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG = 1: the child gets SIGKILL when its parent thread dies.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Procs:
    """Every process the benchmark starts; stop_all() ends those still running."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        assert threading.current_thread() is threading.main_thread(), "start processes from the main thread (PDEATHSIG)"
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)
        self.procs.append((name, p))
        return p

    @staticmethod
    def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal one process and wait for it; SIGKILL after `timeout`."""
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            except ProcessLookupError:
                pass
        return p.returncode

    def stop_all(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                log(f"cleanup: stopping {name} (pid {p.pid})")
                self.stop(p, timeout=10)
        self.procs.clear()


# --- /proc readings ----------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def cpu_ns_by_thread(pid: int) -> dict[str, int]:
    """Time on CPU of each live thread, in ns (/proc/PID/task/TID/schedstat,
    field 1: the scheduler's own account, not rounded to clock ticks)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[tid] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def io_counts(pid: int) -> dict[str, int]:
    """/proc/PID/io: read syscalls (syscr) and bytes read (rchar), files and sockets alike."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f)}
    except OSError:
        return {}


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def system_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals[:8])
    return total - idle, total


class CpuWindow:
    """CPU use of some processes (and of the machine) between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> "CpuWindow":
        self.t0 = time.monotonic()
        self.c0 = {k: cpu_ticks(p) for k, p in self.pids.items()}
        self.ns0 = {k: cpu_ns_by_thread(p) for k, p in self.pids.items()}
        self.io0 = {k: io_counts(p) for k, p in self.pids.items()}
        self.s0 = system_cpu()
        return self

    def stop(self) -> dict:
        t1 = time.monotonic()
        c1 = {k: cpu_ticks(p) for k, p in self.pids.items()}
        ns1 = {k: cpu_ns_by_thread(p) for k, p in self.pids.items()}
        io1 = {k: io_counts(p) for k, p in self.pids.items()}
        s1 = system_cpu()
        secs = t1 - self.t0
        out = {"seconds": round(secs, 2)}
        for k in self.pids:
            out[f"{k}_cpu_pct"] = round(100.0 * (c1[k] - self.c0[k]) / CLK_TCK / secs, 3)
            # The same from schedstat, in ns: precise where ticks are too coarse
            # (one service: 0.05 % of a core over 60 s is 3 ticks). Threads
            # that ended within the window are missing from it.
            ns = sum(v - self.ns0[k].get(tid, 0) for tid, v in ns1[k].items())
            out[f"{k}_cpu_ns_pct"] = round(100.0 * ns / 1e9 / secs, 4)
            if io1[k] and self.io0[k]:
                out[f"{k}_read_syscalls_per_s"] = round((io1[k]["syscr"] - self.io0[k]["syscr"]) / secs, 1)
                out[f"{k}_read_kb_per_s"] = round((io1[k]["rchar"] - self.io0[k]["rchar"]) / 1024 / secs, 1)
        busy, total = s1[0] - self.s0[0], s1[1] - self.s0[1]
        # Whole machine, in % of one core (so 200 % = both cores busy).
        out["machine_cpu_pct"] = round(100.0 * busy / max(total, 1) * os.cpu_count(), 1)
        return out


# --- statistics ----------------------------------------------------------------


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: list[float]) -> dict:
    """p50/p99/max/mean of latencies in ms; `n` samples."""
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "p50": round(quantile(xs, 0.5), 2),
        "p99": round(quantile(xs, 0.99), 2),
        "max": round(max(xs), 2),
        "min": round(min(xs), 2),
        "mean": round(sum(xs) / len(xs), 2),
    }


# --- HTTP ----------------------------------------------------------------------


class Http:
    """A persistent HTTP/1.1 connection to one loopback server (one per thread)."""

    def __init__(self, port: int, timeout: float = 10.0, headers: dict[str, str] | None = None) -> None:
        self.port = port
        self.timeout = timeout
        self.headers = headers or {}  # sent with every request (e.g. X-Consul-Token)
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body=None, timeout: float | None = None) -> tuple[int, dict, bytes]:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout or self.timeout)
            elif timeout is not None or self.conn.timeout != self.timeout:
                self.conn.timeout = timeout or self.timeout
                if self.conn.sock:
                    self.conn.sock.settimeout(self.conn.timeout)
            try:
                self.conn.request(method, path, body=body, headers=self.headers)
                r = self.conn.getresponse()
                data = r.read()
                return r.status, {k.lower(): v for k, v in r.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body=None, timeout: float | None = None):
        status, _, data = self.request(method, path, body, timeout)
        if status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def abort(self) -> None:
        """Break a request blocked in another thread (a long blocking query)."""
        conn = self.conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(2)
            except OSError:
                pass

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None


class Poller:
    """A consumer's thread: calls `self._poll()` (one blocking query on
    `self.http`) until stop(). An error is kept with its time in `errors` and
    the poll retried 50 ms later. Subclasses set `http` and `cond`, then call
    `_start(name)`."""

    http: Http
    cond: threading.Condition

    def _start(self, name: str) -> None:
        self.errors: list[str] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"consumer-{name}", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._poll()
            except Exception as e:  # noqa: BLE001 - kept, and retried (no leader during an election, say)
                if self.stopping:
                    return
                with self.cond:
                    self.errors.append(f"{time.monotonic():.3f} {e}")
                time.sleep(0.05)

    def stop(self) -> None:
        self.stopping = True
        # Http.request retries once on a new connection: abort until the thread is out.
        for _ in range(50):
            self.http.abort()
            self.thread.join(0.1)
            if not self.thread.is_alive():
                break


def wait_until(pred, timeout: float, every: float = 0.05, what: str = "condition"):
    """Call pred() until it returns something truthy; raise after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except (OSError, RuntimeError, ValueError, http.client.HTTPException):
            v = None
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
