#!/usr/bin/env bash
# Installs everything the build and the tests need, idempotently:
#   - protoc (Debian's protobuf-compiler), needed at build time by etcd-client;
#   - the Debian packaging tools (scripts/package.sh and its test): cargo-deb
#     (crates.io, pinned), lintian, dpkg-dev (dpkg-shlibdeps), binutils (strip)
#     and systemd-analyze (apt);
#   - Go and the Go sources the interop tests' grpc-go peers are built from
#     (apt: golang-go, golang-google-grpc-dev = grpc-go 1.33,
#     golang-etcd-server-dev = etcd 3.4 with clientv3/naming/resolver), built
#     offline in GOPATH mode by tests/support (see tests/go/);
#   - Consul 1.8.7 (Debian bullseye's `consul`) and etcd 3.4.23 (bookworm's
#     `etcd-server`, `etcd-client`), unpacked into the git-ignored .tools/ folder
#     without touching the system's apt configuration;
#   - a Python venv at .tools/venv with grpcio and grpcio-health-checking
#     (PyPI): the reference Python health servicer the tests run
#     (tests/python/health_server.py); and matplotlib (PyPI), which draws the
#     benchmark's plots (bench/plots.py, run by scripts/bench.sh); all pinned,
#     with what they pull in, by scripts/requirements.txt;
#   - promtool, from Debian's `prometheus` package, unpacked into .tools/ (the
#     alert rules' check, tests/ops/dashboard.rs).
# Afterwards: .tools/bin/{consul,etcd,etcdctl,promtool}, `go` and .tools/venv/bin/python exist.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
bin="$tools/bin"
mkdir -p "$bin"

log() { printf 'install-deps: %s\n' "$*" >&2; }

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- system packages (apt): protoc; Go and grpc-go/etcd sources --------------
# Installed only when missing (dpkg-query), one apt-get update at most.
missing=()
for pkg in protobuf-compiler golang-go golang-google-grpc-dev golang-etcd-server-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt)"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3/naming/resolver ] \
    || { log "go.etcd.io/etcd/clientv3/naming/resolver is missing under /usr/share/gocode/src"; exit 1; }

# --- packaging: lintian, dpkg-shlibdeps, strip, systemd-analyze (apt) --------
apt_missing=()
command -v lintian >/dev/null 2>&1 || apt_missing+=(lintian)
command -v dpkg-shlibdeps >/dev/null 2>&1 || apt_missing+=(dpkg-dev)
command -v strip >/dev/null 2>&1 || apt_missing+=(binutils)
command -v systemd-analyze >/dev/null 2>&1 || apt_missing+=(systemd)
if [ ${#apt_missing[@]} -gt 0 ]; then
    log "installing ${apt_missing[*]} (apt)"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

# --- cargo-deb (crates.io), pinned: 3.8.0 builds with rustc 1.85+ -------------
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null | awk '{ print $NF }')" != "$cargo_deb_version" ]; then
    log "installing cargo-deb $cargo_deb_version (cargo install --locked; a few minutes)"
    cargo install cargo-deb --version "$cargo_deb_version" --locked --quiet
fi

# --- Python grpcio and matplotlib (PyPI, pinned) in a private venv -----------
# scripts/requirements.txt pins them and everything they pull in; the venv
# keeps a copy of the file it was built from, and is rebuilt when they differ.
requirements="$root/scripts/requirements.txt"
venv="$tools/venv"
venv_ok() {
    [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.txt" &&
        "$venv/bin/python" -c 'import grpc, grpc_health.v1.health, matplotlib' >/dev/null 2>&1
}
if ! venv_ok; then
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "installing python3 python3-venv (apt)"
        sudo_if_needed apt-get update -qq
        sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
    fi
    log "creating $venv from scripts/requirements.txt (grpcio, grpcio-health-checking, matplotlib; pip)"
    python3 -m venv --clear "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
    venv_ok || { log "$venv/bin/python cannot import grpc, grpc_health and matplotlib from scripts/requirements.txt"; exit 1; }
fi

# --- promtool (Debian's `prometheus`), privately ------------------------------
# Checks contrib/prometheus/tether.rules.yml (tests/ops/dashboard.rs). Only the
# promtool binary is unpacked into .tools: installing the package would also
# start a Prometheus server.
if ! { [ -x "$bin/promtool" ] && "$bin/promtool" --version >/dev/null 2>&1; }; then
    log "unpacking promtool from Debian's prometheus package into $tools/promtool"
    prom_dir="$tools/promtool"
    rm -rf "$prom_dir"
    mkdir -p "$prom_dir/debs"
    ( cd "$prom_dir/debs"
      apt-get download -qq prometheus 2>/dev/null \
          || { sudo_if_needed apt-get update -qq && apt-get download -qq prometheus; } )
    dpkg-deb --fsys-tarfile "$prom_dir"/debs/prometheus_*.deb | tar -x -C "$prom_dir" ./usr/bin/promtool
    rm -rf "$prom_dir/debs"
    ln -sf "$prom_dir/usr/bin/promtool" "$bin/promtool"
    "$bin/promtool" --version 2>&1 | sed -n 1p >&2
fi

# --- Consul and etcd from Debian packages, privately -------------------------
have() { [ -x "$bin/$1" ] && "$bin/$1" "$2" >/dev/null 2>&1; }
if have consul version && have etcd --version && have etcdctl version; then
    log "consul, etcd and etcdctl already in $bin"
    exit 0
fi

# Use the same mirror the machine's own apt sources use.
mirror=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { log "cannot find a Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"; exit 1; }
log "using mirror $mirror"

apt_dir="$tools/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/debs"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat > "$apt_dir/sources.list" <<SRC
deb [signed-by=$keyring] $mirror bullseye main
deb [signed-by=$keyring] $mirror bookworm main
SRC
apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir/debs"
          -o APT::Get::List-Cleanup=0)
log "apt-get update (private lists in $apt_dir)"
apt-get "${apt_opts[@]}" update -qq

cd "$apt_dir/debs"
# bullseye's consul 1.8.7; bookworm's etcd 3.4.23.
consul_ver=$(apt-cache "${apt_opts[@]}" madison consul | awk -F'|' '/bullseye/ { gsub(/ /, "", $2); print $2; exit }')
etcd_ver=$(apt-cache "${apt_opts[@]}" madison etcd-server | awk -F'|' '/bookworm/ { gsub(/ /, "", $2); print $2; exit }')
[ -n "$consul_ver" ] || { log "consul not found in bullseye"; exit 1; }
[ -n "$etcd_ver" ] || { log "etcd-server not found in bookworm"; exit 1; }
log "downloading consul=$consul_ver etcd-server=$etcd_ver etcd-client=$etcd_ver"
apt-get "${apt_opts[@]}" download -qq "consul=$consul_ver" "etcd-server=$etcd_ver" "etcd-client=$etcd_ver"

unpack="$tools/root"
mkdir -p "$unpack"
for deb in consul_*.deb etcd-server_*.deb etcd-client_*.deb; do
    dpkg-deb -x "$deb" "$unpack"
done
# No `| head` under pipefail: the writer can die of SIGPIPE (exit 141).
find_bin() { find "$unpack/usr" -type f -name "$1" -perm -u+x -print -quit; }
for name in consul etcd etcdctl; do
    path=$(find_bin "$name")
    [ -n "$path" ] || { log "no $name binary inside the unpacked packages"; exit 1; }
    ln -sf "$path" "$bin/$name"
done
"$bin/consul" version | sed -n 1p >&2
"$bin/etcd" --version | sed -n 1p >&2
log "done: $bin"
