#!/usr/bin/env bash
# Builds the Debian package target/debian/tether_<version>_amd64.deb
# ($CARGO_TARGET_DIR/debian/ if that is set):
#   1. a release build of tether (one build; `cargo deb` does not build again);
#   2. man pages and bash/zsh/fish completions generated from the CLI by the
#      built binary (`tether generate`, hidden) into packaging/generated/;
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

log "release build (CARGO_TARGET_DIR=$target)"
cargo build --release --locked --bin tether
tether="$target/release/tether"

gen="$root/packaging/generated"
rm -rf "$gen"
"$tether" generate man --out "$gen/man"
for shell in bash zsh fish; do
    "$tether" generate completions "$shell" --out "$gen/completions"
done
log "generated $(ls "$gen/man" | wc -l) man pages and $(ls "$gen/completions" | wc -l) completion scripts"

deb="$target/debian/tether_${version}_amd64.deb"
rm -f "$deb"
cargo deb --no-build --strip --locked --output "$deb"
[ -f "$deb" ] || { log "cargo deb did not write $deb"; exit 1; }
log "built $deb ($(stat -c %s "$deb") bytes)"
echo "$deb"
