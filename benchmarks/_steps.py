"""Run ``pseudohealthy`` subcommands as the steps of a protocol: echoed, timed, logged."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time


def run(cmd: list[str], log: list[dict], *, capture: bool = False) -> str:
    """Run ``python -m pseudohealthy ...``, echo it, record it with its duration; exit on failure."""
    full = [sys.executable, "-m", "pseudohealthy", *cmd]
    print("$ pseudohealthy " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(full, text=True, capture_output=capture, env=os.environ.copy())
    seconds = round(time.perf_counter() - t0, 1)
    log.append({"command": "pseudohealthy " + shlex.join(cmd), "seconds": seconds, "rc": proc.returncode})
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"step failed (exit {proc.returncode}): pseudohealthy {shlex.join(cmd)}")
    if capture:
        sys.stdout.write(proc.stdout)
    return proc.stdout if capture else ""
