"""This worker's attempt of the job: who it is, and the c10d store clients
it talks to the launcher and its peers through.

Under torchrun (and ``jitckpt run``) the agent's TCPStore outlives worker
restarts, so every attempt works under a key prefix of its own
(jitckpt.protocol.attempt_prefix): a restarted attempt never meets the keys
of a dead one (docs/platform.md, "Restarts under torchrun share one store").
In torch 2.13 a store built from an ``init_method`` URL is client-only under
torchrun, so the TCPStore clients are built explicitly.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from jitckpt import protocol

# How long a worker waits to reach the agent's store. The store is already up
# when the agent starts workers, so this only bounds a misconfiguration.
STORE_CONNECT_TIMEOUT = timedelta(seconds=60)

# Side threads give up on a store request after this long (the store's host
# may be the node that died); their callers treat that as a missing beat.
SIDE_STORE_TIMEOUT = timedelta(seconds=5)

_base_store: dist.Store | None = None
_attempt_store: dist.Store | None = None

# What the script passed to init_process_group: groups re-formed by
# in-process recovery use the same backend and options.
_group_settings: dict[str, Any] = {"backend": "gloo", "extra": {}}


def number() -> int:
    """Restart attempt of this worker (0 on the first start)."""
    return protocol.restart_count()


def prefix() -> str:
    """Store prefix of this attempt's keys."""
    return protocol.attempt_prefix(os.environ.get(protocol.RDZV_ROUND_ENV, "na"), number())


def rank_and_world() -> tuple[int, int]:
    """This rank and the world size: from the default group if there is one,
    else from the launcher's environment (1 process without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return (
        int(os.environ.get(protocol.RANK_ENV, "0")),
        int(os.environ.get(protocol.WORLD_SIZE_ENV, "1")),
    )


def uses_store(world_size: int) -> bool:
    """Ranks coordinate through the launcher's store: a process group of more
    than one rank, started by a launcher."""
    return (
        dist.is_available()
        and dist.is_initialized()
        and world_size > 1
        and protocol.MASTER_ADDR_ENV in os.environ
    )


def record_group_settings(backend: str | None, extra: dict[str, Any]) -> None:
    _group_settings.update(backend=backend, extra=dict(extra))


def group_settings() -> tuple[str | None, dict[str, Any]]:
    """The backend and options the script's group was made with."""
    return _group_settings["backend"], dict(_group_settings["extra"])


def _client(timeout: timedelta) -> dist.TCPStore:
    return dist.TCPStore(
        host_name=os.environ[protocol.MASTER_ADDR_ENV],
        port=int(os.environ[protocol.MASTER_PORT_ENV]),
        is_master=False,
        timeout=timeout,
        wait_for_workers=False,
    )


def base_store() -> dist.Store:
    """A client of the launcher's TCPStore, shared by all attempts."""
    global _base_store
    if _base_store is None:
        _base_store = _client(STORE_CONNECT_TIMEOUT)
    return _base_store


def store() -> dist.Store:
    """Keys private to this restart attempt."""
    global _attempt_store
    if _attempt_store is None:
        _attempt_store = dist.PrefixStore(prefix(), base_store())
    return _attempt_store


def side_store() -> dist.Store:
    """A second connection to this attempt's keys, for side threads (the
    heartbeat) so they never queue behind the training thread's requests."""
    return dist.PrefixStore(prefix(), _client(SIDE_STORE_TIMEOUT))
