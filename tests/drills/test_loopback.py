"""A `--standalone` job listens on loopback only: the c10d store holds the
control keys (a kill request SIGKILLs a worker) and torch's rendezvous
unpickles what it reads there, so no other host may reach it. The test
reads the listening TCP sockets of every process of a running job from
/proc and requires each to be bound to 127.0.0.1."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from jobs import TINY, jitckpt_run, show

from jitckpt.testing.proctag import tagged_pids
from jitckpt.testing.sockets import listening

PROBE_VAR = "JITCKPT_LISTEN_PROBE"


def test_a_standalone_job_listens_on_loopback_only(tmp_path: Path) -> None:
    probe = uuid.uuid4().hex
    seen: dict[int, set[tuple[str, int]]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in tagged_pids(PROBE_VAR, probe):
                seen.setdefault(pid, set()).update(listening(pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        launch = jitckpt_run(
            str(TINY), "--run-dir", str(tmp_path / "run"), "--steps", "4", "--sleep-after", "2",
            nproc=2, env={PROBE_VAR: probe},
        )  # fmt: skip
    finally:
        done.set()
        watcher.join()
    assert launch.returncode == 0, show(launch)
    sockets = set().union(*seen.values())
    print(f"{len(seen)} processes of the job; pid -> listening sockets: {seen}")
    assert sockets, "the job's store was never seen listening"
    assert {address for address, _port in sockets} == {"127.0.0.1"}, seen
