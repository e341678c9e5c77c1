#!/usr/bin/env python3
"""Plots of one benchmark run, drawn from its results.json alone (no number
typed in here), so they can be drawn again without running anything:

    .tools/venv/bin/python bench/plots.py RESULTS_DIR OUT_DIR

RESULTS_DIR holds the run's results.json (bench/run.py); the PNGs go to
OUT_DIR. Each plot is drawn only if the run has the phase it needs:

- flip-cdf.png (detection): CDF of flip → critical in Consul's catalog, tether
  in watch and poll mode and Consul's own gRPC check, the same flips;
- start-vs-services.png (scale): start → all passing against the number of
  services, tether on Consul and on etcd, beside Consul's own registration
  floor (the same writes sent by the benchmark itself);
- idle-footprint.png (scale): tether's idle CPU and RSS against the number of
  services;
- flap-wakeups.png (flap): a consumer's wake-ups over time while a service
  flaps, damping on and off.

Every plot's footer names the machine (nproc, CPU model), the commit, the
time of the run, its results folder and command. Needs matplotlib
(scripts/install-deps.sh puts it into .tools/venv).
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

WATCH, POLL, OWN = "tether:orders-watch", "tether:orders-poll", "consul-grpc"
COLORS = {"watch": "#1f77b4", "poll": "#2ca02c", "consul": "#d62728", "etcd": "#9467bd", "floor": "#7f7f7f"}
FLAP_COLORS = {"default": "#1f77b4", "budget": "#ff7f0e", "off": "#d62728"}
FLAP_NAMES = {"default": "damping on (defaults)", "budget": "enabled = false (write budget on)",
              "off": "enabled = false, writes_per_minute = 0"}  # fmt: skip


def footer(fig, res: dict, results_dir: str, phases: list[str]) -> None:
    m = res.get("meta", {})
    commit = m.get("tether_commit", "?") + (" + uncommitted changes" if m.get("tether_worktree_dirty") else "")
    took = ", ".join(f"{p} {res['phases'][p]['seconds']:.0f} s" for p in phases if p in res.get("phases", {}))
    text = (
        f"{m.get('nproc', '?')} cores (nproc), {m.get('cpu_model', '?')}; tether {commit}; {m.get('consul_version', '')}, "
        f"{m.get('etcd_version', '')}\nrun {m.get('date_utc', '?')} ({took}); results {os.path.basename(os.path.normpath(results_dir))}; "
        f"`{m.get('command', '')}`"
    )
    fig.text(0.01, 0.01, text, fontsize=7, color="#555555", va="bottom", ha="left")


def plain_log(ax, which: str = "xy") -> None:
    """Log axes with plain numbers (0.05, 1, 100), not powers of ten."""
    for axis in (ax.xaxis if "x" in which else None, ax.yaxis if "y" in which else None):
        if axis is not None:
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())


def save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def num(x: float) -> str:
    """A figure for a label: 2.88, 10.1, 541, 1002."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def cdf(ax, xs: list[float], label: str, color: str) -> None:
    s = sorted(xs)
    n = len(s)
    ys = [(i + 1) / n for i in range(n)]
    ax.step(s, ys, where="post", label=label, color=color, linewidth=1.8)


def flip_cdf(res: dict, results_dir: str, out_dir: str) -> str | None:
    d = res.get("detection_consul")
    if not d:
        return None
    raw = d["raw_ms"]
    fig, ax = plt.subplots(figsize=(8, 5.4))
    fig.subplots_adjust(bottom=0.33, top=0.9)
    for cid, label, color in ((WATCH, "tether, watch mode", COLORS["watch"]), (POLL, "tether, poll mode (interval 1 s)", COLORS["poll"]),
                              (OWN, "Consul's own gRPC check (interval 1 s)", COLORS["consul"])):  # fmt: skip
        xs = [x for x in raw[cid]["critical"] if x is not None]
        s = d["checks"][cid]["critical"]
        if xs:
            cdf(ax, xs, f"{label}: p50 {num(s['p50'])} ms, p99 {num(s['p99'])} ms (n = {s['n']})", color)
    ax.set_xscale("log")
    plain_log(ax, "x")
    ax.set_xlabel("flip NOT_SERVING → critical in Consul's catalog (ms, log scale)")
    ax.set_ylabel("fraction of flips")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    ax.set_title(f"Flip → critical: tether against Consul's own gRPC check ({res['settings'].get('flips')} flips, same server, same flips)", fontsize=10)
    footer(fig, res, results_dir, ["detection"])
    return save(fig, out_dir, "flip-cdf.png")


def scale_rows(res: dict, backend: str, interval: str) -> list[dict]:
    return sorted((r for r in res.get("scale", {}).get("rows", []) if r["backend"] == backend and r["interval"] == interval), key=lambda r: r["n"])


def start_vs_services(res: dict, results_dir: str, out_dir: str) -> str | None:
    sc = res.get("scale")
    if not sc or not sc.get("rows"):
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    fig.subplots_adjust(bottom=0.24, top=0.88, right=0.97)

    def series(xs, ys, label, color, marker, fill=True, at=None):
        """`at`: where its values are written, (dx, dy) in points and alignment; None: not written."""
        ax.plot(xs, ys, marker=marker, color=color, label=label, linewidth=1.5, markersize=7,
                markerfacecolor=color if fill else "white")  # fmt: skip
        if at:
            for x, y in zip(xs, ys):
                ax.annotate(f"{num(y)} s", (x, y), textcoords="offset points", xytext=at[:2], ha=at[2], fontsize=7, color=color)

    # Values written beside the interval-1 s points and the floor only (the 5 s
    # points sit on top of them); Consul above, etcd below, the floor to the left.
    where = {"consul": (8, 5, "left"), "etcd": (8, -11, "left")}
    for backend, color, name in (("consul", COLORS["consul"], "tether → Consul"), ("etcd", COLORS["etcd"], "tether → etcd")):
        for interval, fill in (("1s", True), ("5s", False)):
            rows = scale_rows(res, backend, interval)
            if rows:
                series([r["n"] for r in rows], [r["startup_to_all_passing_s"] for r in rows], f"{name}, interval {interval}", color,
                       "o" if fill else "s", fill, where[backend] if fill else None)  # fmt: skip
    floor = list(sc.get("consul_floor_small") or [])
    if sc.get("consul_floor"):
        floor.append(sc["consul_floor"])
    if floor:
        floor.sort(key=lambda x: x["n"])
        series([x["n"] for x in floor], [x["register_to_all_passing_s"] for x in floor],
               "Consul's floor: the same registrations PUT by the benchmark", COLORS["floor"], "^", True, (-8, 2, "right"))  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.35, 3000)  # room for the values written left of the floor's points
    plain_log(ax)
    ax.set_xlabel("services on one agent (log scale)")
    ax.set_ylabel("start → all passing (s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Start → all services passing in the registry (tether: from starting the process)", fontsize=10)
    footer(fig, res, results_dir, ["scale"])
    return save(fig, out_dir, "start-vs-services.png")


def idle_footprint(res: dict, results_dir: str, out_dir: str) -> str | None:
    sc = res.get("scale")
    if not sc or not sc.get("rows"):
        return None
    fig, (cpu, rss) = plt.subplots(1, 2, figsize=(9, 4.6))
    fig.subplots_adjust(bottom=0.25, top=0.86, wspace=0.3, left=0.08, right=0.97)
    for backend, color in (("consul", COLORS["consul"]), ("etcd", COLORS["etcd"])):
        for interval, fill in (("1s", True), ("5s", False)):
            rows = scale_rows(res, backend, interval)
            if not rows:
                continue
            ns = [r["n"] for r in rows]
            # schedstat (ns) where the run has it: clock ticks are too coarse for one service.
            c = [r["idle"].get("tether_cpu_ns_pct", r["idle"].get("tether_cpu_pct")) for r in rows]
            m = [r["idle"]["tether_rss_kb"] / 1024 for r in rows]
            kw = dict(marker="o" if fill else "s", color=color, markerfacecolor=color if fill else "white", markersize=7, linewidth=1.5)
            label = f"tether → {'Consul' if backend == 'consul' else 'etcd'}, interval {interval}"
            cpu.plot(ns, c, label=label, **kw)
            rss.plot(ns, m, label=label, **kw)
            # Values: Consul's above the point, etcd's below; the RSS of the 5 s rows is not written (it sits on the 1 s one's).
            dy = 5 if backend == "consul" else -11
            for x, y in zip(ns, c):
                cpu.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(8, dy if fill else -3), fontsize=7, color=color)
            if fill:
                for x, y in zip(ns, m):
                    rss.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(8, dy), fontsize=7, color=color)
    for ax in (cpu, rss):
        ax.set_xscale("log")
        ax.set_xlim(0.6, 3000)  # room for the values written right of the points
        ax.margins(y=0.12)
        plain_log(ax, "x")
        ax.set_xlabel("services (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    cpu.set_yscale("log")
    plain_log(cpu, "y")
    cpu.set_ylabel("tether idle CPU (% of one core, log scale)")
    rss.set_ylabel("tether RSS idle (MB)")
    rss.set_ylim(0, rss.get_ylim()[1] * 1.05)
    cpu.legend(loc="upper left", fontsize=7)
    idle = sc.get("idle_s")
    fig.suptitle(f"tether idle: CPU (schedstat) and RSS by number of services (idle windows of {idle:g} s; 60 s for one service, 120 s for Consul at 1,000)", fontsize=9)
    footer(fig, res, results_dir, ["scale"])
    return save(fig, out_dir, "idle-footprint.png")


def flap_wakeups(res: dict, results_dir: str, out_dir: str) -> str | None:
    fl = res.get("flap")
    if not fl or not fl.get("rows"):
        return None
    backends = [b for b in ("consul", "etcd") if any(r["backend"] == b for r in fl["rows"])]
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4.8), squeeze=False)
    fig.subplots_adjust(bottom=0.25, top=0.86, wspace=0.25, left=0.07, right=0.98)
    # Each line runs to the end of what was watched: the last wake-up of any row, and a second.
    end = max((t for r in fl["rows"] for t, _ in r["wakes_s"]), default=fl["flap_s"]) + 1
    for ax, backend in zip(axes[0], backends):
        for r in (x for x in fl["rows"] if x["backend"] == backend):
            ts = [t for t, _ in r["wakes_s"] if t >= 0]
            if not ts:
                continue
            n = r["flapping"]["wakes_flappy-1"]
            xs = [0.0] + ts + [end]
            ys = list(range(0, len(ts) + 1)) + [len(ts)]
            ax.step(xs, [max(y, 0.8) for y in ys], where="post", color=FLAP_COLORS[r["setting"]], linewidth=1.6,
                    label=f"{FLAP_NAMES[r['setting']]}: {n} in the {fl['flap_s']:g} s")  # fmt: skip
        ax.axvspan(0, fl["flap_s"], color="#eeeeee", zorder=0)
        ax.set_yscale("log")
        plain_log(ax, "y")
        ax.set_xlabel(f"s since the toggling began (grey: {fl['flap_s']:g} s of toggling every {fl['every_ms']:g} ms)")
        ax.set_ylabel("consumer wake-ups so far (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
        what = "blocking query on /v1/health/service/flappy" if backend == "consul" else "etcdctl watch of the key"
        ax.set_title(f"{'Consul' if backend == 'consul' else 'etcd'}: {what}", fontsize=9)
    fig.suptitle("A flapping service: what one consumer sees, flap damping on and off", fontsize=10)
    footer(fig, res, results_dir, ["flap"])
    return save(fig, out_dir, "flap-wakeups.png")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    results_dir, out_dir = argv[1], argv[2]
    with open(os.path.join(results_dir, "results.json")) as f:
        res = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    drawn = []
    for draw in (flip_cdf, start_vs_services, idle_footprint, flap_wakeups):
        path = draw(res, results_dir, out_dir)
        if path:
            drawn.append(path)
        else:
            print(f"plots: {draw.__name__}: the run has no results for it", file=sys.stderr)
    for p in drawn:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
