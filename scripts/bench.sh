#!/usr/bin/env bash
# tether's benchmark suite (not part of the tests): detection latency against
# Consul's own gRPC check, crash detection, config pick-up, footprint with
# 10/100/1000 services and the registries' own cost, in one run against one
# Consul dev agent and one etcd on loopback. See docs/BENCHMARKS.md.
#
#   scripts/bench.sh [--quick] [--only PHASES] [--out DIR] [-- extra bench/run.py options]
#
#   --quick     smoke run (~9 min): 10 flips, 10 and 100 services, 10 s windows
#   --only P    run only these phases (comma-separated), e.g. --only scale:
#               1,000 services over 10 servers, Consul's own floor (~7 min)
#   --out DIR   where results.json, report.md, img/ (the plots) and logs/ go
#               (default: $CARGO_TARGET_DIR/bench-results/<UTC time>, target/ if unset)
# Other options go to bench/run.py (e.g. --flips 80, --seed 1, --keep,
# --phases calibration,detection); see python3 bench/run.py --help.
# Phases: calibration baseline detection crash config etcd rotation footprint scale flap cross
# (--only flap: a grpc-go server toggled every 25 ms for 20 s with flap damping
# on and off, Consul and etcd, ~6 min; --only cross: a flip on one client
# agent of a 3-server Consul cluster, seen by a blocking query on another,
# tether against Consul's own check, ~4 min).
#
# At the end the plots are drawn from results.json into OUT/img by
# bench/plots.py (matplotlib from the venv of scripts/install-deps.sh); again
# at any time with: .tools/venv/bin/python bench/plots.py OUT OUT_DIR.
#
# Builds tether and the example health server in release mode with
# CARGO_TARGET_DIR (default target/), and the grpc-go client and server of tests/go. A
# full run takes about 30 minutes on a 2-core machine (the scale phase about 13
# of them, cross about 4). Every process it starts is stopped at the end, also on error or
# Ctrl-C (run.py: try/finally, PR_SET_PDEATHSIG).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

out=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        --only) args+=(--phases "$2"); shift 2 ;;
        --only=*) args+=(--phases "${1#--only=}"); shift ;;
        --) shift; args+=("$@"); break ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done

target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
[ -n "$out" ] || out="$target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)"

bash scripts/install-deps.sh
echo "== building tether (release, statically linked as scripts/package.sh ships it) and the example health server (release, CARGO_TARGET_DIR=$target)" >&2
host="$(rustc -vV | sed -n 's/^host: //p')"
host_env="$(echo "$host" | tr 'a-z-' 'A-Z_')"
env "CARGO_TARGET_${host_env}_RUSTFLAGS=-C target-feature=+crt-static" CARGO_TARGET_DIR="$target" \
    cargo build --release --quiet --target "$host" --bin tether
CARGO_TARGET_DIR="$target" cargo build --release --quiet --example health_server
echo "== building the grpc-go client and server (tests/go/etcdclient, tests/go/healthserver; GOPATH mode, Debian's grpc-go 1.33 and etcd 3.4 sources)" >&2
for prog in etcdclient healthserver; do
    GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$target/release/go/cache" GOFLAGS="" \
        go build -o "$target/release/go/$prog" "./tests/go/$prog"
done

command -v python3 >/dev/null || { echo "bench.sh: python3 (3.11+) is needed" >&2; exit 1; }
python3 - <<'PY' || { echo "bench.sh: python3 3.11 or newer is needed" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

cmd="scripts/bench.sh"
[ ${#args[@]} -gt 0 ] && cmd="$cmd ${args[*]}"
# exec: SIGTERM, SIGINT and SIGHUP reach run.py itself, which stops everything
# it started in a `finally`; its children also get SIGKILL if it dies
# (PR_SET_PDEATHSIG). Nothing else runs in this script from here on.
exec python3 bench/run.py \
    --tether "$target/$host/release/tether" \
    --health-server "$target/release/examples/health_server" \
    --go-client "$target/release/go/etcdclient" \
    --go-server "$target/release/go/healthserver" \
    --tools "$root/.tools/bin" \
    --plots-python "$root/.tools/venv/bin/python" \
    --out "$out" \
    --command "$cmd" \
    ${args[@]+"${args[@]}"}
