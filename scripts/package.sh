#!/usr/bin/env bash
# Builds the Debian package target/debian/tether_<version>_amd64.deb
# ($CARGO_TARGET_DIR/debian/ if that is set):
#   1. a statically linked release build of tether (one build; `cargo deb`
#      does not build again);
#   2. man pages and bash/zsh/fish completions generated from the CLI by
#      src/bin/tether-generate.rs into packaging/generated/;
#   3. `cargo deb --no-build --strip`, with [package.metadata.deb] in Cargo.toml.
# Needs cargo-deb (scripts/install-deps.sh installs it). Prints the .deb's path
# as its last line. Install it with `sudo apt install ./target/debian/tether_*.deb`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'package: %s\n' "$*" >&2; }

cargo deb --version >/dev/null 2>&1 || { log "cargo-deb is missing: run scripts/install-deps.sh"; exit 1; }

version=$(cargo pkgid --locked | sed 's/.*[#@]//')
changelog_version=$(sed -n '1s/^tether (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [ "$changelog_version" != "$version" ]; then
    log "packaging/debian/changelog's first entry is $changelog_version but Cargo.toml says $version: add an entry for $version"
    exit 1
fi

target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac

# One packaging at a time per target dir (packaging/generated/ is shared too).
mkdir -p "$target/debian"
exec 9>"$target/debian/.package.lock"
flock 9

# Statically linked (glibc static-pie): no ld.so, libc.so and libm mapped
# into every tether, 1.3 MB less resident per sidecar (docs/BENCHMARKS.md).
# --target keeps the flag off build scripts and proc-macros.
host="$(rustc -vV | sed -n 's/^host: //p')"
host_env="$(echo "$host" | tr 'a-z-' 'A-Z_')"
log "release build, statically linked (CARGO_TARGET_DIR=$target, --target $host)"
env "CARGO_TARGET_${host_env}_RUSTFLAGS=-C target-feature=+crt-static" \
    cargo build --release --locked --target "$host" --bin tether
tether="$target/$host/release/tether"

gen="$root/packaging/generated"
rm -rf "$gen"
# The generator is a separate (debug) binary: the daemon carries none of it.
cargo build --locked --quiet --bin tether-generate
generate="$target/debug/tether-generate"
"$generate" man --out "$gen/man"
for shell in bash zsh fish; do
    "$generate" completions "$shell" --out "$gen/completions"
done
log "generated $(ls "$gen/man" | wc -l) man pages and $(ls "$gen/completions" | wc -l) completion scripts"

deb="$target/debian/tether_${version}_amd64.deb"
rm -f "$deb"
cargo deb --no-build --strip --locked --target "$host" --output "$deb"
[ -f "$deb" ] || { log "cargo deb did not write $deb"; exit 1; }
log "built $deb ($(stat -c %s "$deb") bytes)"
echo "$deb"
