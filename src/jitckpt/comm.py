"""DDP communication hooks.

Default DDP is not bitwise reproducible across a resume: its first iteration
buckets gradients in parameter order, later ones in gradient-ready order,
and gloo's ring sums each element in an order that depends on its offset in
the bucket (PLATFORM.md: a resumed 4-rank run differed by 6e-8). The
deterministic hook all-reduces every gradient of a bucket separately, so
each element's summation order no longer depends on the bucket layout.

The hooks also report the ``allreduce`` phase to the fault injector. (No
``from __future__ import annotations`` here: DDP checks the hook's
annotations at runtime and rejects string annotations.)
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

PhaseCallback = Callable[..., None]


def per_tensor_allreduce_hook(on_phase: PhaseCallback | None):
    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if on_phase is not None:
            on_phase("allreduce")
        group = state if state is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        futures = []
        for grad in bucket.gradients():
            # gradients() are views into bucket.buffer(), reduced in place.
            grad.div_(world_size)
            futures.append(dist.all_reduce(grad, group=group, async_op=True).get_future())  # type: ignore[union-attr]
        buffer = bucket.buffer()

        def done(fut: torch.futures.Future[Any]) -> torch.Tensor:
            for inner in fut.value():
                inner.value()  # re-raise a failed all-reduce
            return buffer

        return torch.futures.collect_all(futures).then(done)

    return hook


def observed_allreduce_hook(on_phase: PhaseCallback) -> Callable[..., Any]:
    """DDP's ordinary all-reduce, telling the injector when it starts."""

    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        on_phase("allreduce")
        return default_hooks.allreduce_hook(state, bucket)

    return hook
