#!/usr/bin/env bash
# Builds target/debian/fleet_*.deb: the release binary, its man pages and shell completions
# (generated from the CLI definition by the binary itself), then `cargo deb`.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v cargo-deb >/dev/null 2>&1; then
    cargo install cargo-deb --locked --version "^3"
fi
cargo build --release --bin fleet
rm -rf target/assets
target/release/fleet generate-assets target/assets
# Stripped: the release profile keeps debug info for profiling, which the package does not need.
cargo deb --no-build --strip
