"""A process group that never communicates, for processes not yet in the job.

A spare or a fresh replacement runs the script's setup (DDP's constructor
verifies parameter shapes with an all-gather and broadcasts the module
state) before its peers are ready to meet it; it joins the job's real group
later, in ``JitCheckpoint`` (jitckpt.inprocess). Its default group until
then is this one: it reports the rank and world size the process will have
in the job, and completes every collective at once, locally (a broadcast or
an all-reduce leaves the tensors as they are, an all-gather copies the
input into every slot). A survivor's DDP reducer is also pointed at a
one-rank instance after a recovery, so that the broken group loses its last
reference (the reducer only uses it for the bucket-rebuild broadcast).

It is a Python subclass of ``torch.distributed.ProcessGroup`` registered with
``torch.distributed.Backend.register_backend``, the documented way to add a
backend; it replaces the "fake" backend of ``torch.testing._internal``. It
starts no thread and opens no file.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist

BACKEND = "jitckpt_detached"


class _Done(dist.Work):
    """A collective that completed when it was issued."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self._future: torch.futures.Future[Any] = torch.futures.Future()
        self._future.set_result(result)

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future[Any]:
        return self._future


# Every group made here lives as long as the process. A C++ holder (DDP's
# reducer) keeps only the C++ half of a Python group alive: once the Python
# object is collected, its overrides are gone and a collective falls through
# to the base class ("No backend type associated with device type cpu").
_alive: list[DetachedGroup] = []


class DetachedGroup(dist.ProcessGroup):
    """``rank`` of ``size`` in name only: every collective is local."""

    def __init__(self, rank: int, size: int) -> None:
        super().__init__(rank, size)  # type: ignore[call-arg]  # Python groups' constructor
        _alive.append(self)

    def getBackendName(self) -> str:  # noqa: N802 - ProcessGroup's name
        return BACKEND

    def broadcast(  # type: ignore[override]
        self, tensors: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        return _Done(tensors)

    def allreduce(  # type: ignore[override]
        self, tensors: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        return _Done(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        return _Done(tensors)

    def allgather(  # type: ignore[override]
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        for slots, tensor in zip(outputs, inputs, strict=True):
            for slot in slots:
                slot.copy_(tensor)
        return _Done(outputs)

    def _allgather_base(
        self, output: torch.Tensor, tensor: torch.Tensor, opts: Any = None
    ) -> dist.Work:
        output.view(-1, tensor.numel()).copy_(tensor.reshape(1, -1))
        return _Done([output])

    def all_gather_single(
        self, output: torch.Tensor, tensor: torch.Tensor, opts: Any = None
    ) -> dist.Work:
        return self._allgather_base(output, tensor, opts)

    def barrier(self, opts: Any = None) -> dist.Work:
        return _Done([])


def _create(common_opts: Any, _backend_options: Any = None) -> DetachedGroup:
    return DetachedGroup(common_opts.group_rank, common_opts.group_size)


_registered = threading.Lock()


def register() -> None:
    """Make ``init_process_group("jitckpt_detached", ...)`` available (once)."""
    with _registered:
        if BACKEND not in dist.Backend.backend_list:
            dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])


def warm_up() -> None:
    """Run what a spare's script setup runs the first time (DDP's
    constructor, autograd, an AdamW step: torch imports parts of itself,
    torch._dynamo among them, lazily, ~1 s here), on a throwaway model, so
    that after its assignment the spare builds its real ones fast."""
    model = torch.nn.Linear(2, 2)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=DetachedGroup(0, 1))
    optimizer = torch.optim.AdamW(ddp.parameters())
    ddp(torch.zeros(1, 2)).sum().backward()
    optimizer.step()
