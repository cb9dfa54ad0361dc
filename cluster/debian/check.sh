#!/usr/bin/env bash
# Installs target/debian/fleet_*.deb on this machine (root) and checks what it installed:
# the binary runs, the fleet user and directories exist, the units pass
# `systemd-analyze verify`, and `systemd-analyze security` scores them (printed; the
# figures are recorded in docs/operations.md). Run by .ci/run after cluster/debian/build.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
deb=$(ls target/debian/fleet_*.deb | head -1)
if [ "$(id -u)" != 0 ]; then
    echo "cluster/debian/check.sh needs root (dpkg -i); skipped"
    exit 0
fi
dpkg -i "$deb"
fleet --version
id fleet
test "$(stat -c %U /var/lib/fleet)" = fleet
test "$(stat -c %G /etc/fleet/fleet.toml)" = fleet
test -f /usr/share/man/man1/fleet.1.gz
test -f /usr/share/bash-completion/completions/fleet
fleet --config /etc/fleet/fleet.toml config show >/dev/null
out=$(systemd-analyze verify /lib/systemd/system/fleet.service /lib/systemd/system/fleet-worker.service 2>&1)
if [ -n "$out" ]; then
    echo "systemd-analyze verify: $out"
    exit 1
fi
echo "systemd-analyze verify: both units pass"
for unit in fleet.service fleet-worker.service; do
    systemd-analyze security --offline=yes "/lib/systemd/system/$unit" | tail -1
done
