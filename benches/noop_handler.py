#!/usr/bin/env python3
# A no-op persistent executor for the benchmarks: answers every attempt at once. An attempt
# whose args are ["start-time"] first prints the time it arrived (`fleet bench --start-latency`).
import json
import sys
import time

for line in sys.stdin:
    req = json.loads(line)
    if req["args"][:1] == ["start-time"]:
        sys.stderr.write("%.6f\n" % time.time())
        sys.stderr.flush()
    sys.stdout.write('{"fencing_token": %d, "ok": true}\n' % req["fencing_token"])
    sys.stdout.flush()
