#!/usr/bin/env bash
# The main job in one command: build tether, start a Consul dev agent and an
# example gRPC service with grpc.health.v1, run tether with the example files
# from config/, show the service passing in Consul's health API, flip it
# NOT_SERVING and back (with how long Consul took to show each), then stop
# tether with SIGTERM and show that it left nothing behind.
#
# Every wait has a deadline; any failure prints FAIL and exits non-zero (CI
# runs this from scripts/test.sh). The last line of a good run is `== done`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/install-deps.sh
echo "== building tether and the example service"
cargo build --quiet --bin tether --example health_server
tether="$root/target/debug/tether"
server_bin="$root/target/debug/examples/health_server"

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    # Bounded: whatever has not exited after 5 s is killed.
    for _ in $(seq 50); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    if [ -s "$work/tether.log" ]; then
        echo "== tether's log:" >&2
        sed 's/^/   /' "$work/tether.log" >&2
    fi
    exit 1
}

ms() { date +%s%3N; }

# poll SECONDS COMMAND...: run COMMAND every 50 ms until it succeeds; false after SECONDS.
poll() {
    local deadline=$(($(ms) + $1 * 1000))
    shift
    until "$@"; do
        [ "$(ms)" -lt "$deadline" ] || return 1
        sleep 0.05
    done
}
# wait_until SECONDS WHAT COMMAND...: poll, and FAIL after SECONDS.
wait_until() {
    local limit=$1 what=$2
    shift 2
    poll "$limit" "$@" || fail "timed out after ${limit} s waiting for $what"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port); app=$(free_port)
consul_url="http://127.0.0.1:$http"

echo "== starting Consul dev agent on $consul_url"
"$root/.tools/bin/consul" agent -dev -bind=127.0.0.1 -client=127.0.0.1 -http-port="$http" -dns-port=-1 -grpc-port=-1 \
    -serf-lan-port="$(free_port)" -serf-wan-port="$(free_port)" -server-port="$(free_port)" -log-level=warn >"$work/consul.log" 2>&1 &
pids+=($!)
leader() { curl -sf "$consul_url/v1/status/leader" | grep -q :; }
wait_until 60 "Consul to elect itself leader" leader

echo "== starting the example gRPC service on 127.0.0.1:$app"
mkfifo "$work/ctl"
"$server_bin" "127.0.0.1:$app" <"$work/ctl" >"$work/server.log" 2>&1 &
pids+=($!)
exec 3>"$work/ctl"   # keep the control pipe open
listening() { grep -q '^listening on' "$work/server.log"; }
wait_until 10 "the example service to listen" listening
# set STATUS: tell the service, and wait until it confirmed (one more "ok" in its output).
set_status() {
    local before
    before=$(grep -c '^ok$' "$work/server.log" || true)
    echo "$1" >&3
    applied() { [ "$(grep -c '^ok$' "$work/server.log" || true)" -gt "$before" ]; }
    wait_until 5 "the example service to apply $1" applied
}

mkdir "$work/services.d"
sed -e "s|^services_dir = .*|services_dir = \"services.d\"|" -e "s|^listen = .*|listen = \"\"|" \
    -e "s|^address = .*|address = \"$consul_url\"|" config/tether.toml >"$work/tether.toml"
sed -e "s|^port = .*|port = $app|" -e 's|^# address = .*|address = "127.0.0.1"|' config/services.d/orders.toml >"$work/services.d/orders.toml"
"$tether" validate --config "$work/tether.toml"

echo "== starting tether"
RUNTIME_DIRECTORY="$work/run" RUST_LOG=info "$tether" run --config "$work/tether.toml" 2>"$work/tether.log" &
tether_pid=$!
pids+=($tether_pid)

# Consul's health API, as a client or a load balancer reads it: the number of
# orders instances (-1 if Consul did not answer), and whether one is in it
# with a critical check.
health_json() { curl -sf "$consul_url/v1/health/service/orders$1"; }
instances() { health_json "$1" 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo -1; }
has_critical_check() {
    health_json '' 2>/dev/null | python3 -c '
import json, sys
entries = json.load(sys.stdin)
sys.exit(0 if len(entries) == 1 and any(c["Status"] == "critical" for c in entries[0]["Checks"]) else 1)' 2>/dev/null
}
# The reason of orders' critical check on the agent (tether writes it right
# after the status; the agent syncs an output-only change to the catalog,
# which the health API reads, only every check_update_interval, 5 min).
reason() {
    curl -sf "$consul_url/v1/agent/checks" 2>/dev/null | python3 -c '
import json, sys
for c in json.load(sys.stdin).values():
    if c["ServiceName"] == "orders" and c["Status"] == "critical" and c["Output"]:
        print("%s %s: %s" % (c["CheckID"], c["Status"], c["Output"].strip()))' 2>/dev/null
}
has_reason() { [ -n "$(reason)" ]; }
# passing: orders is in /v1/health/service/orders?passing (every check of it passing).
passing() { [ "$(instances '?passing')" = 1 ]; }
# critical: orders is registered, a check of it is critical, and ?passing no longer lists it.
critical() { has_critical_check && [ "$(instances '?passing')" = 0 ]; }
# show [?passing]: the service and its checks as Consul's health API has them.
show() {
    echo "   GET /v1/health/service/orders$1"
    health_json "$1" | python3 -c '
import json, sys
entries = json.load(sys.stdin)
if not entries:
    print("     (no instance)")
for e in entries:
    s = e["Service"]
    print("     %s  %s:%s  tags=%s  meta=%s" % (s["ID"], s["Address"], s["Port"], s["Tags"], s["Meta"]))
    for c in e["Checks"]:
        print("       check %-28s %-9s %s" % (c["CheckID"], c["Status"], c["Output"].strip().splitlines()[0] if c["Output"].strip() else ""))'
}

t0=$(ms)
wait_until 30 "orders to be passing in /v1/health/service/orders?passing" passing
echo "== orders is registered and passing in Consul ($(($(ms) - t0)) ms after tether started):"
show '?passing'

echo "== flipping the service to NOT_SERVING"
t0=$(ms); set_status not_serving; wait_until 10 "orders to be critical" critical; t1=$(ms)
echo "   Consul shows it critical after $((t1 - t0)) ms; ?passing no longer lists it:"
show '?passing'
show ''
wait_until 10 "the reason of orders' critical check on the agent" has_reason
echo "   the reason, on the agent (GET /v1/agent/checks): $(reason)"

echo "== flipping it back to SERVING"
t0=$(ms); set_status serving; wait_until 10 "orders to be passing again" passing; t1=$(ms)
echo "   Consul shows it passing after $((t1 - t0)) ms:"
show '?passing'

echo "== stopping tether (SIGTERM): it deregisters what it owns"
kill -TERM "$tether_pid"
exited() { ! kill -0 "$tether_pid" 2>/dev/null; }
wait_until 20 "tether to exit after SIGTERM" exited
status=0; wait "$tether_pid" || status=$?
[ "$status" = 0 ] || fail "tether exited with status $status after SIGTERM"
# What is left: on the agent, any service or check (only tether registered
# any); in the catalog (what clients read), any service but Consul's own.
left() {
    python3 - "$consul_url" <<'PY'
import json, sys, urllib.request
url = sys.argv[1]
get = lambda p: json.load(urllib.request.urlopen(url + p, timeout=5))
services = get("/v1/agent/services")
checks = get("/v1/agent/checks")
catalog = get("/v1/catalog/services")
for sid, s in sorted(services.items()):
    print("service %s (%s) on the agent" % (sid, s["Service"]))
for cid, c in sorted(checks.items()):
    print("check %s (%s, service %r) on the agent" % (cid, c["Status"], c["ServiceID"]))
for name in sorted(catalog):
    if name != "consul":
        print("service %s in the catalog" % name)
PY
}
nothing_left() { [ -z "$(left 2>&1)" ]; }
if ! poll 5 nothing_left; then
    echo "   left behind:"
    left 2>&1 | sed 's/^/     /'
    fail "tether left registrations behind after SIGTERM"
fi
echo "   tether exited cleanly; nothing left: no service or check on the agent, no service but consul in the catalog"
show ''
echo "== tether's log:"
sed 's/^/   /' "$work/tether.log"
echo "== done"
