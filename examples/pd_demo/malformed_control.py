#!/usr/bin/env python3
"""Plays the router to one kvx_pd_demo worker process and sends it control
messages whose fields are missing or of the wrong type. The worker must close
its control channel naming the malformed message and exit cleanly (it used to
abort: the exception left its thread). A well-formed request first proves the
harness talks to a working worker.

usage: malformed_control.py PATH/TO/kvx_pd_demo
"""
import json
import socket
import subprocess
import sys

DEMO = sys.argv[1]
TIMEOUT_S = 60


def start_worker():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(TIMEOUT_S)
    spec = {"name": "colocated-0", "role": "colocated", "mode": "colocated", "control_port": srv.getsockname()[1],
            "metadata_url": "", "master": "", "prefill_tp": 1, "max_prompt": 64, "max_output": 4, "concurrency": 1}
    proc = subprocess.Popen([DEMO, "--worker", json.dumps(spec)], stderr=subprocess.PIPE, text=True)
    conn, _ = srv.accept()
    srv.close()
    conn.settimeout(TIMEOUT_S)
    io = conn.makefile("rw")
    hello = json.loads(io.readline())
    if hello.get("op") != "hello":
        sys.exit(f"FAIL: the worker's first line is {hello}")
    return proc, conn, io


def send(io, msg):
    io.write(msg + "\n")
    io.flush()


def finish(proc, conn):
    conn.close()
    _, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, err


# A well-formed request is served.
proc, conn, io = start_worker()
send(io, json.dumps({"op": "serve", "id": 16, "prompt": [1, 2, 3, 4, 5], "output": 2}))
done = json.loads(io.readline())
if done.get("op") != "done" or len(done.get("tokens", [])) != 2:
    sys.exit(f"FAIL: a good request got {done}")
send(io, json.dumps({"op": "exit"}))
rc, err = finish(proc, conn)
if rc != 0:
    sys.exit(f"FAIL: the worker exited with {rc} after 'exit': {err}")
print("ok: a well-formed request is served")

bad = [
    {"op": "serve", "id": 1, "prompt": "x", "output": 2},           # prompt is not a list of token ids
    {"op": "serve", "id": "one", "prompt": [1, 2], "output": 2},    # id is not a number
    {"op": "serve", "id": 2, "prompt": [1, 2]},                     # output is missing
]
for msg in bad:
    proc, conn, io = start_worker()
    send(io, json.dumps(msg))
    rest = io.read()  # the worker closes the channel: EOF
    rc, err = finish(proc, conn)
    if rc != 0:
        sys.exit(f"FAIL: {msg} ended the worker with {rc} (negative: a signal): {err}")
    if "malformed message" not in err:
        sys.exit(f"FAIL: {msg}: the worker did not say why it closed: {err!r}")
    if rest.strip():
        sys.exit(f"FAIL: {msg}: the worker answered {rest!r}")
    print(f"ok: {json.dumps(msg)} closes the channel: {err.strip().splitlines()[-1]}")
print("every malformed control message closed the channel cleanly")
