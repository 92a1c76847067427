"""``jitckpt.init_process_group``: the process group of a jitckpt job.

A drop-in for ``torch.distributed.init_process_group`` that survives
restarts by torch.distributed.elastic: the group is built over a store
prefix unique to the attempt (jitckpt.attempt), after the SIGTERM thread is
installed. A hot spare or a replacement for a dead rank (in-process
recovery) gets a group that never communicates until it joins the job.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from jitckpt import attempt, protocol
from jitckpt.detect import signals


def init_process_group(
    backend: str | None = "gloo",
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
        for name in (
            protocol.RANK_ENV,
            protocol.WORLD_SIZE_ENV,
            protocol.MASTER_ADDR_ENV,
            protocol.MASTER_PORT_ENV,
        )
        if name not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"jitckpt.init_process_group needs the launcher's environment ({', '.join(missing)} "
            f"not set): start the script with `jitckpt run` (or torchrun)."
        )
    rank = int(os.environ[protocol.RANK_ENV])
    world_size = int(os.environ[protocol.WORLD_SIZE_ENV])
    extra: dict[str, object] = dict(kwargs)
    if timeout is not None:
        extra["timeout"] = timeout
    attempt.record_group_settings(backend, extra)
    if protocol.role() != protocol.ROLE_WORKER:
        # A spare or replacement runs the script's setup (model, DDP,
        # optimizer) before its peers are ready to meet it: a group with no
        # communication (jitckpt.inprocess.detached) lets DDP's constructor
        # run locally. JitCheckpoint then joins the job's group.
        from jitckpt.inprocess import detached, join

        detached.register()
        if protocol.role() == protocol.ROLE_SPARE:
            # A hot spare warms up, then waits here for its assignment, so
            # that the script reads its real rank (dist.get_rank(), RANK)
            # from the start: what it then builds takes ~0.1-0.3 s.
            detached.warm_up()
            rank = int(join.await_spare_assignment()["rank"])
        dist.init_process_group(
            detached.BACKEND, store=dist.HashStore(), rank=rank, world_size=world_size
        )
        return
    dist.init_process_group(
        backend,
        store=attempt.store(),
        rank=rank,
        world_size=world_size,
        **extra,  # type: ignore[arg-type]
    )
