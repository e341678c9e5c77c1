#!/usr/bin/env bash
# The main job in one command: build tether, start a Consul dev agent and an
# example gRPC service with grpc.health.v1, run tether with the example files
# from config/, show the service passing in Consul, flip it NOT_SERVING and
# back, then stop everything cleanly.
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
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port); app=$(free_port)
consul_url="http://127.0.0.1:$http"

echo "== starting Consul dev agent on $consul_url"
"$root/.tools/bin/consul" agent -dev -bind=127.0.0.1 -client=127.0.0.1 -http-port="$http" -dns-port=-1 -grpc-port=-1 \
    -serf-lan-port="$(free_port)" -serf-wan-port="$(free_port)" -server-port="$(free_port)" -log-level=warn >"$work/consul.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "$consul_url/v1/status/leader" | grep -q : && break; sleep 0.1; done

echo "== starting the example gRPC service on 127.0.0.1:$app"
mkfifo "$work/ctl"
"$server_bin" "127.0.0.1:$app" <"$work/ctl" >"$work/server.log" 2>&1 &
pids+=($!)
exec 3>"$work/ctl"   # keep the control pipe open

mkdir "$work/services.d"
sed -e "s|^services_dir = .*|services_dir = \"services.d\"|" -e "s|^listen = .*|listen = \"\"|" \
    -e "s|^address = .*|address = \"$consul_url\"|" config/tether.toml >"$work/tether.toml"
sed -e "s|^port = .*|port = $app|" -e 's|^# address = .*|address = "127.0.0.1"|' config/services.d/orders.toml >"$work/services.d/orders.toml"
"$tether" validate --config "$work/tether.toml"

echo "== starting tether"
RUNTIME_DIRECTORY="$work/run" RUST_LOG=info "$tether" run --config "$work/tether.toml" 2>"$work/tether.log" &
tether_pid=$!
pids+=($tether_pid)

show() {
    curl -s "$consul_url/v1/health/checks/orders" | python3 -c '
import json, sys
for c in json.load(sys.stdin):
    print("   %-28s %-9s %s" % (c["CheckID"], c["Status"], c["Output"]))'
}
wait_status() { # $1 = passing|critical
    for _ in $(seq 200); do
        s=$(curl -s "$consul_url/v1/agent/checks" | python3 -c 'import json,sys; c=json.load(sys.stdin); print(next((v["Status"] for k,v in c.items() if k.startswith("tether:orders")), "none"))')
        [ "$s" = "$1" ] && return 0
        sleep 0.05
    done
    echo "timed out waiting for $1" >&2; return 1
}
ms() { date +%s%3N; }

wait_status passing
echo "== orders is registered and passing in Consul:"
curl -s "$consul_url/v1/catalog/service/orders" | python3 -c '
import json, sys
for s in json.load(sys.stdin):
    print("   id=%s address=%s:%s tags=%s meta=%s" % (s["ServiceID"], s["ServiceAddress"], s["ServicePort"], s["ServiceTags"], s["ServiceMeta"]))'
show

echo "== flipping the service to NOT_SERVING"
t0=$(ms); echo not_serving >&3; wait_status critical; t1=$(ms)
echo "   Consul shows it critical after $((t1 - t0)) ms:"
show

echo "== flipping it back to SERVING"
t0=$(ms); echo serving >&3; wait_status passing; t1=$(ms)
echo "   Consul shows it passing after $((t1 - t0)) ms:"
show

echo "== stopping tether (SIGTERM): it deregisters what it owns"
kill -TERM "$tether_pid"; wait "$tether_pid" || true
curl -s "$consul_url/v1/agent/services" | python3 -c 'import json,sys; print("   services left on the agent:", sorted(json.load(sys.stdin)) or "none")'
echo "== tether's log:"
sed 's/^/   /' "$work/tether.log"
echo "== done"
