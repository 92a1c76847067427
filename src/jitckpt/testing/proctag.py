"""Processes marked by a tag in their environment, for tests and benchmarks.

Workers started by torch.distributed.elastic run in sessions of their own,
so killing a launcher's process group would orphan them. A command that
must leave nothing behind therefore starts everything with a unique value
of an environment variable (inherited by every descendant, whatever its
session), and cleanup SIGKILLs every process whose environment holds that
exact ``NAME=value``, by pid. No other process is touched.
"""

from __future__ import annotations

import os
import signal
import time


def tagged_pids(var: str, tag: str) -> list[int]:
    """Processes (other than this one) whose environment has ``var=tag``."""
    needle = f"{var}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return found


def kill_tagged(var: str, tag: str, rounds: int = 1, pause_s: float = 0.05) -> list[int]:
    """SIGKILL every process with the tag; returns the pids killed.

    With ``rounds`` > 1 it scans again after ``pause_s`` until none is left
    (a launcher killed mid-restart may have spawned a worker after the
    first scan)."""
    killed: list[int] = []
    for index in range(rounds):
        pids = tagged_pids(var, tag)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if index + 1 < rounds:
            time.sleep(pause_s)
    return killed
