"""Signals sent to a real subprocess at a known instant inside a step, for the resume tests.

The child says where it is by printing a line (``ready``) and then waits for a line on stdin;
the parent sends the signal while the child waits, then lets it go on. The signal so lands at
the same instant every run (deterministic, never flaky), and that instant can be inside a step
(`pause_on_call` pauses in, say, the teacher's forward pass), which is where a torn step would
show.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: The repository root, for a child that imports the tests' helpers.
ROOT = Path(__file__).resolve().parents[1]

#: The line a paused child prints (`pause_on_call`).
READY = "carv-test: paused"


def pause_on_call(owner, name: str, call: int, ready: str = READY) -> None:
    """In the child: replace ``owner.name`` so that its ``call``-th call (counted from 1) prints
    ``ready``, waits for a line on stdin, and then runs as usual."""
    real = getattr(owner, name)
    count = [0]

    def paused(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            print(ready, flush=True)
            sys.stdin.readline()
        return real(*args, **kwargs)

    setattr(owner, name, paused)


def signal_when_ready(
    argv: Sequence[str], sig: int, ready: str = READY, timeout: float = 120.0
) -> tuple[int, list[str], str]:
    """Run ``python *argv``; when it prints ``ready``, send ``sig`` and a line on its stdin.

    Returns:
        ``(returncode, stdout lines, stderr)``.

    Raises:
        AssertionError: if the child ends without printing ``ready``.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    child = subprocess.Popen(
        [sys.executable, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        for line in child.stdout:
            lines.append(line.rstrip("\n"))
            if lines[-1] == ready:
                child.send_signal(sig)
                try:
                    child.stdin.write("go\n")
                    child.stdin.flush()
                except BrokenPipeError:  # SIGKILL: the child is gone already
                    pass
                break
        rest, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert ready in lines, (lines, err[-2000:])
    return child.returncode, lines + rest.splitlines(), err
