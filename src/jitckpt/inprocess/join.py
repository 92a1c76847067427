"""How a hot spare or a fresh replacement joins a running job.

A spare is started by the agent with ``JITCKPT_ROLE=spare``; it warms up and
then waits for an assignment (a rank and a recovery generation) that the
agent writes in the store when a worker dies. A fresh replacement is started
with its rank and generation in its environment. Either way the process
learns its rank before the script reads it (jitckpt.init_process_group
waits here), and JitCheckpoint then joins the generation's group and
receives the state from a peer (jitckpt.inprocess.recovery).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

from jitckpt import attempt, protocol

# A spare re-checks its store wait this often (there is no failure yet).
ASSIGNMENT_WAIT = timedelta(seconds=60)


def joining() -> dict[str, Any] | None:
    """For a spare (after its assignment) or a fresh replacement: the rank it
    takes and the generation it joins; None for an ordinary worker."""
    role = protocol.role()
    if role == protocol.ROLE_REPLACEMENT:
        return {
            "rank": int(os.environ[protocol.RANK_ENV]),
            "generation": int(os.environ[protocol.JOIN_GENERATION_ENV]),
        }
    if role != protocol.ROLE_SPARE:
        return None
    assignment = await_spare_assignment()
    return {"rank": int(assignment["rank"]), "generation": int(assignment["generation"])}


_assignment: dict[str, Any] | None = None


def await_spare_assignment() -> dict[str, Any]:
    """A hot spare blocks here until the launcher assigns it a rank (once:
    jitckpt.init_process_group waits, JitCheckpoint reads the answer); RANK
    and LOCAL_RANK then say the rank it takes."""
    global _assignment
    if _assignment is not None:
        return _assignment
    spare = os.environ[protocol.SPARE_ID_ENV]
    control = protocol.ControlDir.from_env()
    if control is not None:
        # Listed with the workers, so that a node fault kills spares too.
        control.record_pid(f"spare-{spare}", os.getpid())
    assignment = await_assignment(spare)
    os.environ[protocol.RANK_ENV] = str(assignment["rank"])
    os.environ[protocol.LOCAL_RANK_ENV] = str(assignment["local_rank"])
    if control is not None:
        control.forget_pid(f"spare-{spare}")
    _assignment = assignment
    return assignment


def await_assignment(spare: str) -> dict[str, Any]:
    """Wait for the launcher's assignment of spare ``spare`` in the store."""
    store = attempt.store()
    key = protocol.INPROC_SPARE_KEY.format(spare=spare)
    while True:
        try:
            store.wait([key], ASSIGNMENT_WAIT)
            break
        except Exception:  # noqa: BLE001 - no failure yet: keep waiting
            continue
    return dict(json.loads(store.get(key).decode()))
