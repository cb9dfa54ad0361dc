#!/usr/bin/env bash
# The package under a live systemd: boots a Debian container (systemd-nspawn, systemd as its
# PID 1), installs target/debian/fleet_*.deb in it with dpkg -i, configures a one-replica
# cluster as docs/operations.md says (token file, [client] peers), starts both sandboxed units
# with systemctl, runs ordinary tasks through the worker (output, a file in its working
# directory, a background process that must end with its attempt), stops both units
# (each must exit 0: a replica's clean stop, a worker's drain) and prints the live
# `systemd-analyze security` scores. Run by .ci/run after cluster/debian/check.sh.
#
# Needs root; installs debootstrap and systemd-container if missing. The container's root file
# system is built once per machine (debootstrap, about 2 minutes) under
# /var/lib/machines/fleet-base and copied for each run.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
    echo "cluster/debian/live-systemd.sh needs root (a container); skipped"
    exit 0
fi
deb=$(ls target/debian/fleet_*.deb | head -1)
if ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap systemd-container >/dev/null
fi
base=/var/lib/machines/fleet-base
if [ ! -x "$base/lib/systemd/systemd" ]; then
    rm -rf "$base.tmp"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps bookworm \
        "$base.tmp" http://deb.debian.org/debian >/dev/null
    mv "$base.tmp" "$base"
fi
root=$(mktemp -d /var/lib/machines/fleet-live.XXXXXX)
cp -a "$base/." "$root/"
cp "$deb" "$root/root/fleet.deb"
log=$(mktemp)
systemd-nspawn --boot -D "$root" --register=no --keep-unit >"$log" 2>&1 &
nspawn=$!
cleanup() {
    local status=$?
    if [ $status != 0 ] && [ -n "${init:-}" ]; then
        echo "--- the units' journal in the container:"
        inside journalctl -u fleet -u fleet-worker --no-pager 2>/dev/null | tail -20 || true
    fi
    kill "$nspawn" 2>/dev/null || true
    wait "$nspawn" 2>/dev/null || true
    rm -rf "$root" "$log"
}
trap cleanup EXIT

# Waits (up to $1 seconds) until the command after it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "timed out waiting for: $*"
            return 1
        fi
        sleep 0.2
    done
}
init_pid() { pgrep -P "$nspawn" | head -1; }
wait_for 30 init_pid
init=$(init_pid)
inside() { nsenter -t "$init" -a /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
booted() { inside systemctl is-system-running | grep -qE 'running|degraded'; }
wait_for 60 booted
echo "container booted: systemd $(inside systemctl --version | head -1 | cut -d' ' -f2)"

inside dpkg -i /root/fleet.deb >/dev/null
inside sh -c '
set -e
cd /etc/fleet
sed -i "s/^# id = 1/id = 1/; s/^peers = \[\]/peers = [\"127.0.0.1:7101\"]/; s/^# bootstrap_expect = 3/bootstrap_expect = 1/; s|^auth_token = \"\"|auth_token_file = \"/etc/fleet/token\"|" fleet.toml
printf %s live-systemd-secret > token
chgrp fleet token
chmod 0640 token
systemctl enable --now fleet fleet-worker 2>/dev/null
'
active() { [ "$(inside systemctl is-active "$1")" = active ]; }
wait_for 30 active fleet.service
wait_for 30 active fleet-worker.service
echo "both units active (Type=notify: READY=1 received)"

# An ordinary task: output, a file in the working directory, a background process that must
# not outlive its attempt.
id=$(inside fleet submit -- sh -c 'echo "hello from $(id -un) in $(pwd)"; echo kept > out.txt; cat out.txt; sleep 300 & echo started background')
succeeded() { inside fleet task show "$id" | grep -q 'state: *succeeded'; }
wait_for 30 succeeded
out=$(inside fleet logs "$id")
echo "$out"
echo "$out" | grep -q "hello from fleet in /var/lib/fleet-worker"
echo "$out" | grep -q "^kept$"
no_sleep_left() { ! inside pgrep -x sleep; }
wait_for 10 no_sleep_left
echo "the task's background process ended with its attempt"

inside systemctl stop fleet-worker fleet
for unit in fleet-worker fleet; do
    result=$(inside systemctl show "$unit" -p Result --value)
    status=$(inside systemctl show "$unit" -p ExecMainStatus --value)
    echo "$unit stopped: Result=$result, exit status $status"
    [ "$result" = success ] && [ "$status" = 0 ]
done
inside systemd-analyze security fleet.service fleet-worker.service | tail -2
echo "live systemd: both units ran, served and stopped cleanly"
