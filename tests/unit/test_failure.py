"""The failure path's decisions (jitckpt.checkpoint.failure): what caused a
failure, and how suspects are named."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from jitckpt.checkpoint.failure import classify_exception, describe_suspects, peer_lost
from jitckpt.errors import InjectedFault


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"
        ),
        RuntimeError("Gloo connectFullMesh failed with ..."),
        RuntimeError("NCCL communicator was aborted"),
        RuntimeError("recv: Connection reset by peer"),
        RuntimeError("write: Broken pipe"),
        dist.DistError("a collective failed"),
    ],
)
def test_a_collective_that_failed_under_a_dead_peer_is_a_collective_error(
    exc: BaseException,
) -> None:
    assert classify_exception(exc) == "collective_error"


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad batch"),
        KeyError("gloo"),  # the marker in a non-RuntimeError does not count
        RuntimeError("CUDA out of memory"),
        InjectedFault("injected fault raise@step=3,rank=0 (gloo)"),  # always this rank's own
        ZeroDivisionError(),
    ],
)
def test_anything_else_is_this_ranks_own_exception(exc: BaseException) -> None:
    assert classify_exception(exc) == "exception"


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported",
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: unspecified launch failure",
    ],
)
def test_a_poisoned_cuda_context_needs_a_new_process(message: str) -> None:
    assert classify_exception(RuntimeError(message)) == "cuda_error"
    # Out of memory leaves the context usable: this rank's own exception.
    assert classify_exception(RuntimeError("CUDA out of memory. Tried to allocate")) == "exception"


def test_suspects_are_named_in_rank_order() -> None:
    assert describe_suspects({3: "hung", 1: "dead"}) == "rank 1 dead, rank 3 hung"
    assert describe_suspects({}) == "none named"


@pytest.mark.parametrize(
    ("message", "lost"),
    [
        ("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:26267", True),
        (
            "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1442: Connection reset by peer",
            True,
        ),
        ("[../gloo/transport/tcp/pair.cc:589] Write error: Broken pipe", True),
        # The script's own collective bug: its traceback stays on the console.
        (
            "[enforce fail at ../gloo/transport/tcp/pair.cc:446] op.preamble.length <= op.nbytes",
            False,
        ),
        ("Timed out waiting 1800000ms for recv operation to complete (gloo)", False),
    ],
)
def test_only_a_lost_peer_sends_the_traceback_to_the_worker_log(message: str, lost: bool) -> None:
    exc = RuntimeError(message)
    assert classify_exception(exc) == "collective_error"
    assert peer_lost(exc) is lost
