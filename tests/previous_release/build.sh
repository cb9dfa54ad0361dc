#!/bin/sh
# Builds the previous release of fleet once and prints the path of its binary.
#
# The previous release is the commit named in COMMIT next to this script (fleet 0.1.0 at
# protocol 6: the last commit before versioned formats, backups, recovery and live output).
# Its source comes out of this repository's history (`git archive`), and it is built in its
# own target directory under the cache, outside the checkout:
# ${FLEET_PREVIOUS_CACHE:-~/.cache/fleet/previous-release}/<commit>/fleet. A second call
# prints the cached binary at once, so the rolling-upgrade test (tests/upgrade.rs) pays the
# build (about 5 minutes on 2 cores) once per machine, not once per run; .ci/run calls this
# before the tests, outside their timing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
commit=$(tr -d '[:space:]' < "$here/COMMIT")
cache=${FLEET_PREVIOUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleet/previous-release}
bin="$cache/$commit/fleet"
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi
if ! git -C "$repo" cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "build.sh: commit $commit is not in $repo's history (a shallow clone?); fetch it with: git fetch --unshallow" >&2
    exit 1
fi
src="$cache/$commit/src"
rm -rf "$src"
mkdir -p "$src"
git -C "$repo" archive "$commit" | tar -x -C "$src"
echo "build.sh: building fleet at $commit in $cache/target (once per machine)" >&2
# From inside the source tree, so its .cargo/config.toml applies.
(cd "$src" && CARGO_TARGET_DIR="$cache/target" cargo build --locked --bin fleet >&2)
cp "$cache/target/debug/fleet" "$bin.tmp"
mv "$bin.tmp" "$bin"
rm -rf "$src"
echo "$bin"
