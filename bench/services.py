"""The example gRPC health server and tether itself, as the benchmark runs them."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time

from common import Procs, log


class HealthServer:
    """`health_server 127.0.0.1:PORT [SERVICE ...]`, driven over stdin."""

    def __init__(self, procs: Procs, binary: str, port: int, services: list[str], log_path: str) -> None:
        self.procs, self.binary, self.services, self.log_path = procs, binary, services, log_path
        self.port = port
        self.status = "serving"
        self._start()

    def _start(self) -> None:
        argv = [self.binary, f"127.0.0.1:{self.port}", *self.services]
        self.proc = self.procs.start(
            "health_server", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log_path, "ab"), bufsize=0
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        first = self._line(15)
        if not first.startswith("listening on "):
            raise RuntimeError(f"health_server said {first!r}")
        self.port = int(first.rsplit(":", 1)[1])
        self.status = "serving"

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for raw in proc.stdout:
            lines.put(raw.decode().strip())
        lines.put(None)

    def _line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("health_server did not answer") from None
        if line is None:
            raise RuntimeError(f"health_server exited (code {self.proc.poll()})")
        return line

    def set(self, status: str) -> tuple[float, float]:
        """Send `serving`/`not_serving`; return (sent at, acknowledged at)."""
        t0 = time.monotonic()
        self.proc.stdin.write(f"{status}\n".encode())
        self.proc.stdin.flush()
        ack = self._line(30)
        t1 = time.monotonic()
        if ack != "ok":
            raise RuntimeError(f"health_server answered {ack!r} to {status}")
        self.status = status
        return t0, t1

    def kill(self) -> float:
        """SIGKILL; returns when the signal was sent."""
        t0 = time.monotonic()
        self.proc.kill()
        self.proc.wait(10)
        return t0

    def restart(self) -> None:
        """Start again on the same port (after kill())."""
        self._start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.flush()
            except OSError:
                pass
            Procs.stop(self.proc, timeout=10)


def service_file(name: str, sid: str, port: int, grpc_service: str, mode: str, interval: str = "1s", ttl: str = "15s") -> str:
    return (
        f'name = "{name}"\nid = "{sid}"\naddress = "127.0.0.1"\nport = {port}\nttl = "{ttl}"\n\n'
        f'[check]\ntarget = "127.0.0.1:{port}"\nservice = "{grpc_service}"\nmode = "{mode}"\n'
        f'interval = "{interval}"\ntimeout = "2s"\n'
    )


def drop_file(path: str, text: str) -> float:
    """Write a file atomically (dotfile + rename, as tether ignores dotfiles);
    return when it appeared."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    t0 = time.monotonic()
    os.rename(tmp, path)
    return t0


# Flap damping off (issue 21). Every phase but `flap` flips its servers again
# and again (detection: 100 transitions in about 100 s), which the damping's
# defaults would rightly call flapping (8 transitions in 30 s start an episode
# that holds the service critical; 30 writes a minute per service): they
# measure each flip's own path, as a service that does not flap sees it. The
# `flap` phase measures the damping itself and passes its own table.
DAMPING_OFF = "\n[damping]\nenabled = false\nwrites_per_minute = 0\n"


class Tether:
    """One `tether run` with its own config directory."""

    def __init__(
        self, procs: Procs, binary: str, workdir: str, node: str, backend: str, url: str, files: dict[str, str], consul_token_file: str | None = None,
        listen: str = "", extra_config: str = DAMPING_OFF,
    ) -> None:
        """`listen`: tether's HTTP listener (/metrics, /v1/status), off if
        empty; `extra_config`: appended to tether.toml (by default a
        `[damping]` table that turns damping and the write budget off)."""
        self.dir = workdir
        self.services_dir = os.path.join(workdir, "services.d")
        os.makedirs(self.services_dir, exist_ok=True)
        for fname, text in files.items():
            with open(os.path.join(self.services_dir, fname), "w") as f:
                f.write(text)
        cfg = f'services_dir = "services.d"\nnode = "{node}"\nlisten = "{listen}"\nderegister_on_shutdown = true\n\n'
        if backend == "consul":
            cfg += f'[consul]\naddress = "{url}"\n'
            if consul_token_file:
                cfg += f'token_file = "{consul_token_file}"\n'
        else:
            cfg += f'[etcd]\nendpoints = ["{url}"]\nprefix = "services"\n'
        cfg += extra_config
        self.config = os.path.join(workdir, "tether.toml")
        with open(self.config, "w") as f:
            f.write(cfg)
        self.log_path = os.path.join(workdir, "tether.log")
        env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "info"))
        self.proc = procs.start(
            f"tether ({node})", [binary, "run", "--config", self.config], stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"), env=env
        )
        log(f"tether {node}: pid {self.proc.pid}, {len(files)} service files, log {self.log_path}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM (tether deregisters what it owns); (exit code, seconds taken)."""
        t0 = time.monotonic()
        code = Procs.stop(self.proc, timeout=60)
        return code, time.monotonic() - t0
