"""The reference Python health servicer, run exactly as Python services run it.

    .tools/venv/bin/python tests/python/health_server.py PORT [SERVICE ...]

A sync `grpc.server` on a ThreadPoolExecutor with grpcio-health-checking's
sync `HealthServicer()` (default arguments), bound to 127.0.0.1:PORT (0 = a
free port). Every named service and "" start SERVING. Prints
`listening on 127.0.0.1:PORT` once serving, then reads stdin lines like
examples/health_server.rs: `serving` / `not_serving` set every named service
and "", then print `ok`.

`HealthServicer.set()` can deadlock (grpc/grpc#43403: it holds the
servicer's lock while it sends to the watchers, and a just-cancelled Watch's
close callback needs that same lock). So set() runs on a worker thread and
`ok` is printed only once every set() returned; the driver (tests/support's
PyHealthServer) waits for it with a deadline. While a set() is stuck, the
stacks of every thread go to stderr every 5 s, and on SIGUSR1 at any time.
"""

import concurrent.futures
import faulthandler
import os
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

STATUSES = {
    "serving": health_pb2.HealthCheckResponse.SERVING,
    "not_serving": health_pb2.HealthCheckResponse.NOT_SERVING,
}


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    services = sys.argv[2:] + [""]
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=10))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    for s in services:
        servicer.set(s, health_pb2.HealthCheckResponse.SERVING)
    server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)

    for line in sys.stdin:
        cmd = line.strip()
        if not cmd:
            continue
        status = STATUSES.get(cmd)
        if status is None:
            print(f"unknown command {cmd!r}: use serving or not_serving", file=sys.stderr, flush=True)
            print(f"error: unknown command {cmd!r}", flush=True)
            continue
        done = threading.Event()

        def apply(status=status, done=done):
            for s in services:
                servicer.set(s, status)
            done.set()

        threading.Thread(target=apply, name=f"set-{cmd}", daemon=True).start()
        started = time.monotonic()
        while not done.wait(5):
            print(
                f"set({cmd}) has not returned after {time.monotonic() - started:.0f} s; every thread:",
                file=sys.stderr,
                flush=True,
            )
            faulthandler.dump_traceback(all_threads=True)
        print("ok", flush=True)

    # stdin closed: the driver is gone. Exit at once, even past a stuck set().
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
