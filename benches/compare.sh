#!/usr/bin/env bash
# fleet side by side with etcd and a PostgreSQL queue, in one run (benches/compare.py says what
# is measured and how).
#
#   benches/compare.sh [--quick] [--rounds N] [--out DIR]
#
# Installs what is missing (Debian's etcd-server, etcd-client, postgresql, and
# protobuf-compiler + libprotobuf-dev for the etcd load client), builds fleet and the load
# generators (benches/peers, a separate package), then runs the comparison. `--quick` (one
# round, short levels; CI runs it) takes under 3 minutes once built and asserts nothing about
# speed; a full run takes under 20. The report goes to DIR (default compare-out/): report.md,
# report.json, writes.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler libprotobuf-dev)
[ -x /usr/lib/postgresql/15/bin/initdb ] || [ -x /usr/lib/postgresql/16/bin/initdb ] || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "compare.sh: missing ${need[*]}; install them (apt-get install ${need[*]})" >&2
        exit 2
    fi
    echo "compare.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts the packaged services where it can; the comparison runs its own instances.
if command -v systemctl >/dev/null 2>&1; then
    systemctl stop etcd postgresql 2>/dev/null || true
fi
cargo build --release --quiet
cargo build --release --quiet --manifest-path benches/peers/Cargo.toml
exec python3 benches/compare.py "$@"
