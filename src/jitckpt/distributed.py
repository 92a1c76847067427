"""Process-group setup that survives restarts by torch.distributed.elastic.

Under torchrun (and ``jitckpt run``) the agent's TCPStore outlives worker
restarts. A plain ``init_process_group("gloo")`` on a restarted attempt finds
the previous attempt's keys in it and fails with "Gloo connectFullMesh failed
... Connection refused" (PLATFORM.md; pytorch issue 135712). Building the
group over ``PrefixStore(f"jitckpt/round_{R}/attempt_{N}", store)`` gives every
attempt a fresh key space. In torch 2.13 a store built from an ``init_method`` URL is
client-only under torchrun, so the TCPStore client is built explicitly.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from jitckpt.detect import signals

# How long a worker waits to reach the agent's store. The store is already up
# when the agent starts workers, so this only bounds a misconfiguration.
STORE_CONNECT_TIMEOUT = timedelta(seconds=60)

# Side threads give up on a store request after this long (the store's host
# may be the node that died); their callers treat that as a missing beat.
SIDE_STORE_TIMEOUT = timedelta(seconds=5)

_base_store: dist.Store | None = None
_attempt_store: dist.Store | None = None


def attempt() -> int:
    """Restart attempt of this worker (0 on the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def launch_id() -> str | None:
    """The rendezvous run id: the same on every node of one job."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def init_process_group(
    backend: str = "gloo",
    timeout: timedelta | None = None,
    **kwargs: object,
) -> None:
    """Drop-in for ``torch.distributed.init_process_group`` in a jitckpt job.

    Installs the SIGTERM thread first (before gloo starts its threads), then
    initialises the default group from the launcher's environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) over a store prefix unique to this
    restart attempt. ``timeout`` is the collective timeout of the group; a
    failed peer is detected long before it in the restart path.
    """
    signals.install()
    missing = [
        name
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        if name not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"jitckpt.init_process_group needs the launcher's environment ({', '.join(missing)} "
            f"not set): start the script with `jitckpt run` (or torchrun)."
        )
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    extra: dict[str, object] = dict(kwargs)
    if timeout is not None:
        extra["timeout"] = timeout
    _group_settings.update(backend=backend, extra=extra)
    if role() != "worker":
        # A spare or replacement runs the script's setup (model, DDP,
        # optimizer) before its peers are ready to meet it: a group with no
        # communication (jitckpt.detached) lets DDP's constructor run
        # locally. JitCheckpoint then joins the job's group (jitckpt.inprocess).
        from jitckpt.inprocess import detached
        from jitckpt.inprocess import recovery as inprocess

        detached.register()
        if role() == "spare":
            # A hot spare warms up, then waits here for its assignment, so
            # that the script reads its real rank (dist.get_rank(), RANK)
            # from the start: what it then builds takes ~0.1-0.3 s.
            detached.warm_up()
            rank = int(inprocess.await_spare_assignment()["rank"])
        dist.init_process_group(
            detached.BACKEND, store=dist.HashStore(), rank=rank, world_size=world_size
        )
        return
    store = attempt_store()
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **extra)  # type: ignore[arg-type]


# What the script passed to init_process_group: groups re-formed by
# in-process recovery use the same backend and options.
_group_settings: dict[str, Any] = {"backend": "gloo", "extra": {}}

# JITCKPT_ROLE: "worker" (default), "spare" (a hot spare waiting for an
# assignment) or "replacement" (a fresh process spawned for a dead rank).
ROLE_ENV = "JITCKPT_ROLE"
# A spare's name in the store; the generation a fresh replacement joins.
SPARE_ID_ENV = "JITCKPT_SPARE_ID"
JOIN_GENERATION_ENV = "JITCKPT_JOIN_GENERATION"


def role() -> str:
    return os.environ.get(ROLE_ENV, "worker")


def generation_prefix(generation: int) -> str:
    """Store prefix of the group formed by in-process recovery ``generation``."""
    return f"{_attempt_prefix()}/gen_{generation}"


def form_group(generation: int, rank: int, world_size: int) -> None:
    """Make the default group a new one, over keys private to ``generation``.
    The caller keeps a reference to the old group (see jitckpt.inprocess):
    destroying the registry entry is instant, dropping a gloo group with
    pending work is not (PLATFORM.md)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    store = dist.PrefixStore(generation_prefix(generation), base_store())
    dist.init_process_group(  # type: ignore[call-overload]
        _group_settings["backend"],
        store=store,
        rank=rank,
        world_size=world_size,
        **_group_settings["extra"],
    )


def base_store() -> dist.Store:
    """A client of the launcher's TCPStore, shared by all attempts."""
    global _base_store
    if _base_store is None:
        _base_store = dist.TCPStore(
            host_name=os.environ["MASTER_ADDR"],
            port=int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=STORE_CONNECT_TIMEOUT,
            wait_for_workers=False,
        )
    return _base_store


def _attempt_prefix() -> str:
    return attempt_prefix(os.environ.get("JITCKPT_RDZV_ROUND", "na"), attempt())


def attempt_prefix(round_: object, attempt_: int) -> str:
    # The rendezvous round (set by jitckpt's agent) separates membership
    # changes, which do not bump the restart count.
    return f"jitckpt/round_{round_}/attempt_{attempt_}"


def side_store() -> dist.Store:
    """A second connection to this attempt's keys, for side threads (the
    heartbeat) so they never queue behind the training thread's requests."""
    client = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=SIDE_STORE_TIMEOUT,
        wait_for_workers=False,
    )
    return dist.PrefixStore(_attempt_prefix(), client)


def attempt_store() -> dist.Store:
    """Keys private to this restart attempt."""
    global _attempt_store
    if _attempt_store is None:
        _attempt_store = dist.PrefixStore(_attempt_prefix(), base_store())
    return _attempt_store


# How long ranks other than 0 wait for rank 0 to choose the checkpoint to
# restore (it reads and verifies candidates newest first).
RESTORE_CHOICE_TIMEOUT = timedelta(seconds=300)
