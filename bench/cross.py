"""The `cross` phase of bench/run.py: a flip seen by a consumer on ANOTHER
client agent of a production-shaped Consul.

Three Consul servers (`bootstrap_expect = 3`) and two client agents, A and B,
on loopback, ACLs on with default deny, gossip encrypted: the configuration of
tests/support/cluster.rs, mirrored. On client agent A:

- tether (watch mode, interval 1 s) with one service, `orders-tether`, on its
  own example health server, with a token made from README.md's "Minimal
  Consul ACL policy" (read out of the README, as tests/cluster does);
- Consul's own gRPC check (`"GRPC": "127.0.0.1:PORT", "Interval": "1s"`) for
  a second service, `orders-consul`, on a second example health server of the
  same binary, registered with a token of the same policy;
- the floor: a third service, `orders-floor`, with a TTL check that the
  benchmark itself sets with `PUT /v1/agent/check/update` on A (what any
  checker's result costs to travel A → servers → B).

On client agent B, one consumer per service runs blocking queries
`/v1/health/service/NAME?passing&index=N&wait=30s` (with a read-only token)
and time-stamps (time.monotonic) every answer whose passing set changed.

Each round flips the three, in a random order, NOT_SERVING (TTL: critical)
0.2-1.2 s after B saw the last change, and back 0.2-2.0 s later (see HOLD),
and waits until B has seen each change before the next: time from the health
server's `ok` (the floor: from just before its PUT, which Consul answers only
after persisting the TTL check's state) until B's consumer has the answer
without the service (left) / with it again (rejoined).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
import threading
import time

from common import Http, Poller, Procs, free_port, log, summary, wait_until
from services import HealthServer, Tether, service_file

# The same master token as tests/support (a throwaway cluster on loopback).
ACL_MASTER = "11111111-2222-3333-4444-555555555555"
START = 60  # s: how long starting the cluster (or a token's spread) may take

TETHER, CONSUL, FLOOR = "orders-tether", "orders-consul", "orders-floor"
KINDS = {TETHER: "tether, watch mode (interval 1 s)", CONSUL: "Consul's own gRPC check (interval 1 s)",
         FLOOR: "floor: a TTL check set by the benchmark (`PUT /v1/agent/check/update` on A)"}  # fmt: skip
# tether's probe keeps a Watch stream that says NOT_SERVING for 1 s
# (src/health/probe.rs, NOT_SERVING_GRACE), then drops it and follows the
# service with a unary Check every min(interval, 1 s) until one says SERVING:
# a flip back is seen at once within that grace, by the next Check after it.
# So the time NOT_SERVING is held before the flip back is drawn from 0.2-2.0 s
# (about half the samples on each side), and the way back is reported by it.
HOLD = (0.2, 2.0)
GAP = (0.2, 1.2)
GRACE_S = 1.0
CONSUMER_POLICY = 'service_prefix "" {\n  policy = "read"\n}\nnode_prefix "" {\n  policy = "read"\n}\n'


class AgentExited(Exception):
    """A Consul agent exited by itself (not caught by wait_until)."""


class Agent:
    """One Consul agent of the cluster: its ports, directory and process."""

    def __init__(self, root: str, name: str, index: int) -> None:
        self.name = name
        self.node_id = f"7e7e7e7e-0000-4000-8000-{index:012d}"
        self.http_port, self.serf_lan, self.serf_wan, self.server_port = (free_port() for _ in range(4))
        self.dir = os.path.join(root, name)
        self.data_dir = os.path.join(self.dir, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        self.config = os.path.join(self.dir, "agent.hcl")
        self.log_path = os.path.join(self.dir, "consul.log")
        self.proc: subprocess.Popen | None = None
        self.http = Http(self.http_port, headers={"X-Consul-Token": ACL_MASTER})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self, server: bool, join: list[str], key: str) -> None:
        """tests/support/cluster.rs's ClusterAgent::write_config, as HCL."""
        if server:
            role = (
                'server = true\nbootstrap_expect = 3\n'
                'acl {\n  enabled = true\n  default_policy = "deny"\n  enable_token_persistence = true\n'
                f'  tokens {{\n    master = "{ACL_MASTER}"\n    agent = "{ACL_MASTER}"\n  }}\n}}\n'
            )  # fmt: skip
        else:
            role = (
                'server = false\n'
                'acl {\n  enabled = true\n  default_policy = "deny"\n  enable_token_persistence = true\n'
                f'  tokens {{\n    agent = "{ACL_MASTER}"\n  }}\n}}\n'
            )  # fmt: skip
        joins = ", ".join(f'"{j}"' for j in join)
        text = (
            f'datacenter = "dc1"\nprimary_datacenter = "dc1"\n'
            f'node_name = "{self.name}"\nnode_id = "{self.node_id}"\ndata_dir = "{self.data_dir}"\n'
            f'bind_addr = "127.0.0.1"\nclient_addr = "127.0.0.1"\n'
            f'encrypt = "{key}"\nretry_join = [{joins}]\nretry_interval = "1s"\n'
            f'disable_update_check = true\nlog_level = "info"\n'
            f"ports {{\n  http = {self.http_port}\n  serf_lan = {self.serf_lan}\n  serf_wan = {self.serf_wan}\n"
            f"  server = {self.server_port}\n  dns = -1\n  grpc = -1\n}}\n"
            f"performance {{\n  raft_multiplier = 1\n}}\n{role}"
        )  # fmt: skip
        with open(self.config, "w") as f:
            f.write(text)

    def start(self, procs: Procs, binary: str) -> None:
        self.proc = procs.start(
            f"consul {self.name}", [binary, "agent", f"-config-file={self.config}"],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str):
        return self.http.json("GET", path)

    def put(self, path: str, body=None):
        return self.http.json("PUT", path, body)


class ConsulCluster:
    """Three servers and client agents A and B on loopback (see the module's doc)."""

    def __init__(self, procs: Procs, binary: str, root: str) -> None:
        self.root = root
        self.servers = [Agent(root, f"server-{i}", i) for i in range(3)]
        self.a, self.b = Agent(root, "client-a", 10), Agent(root, "client-b", 11)
        self.clients = [self.a, self.b]
        join = [f"127.0.0.1:{s.serf_lan}" for s in self.servers]
        key = base64.b64encode(os.urandom(32)).decode()  # a gossip key of this cluster's own
        for s in self.servers:
            s.write_config(True, join, key)
        for c in self.clients:
            c.write_config(False, join, key)
        self.procs, self.binary = procs, binary

    def start(self) -> None:
        """Start the five agents; return once there is a leader and both
        client agents are ready."""
        t0 = time.monotonic()
        for agent in self.servers + self.clients:
            agent.start(self.procs, self.binary)
        self.leader()
        for c in self.clients:
            self.wait_client_ready(c)
        self.started_s = round(time.monotonic() - t0, 2)
        log(f"cross: Consul cluster (3 servers, 2 client agents) ready in {self.started_s} s; A {self.a.url}, B {self.b.url}")

    def check_alive(self) -> None:
        for agent in self.servers + self.clients:
            if not agent.alive():
                with open(agent.log_path, errors="replace") as f:
                    tail = "".join(f.readlines()[-8:])
                raise AgentExited(f"consul {agent.name} exited (code {agent.proc.poll()}); {agent.log_path} ends:\n{tail}")

    def leader(self) -> str:
        def one():
            self.check_alive()
            leaders = {s.get("/v1/status/leader") for s in self.servers}
            return leaders.pop() if len(leaders) == 1 and all(":" in x for x in leaders) else None

        return wait_until(one, START, 0.2, "one Consul leader all three servers agree on")

    def wait_client_ready(self, c: Agent) -> None:
        """c sees the three servers alive, is a node of the catalog with its
        node id, and takes a write with the master token."""

        def ready():
            self.check_alive()
            members = c.get("/v1/agent/members")
            if sum(1 for m in members if m.get("Tags", {}).get("role") == "consul" and m.get("Status") == 1) < 3:
                return False
            node = c.get(f"/v1/catalog/node/{c.name}")
            if not node or node["Node"]["ID"] != c.node_id:
                return False
            return c.put(f"/v1/kv/bench/ready/{c.name}", "ok")

        wait_until(ready, START, 0.2, f"Consul client agent {c.name} to join the cluster")

    def create_token(self, name: str, rules: str) -> str:
        """A policy with `rules` and a token with only that policy (SecretID),
        once every server knows it (client agents resolve tokens with a stale
        read on any server and cache "not found" for 30 s)."""
        policy = wait_until(lambda: self.a.put("/v1/acl/policy", {"Name": name, "Rules": rules}), START, 0.2, "an ACL policy")
        token = wait_until(lambda: self.a.put("/v1/acl/token", {"Description": name, "Policies": [{"ID": policy["ID"]}]}), START, 0.2, "an ACL token")
        for s in self.servers:
            wait_until(lambda: s.get(f"/v1/acl/token/{token['AccessorID']}?stale"), START, 0.1, f"{s.name} to know the token")
        return token["SecretID"]

    def stop(self) -> None:
        """SIGTERM to both client agents at once (each leaves the cluster,
        about 4 s), then to the three servers; SIGKILL after 20 s."""
        for group in (self.clients, self.servers):
            running = [a for a in group if a.alive()]
            for agent in running:
                agent.http.close()
                try:
                    agent.proc.terminate()
                except ProcessLookupError:
                    pass
            for agent in running:  # no second signal: it would cut Consul's leave short
                try:
                    agent.proc.wait(20)
                except subprocess.TimeoutExpired:
                    agent.proc.kill()
                    agent.proc.wait(5)
        for agent in self.servers + self.clients:
            shutil.rmtree(agent.data_dir, ignore_errors=True)


class PassingSet(Poller):
    """A consumer on client agent B: blocking queries on
    /v1/health/service/NAME?passing, every answer time-stamped when read; an
    event whenever the set of passing service ids changed."""

    def __init__(self, agent: Agent, name: str, token: str) -> None:
        self.name = name
        self.http = Http(agent.http_port, timeout=45, headers={"X-Consul-Token": token})
        self.ids: frozenset[str] = frozenset()
        self.events: list[tuple[float, frozenset[str]]] = []
        self.answers = 0
        self.index = 0
        self.cond = threading.Condition()
        self._start(name)

    def _poll(self) -> None:
        first = self.answers == 0
        path = f"/v1/health/service/{self.name}?passing" + ("" if first else f"&index={self.index}&wait=30s")
        status, headers, data = self.http.request("GET", path, timeout=45)
        t = time.monotonic()
        if status != 200:
            raise RuntimeError(f"GET {path} on B: HTTP {status}: {data[:200]!r}")
        idx = int(headers.get("x-consul-index", "0"))
        self.index = idx if idx >= self.index else 0  # an index that went back (a new leader's) starts over
        ids = frozenset(e["Service"]["ID"] for e in json.loads(data))
        with self.cond:
            self.answers += 1
            if ids != self.ids or first:
                self.events.append((t, ids))
                self.ids = ids
            self.cond.notify_all()

    def wait(self, pred, after: float, timeout: float) -> float | None:
        """When the first answer read at or after `after` whose set satisfied
        pred arrived; None after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, ids in self.events:
                    if t >= after and pred(ids):
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def now(self) -> frozenset[str]:
        with self.cond:
            return self.ids



def by_hold(back: list[float], held: list[float]) -> dict:
    """The way back split by how long the service was NOT_SERVING: under
    tether's 1 s grace, or at least that."""
    pairs = list(zip(back, held))
    return {
        "under_grace": summary([b for b, h in pairs if h < GRACE_S * 1000]),
        "grace_or_more": summary([b for b, h in pairs if h >= GRACE_S * 1000]),
    }


def readme_policy(root: str) -> str:
    """The first ```hcl block of README.md's "Minimal Consul ACL policy"
    section (as tests/cluster reads it)."""
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    section = text.split("\n## Minimal Consul ACL policy\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```hcl\n", 1)[1].split("\n```", 1)[0]


def run(procs: Procs, args, cfg: dict, path) -> dict:
    """The phase: returns its results (summaries and raw samples, in ms)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = os.path.join(args.tools, "consul")
    cluster = tether = token_file = None
    servers: list[HealthServer] = []
    consumers: dict[str, PassingSet] = {}
    res: dict = {"flips": cfg["cross_flips"], "acl": "default deny, tether with README.md's minimal policy"}
    try:
        # As tests/support/cluster.rs: an agent that exits while the cluster
        # starts (a free port taken by someone else before Consul bound it)
        # starts the whole cluster again on new ports, up to three times.
        for attempt in range(1, 4):
            cluster = ConsulCluster(procs, binary, os.path.dirname(path("cross", "cluster" if attempt == 1 else f"cluster-{attempt}", "x")))
            try:
                cluster.start()
                break
            except AgentExited as e:
                cluster.stop()
                if attempt == 3:
                    raise
                log(f"cross: Consul cluster, attempt {attempt}: {e}\nstarting it again on other ports")
        res["cluster_attempts"] = attempt
        res["cluster_start_s"] = cluster.started_s
        a = cluster.a
        writer = cluster.create_token("bench-orders", readme_policy(root))
        reader = cluster.create_token("bench-consumer", CONSUMER_POLICY)
        token_file = path("cross", "tether", "consul.token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(writer)

        hs_t = HealthServer(procs, args.health_server, 0, [], path("cross", "health_server-tether.log"))
        hs_c = HealthServer(procs, args.health_server, 0, [], path("cross", "health_server-consul.log"))
        servers = [hs_t, hs_c]
        # Consul's own gRPC check and the floor's TTL check, on A, with a token of tether's policy.
        ah = Http(a.http_port, headers={"X-Consul-Token": writer})
        ah.json("PUT", "/v1/agent/service/register", {
            "ID": f"{CONSUL}-1", "Name": CONSUL, "Address": "127.0.0.1", "Port": hs_c.port,
            "Check": {"CheckID": "consul-grpc", "Name": "grpc", "GRPC": f"127.0.0.1:{hs_c.port}", "Interval": "1s", "Timeout": "1s"},
        })  # fmt: skip
        ah.json("PUT", "/v1/agent/service/register", {
            "ID": f"{FLOOR}-1", "Name": FLOOR, "Address": "127.0.0.1", "Port": 1,
            "Check": {"CheckID": "floor-ttl", "Name": "ttl", "TTL": "10m", "Status": "passing"},
        })  # fmt: skip
        files = {"orders-tether.toml": service_file(TETHER, f"{TETHER}-1", hs_t.port, "", "watch", "1s")}
        tether = Tether(procs, args.tether, os.path.dirname(token_file), "bench-cross", "consul", a.url, files, consul_token_file=token_file)

        for name in (TETHER, CONSUL, FLOOR):
            consumers[name] = PassingSet(cluster.b, name, reader)
        for name, c in consumers.items():
            if c.wait(lambda ids, n=name: f"{n}-1" in ids, 0, 60) is None:
                raise RuntimeError(f"cross: {name} never passing on client agent B (errors: {c.errors[-3:]}); see {tether.log_path}")
        time.sleep(2)

        def set_floor(status: str) -> tuple[float, float]:
            t0 = time.monotonic()
            ah.json("PUT", "/v1/agent/check/update/floor-ttl", {"Status": status, "Output": status})
            return t0, time.monotonic()

        flip = {
            TETHER: lambda up: hs_t.set("serving" if up else "not_serving"),
            CONSUL: lambda up: hs_c.set("serving" if up else "not_serving"),
            FLOOR: lambda up: set_floor("passing" if up else "critical"),
        }
        raw = {n: {"left": [], "rejoined": [], "left_from_write": [], "rejoined_from_write": [], "held": []} for n in flip}
        missed = {n: 0 for n in flip}
        ack = []
        for i in range(cfg["cross_flips"]):
            order = list(flip)
            random.shuffle(order)
            for name in order:
                sid = f"{name}-1"
                down_at = 0.0
                for up, key in ((False, "left"), (True, "rejoined")):
                    time.sleep(random.uniform(*(HOLD if up else GAP)))
                    cluster.check_alive()
                    if not tether.alive():
                        raise RuntimeError(f"cross: tether exited; see {tether.log_path}")
                    t0, t1 = flip[name](up)
                    if name != FLOOR:
                        ack.append(round((t1 - t0) * 1000, 3))
                    if not up:
                        down_at = t1
                    seen = consumers[name].wait(lambda ids: (sid in ids) == up, t0, 15)
                    if seen is None:
                        missed[name] += 1
                        log(f"cross: {name}: B did not see it {key} within 15 s")
                        if consumers[name].wait(lambda ids: (sid in ids) == up, t0, 45) is None:
                            raise RuntimeError(f"cross: {name} never {key} on client agent B")
                        continue
                    raw[name][key].append(round((seen - t1) * 1000, 3))
                    raw[name][f"{key}_from_write"].append(round((seen - t0) * 1000, 3))
                    if up:  # how long it was NOT_SERVING: from one `ok` (PUT answer) to the next
                        raw[name]["held"].append(round((t1 - down_at) * 1000, 3))
            if (i + 1) % 5 == 0:
                log(f"cross: {i + 1}/{cfg['cross_flips']} rounds; p50 so far (ms) " + ", ".join(
                    f"{n} {summary(raw[n]['left']).get('p50')}/{summary(raw[n]['rejoined']).get('p50')}" for n in flip))  # fmt: skip
        res.update({
            "kinds": KINDS,
            "left": {n: summary(raw[n]["left"]) for n in flip},
            "rejoined": {n: summary(raw[n]["rejoined"]) for n in flip},
            "left_from_write": {n: summary(raw[n]["left_from_write"]) for n in flip},
            "rejoined_from_write": {n: summary(raw[n]["rejoined_from_write"]) for n in flip},
            "rejoined_by_hold": {n: by_hold(raw[n]["rejoined"], raw[n]["held"]) for n in flip},
            "hold_s": list(HOLD), "gap_s": list(GAP), "grace_s": GRACE_S,
            "flip_ack": summary(ack),
            "missed": missed,
            "consumer_answers": {n: c.answers for n, c in consumers.items()},
            "consumer_errors": {n: c.errors[-5:] for n, c in consumers.items()},
            "raw_ms": raw,
        })  # fmt: skip
        code, secs = tether.stop()
        res["tether_exit"] = {"code": code, "seconds": round(secs, 2)}
        log("cross:", json.dumps({k: res[k] for k in ("left", "rejoined", "missed")}))
        return res
    finally:
        for c in consumers.values():
            c.stop()
        if tether is not None and tether.alive():
            tether.stop()
        for hs in servers:
            hs.stop()
        if cluster is not None:
            cluster.stop()
        if token_file and os.path.exists(token_file):
            os.unlink(token_file)  # the logs are copied to the results


# --- report ------------------------------------------------------------------


def _lat(s: dict | None) -> str:
    if not s or not s.get("n"):
        return "–"
    nd = 1 if s["max"] >= 10 else 2
    return f"{s['p50']:.{nd}f} / {s['p99']:.{nd}f} / {s['max']:.{nd}f}"


def render(res: dict) -> str:
    """The Markdown section of report.md for the cross phase."""
    cx = res["cross"]
    hold = cx.get("hold_s", [0.2, 1.2])
    gap = cx.get("gap_s", [0.2, 1.2])
    out = ["\n### Cross-node flip (3 servers, 2 client agents)\n\n"]
    out.append(
        f"A flip on client agent A until a consumer's blocking query on client agent B "
        f"(`/v1/health/service/NAME?passing&index=N&wait=30s`) has the service out of / back in the passing set; "
        f"ACLs {cx.get('acl', '')}; {cx['flips']} flips each way per checker, interleaved in a random order; "
        f"each flip to NOT_SERVING {gap[0]}–{gap[1]} s after the last change was seen, the flip back "
        f"{hold[0]}–{hold[1]} s after it. Timed from the health server's `ok` (the floor: from just before its PUT, "
        f"which Consul answers only after persisting the TTL check's state in its data dir). "
        f"Times in ms, p50 / p99 / max.\n\n"
    )
    rows = []
    for n, label in cx["kinds"].items():
        left, back = (cx["left_from_write"], cx["rejoined_from_write"]) if n == FLOOR else (cx["left"], cx["rejoined"])
        rows.append(f"| {label} | {left[n].get('n', 0)} | {_lat(left[n])} | {_lat(back[n])} | {cx['missed'][n]} |")
    out.append("| checker on A | n | → out of B's passing set | → back in it | missed (> 15 s) |\n|---|---|---|---|---|\n")
    out.append("\n".join(rows) + "\n")
    bh = cx.get("rejoined_by_hold")
    if bh:
        g = cx.get("grace_s", 1.0)
        out.append(
            f"\nThe way back by how long the service was NOT_SERVING (after {g:g} s of NOT_SERVING tether asks with a "
            f"unary Check whether the server is still there, and keeps the Watch stream while it answers):\n\n"
            f"| checker on A | held < {g:g} s: n | → back in it | held ≥ {g:g} s: n | → back in it |\n|---|---|---|---|---|\n"
        )
        for n in (TETHER, CONSUL):
            u, o = bh[n]["under_grace"], bh[n]["grace_or_more"]
            out.append(f"| {cx['kinds'][n]} | {u.get('n', 0)} | {_lat(u)} | {o.get('n', 0)} | {_lat(o)} |\n")
    out.append(f"\nCluster start (5 agents, ready): {cx.get('cluster_start_s')} s; flip command → `ok` {_lat(cx.get('flip_ack'))} ms.\n")
    return "".join(out)
