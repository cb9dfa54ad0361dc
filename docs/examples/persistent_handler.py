#!/usr/bin/env python3
"""A fleet persistent executor: one attempt per JSON line on stdin, one result line on stdout."""
import json, sys, time  # and heavy libraries: imported once per process, not per task

def handle(args, env):
    """The task's work. Output goes to stderr; an exception fails the attempt."""
    if args[0] == "sleep":
        time.sleep(float(args[1]))
    elif args[0] == "fail":
        raise RuntimeError(" ".join(args[1:]) or "failed")
    print("handled", args, file=sys.stderr, flush=True)

for line in sys.stdin:  # one attempt at a time, until the worker closes stdin
    req = json.loads(line)  # task, attempt, fencing_token, queue, args, env, execution_timeout_ms
    result = {"fencing_token": req["fencing_token"], "ok": True}
    try:
        handle(req["args"], req["env"])
    except Exception as e:
        result.update(ok=False, error=str(e))
    print(json.dumps(result), flush=True)
