"""DDP communication hooks.

Default DDP is not bitwise reproducible across a resume: its first iteration
buckets gradients in parameter order, later ones in gradient-ready order,
and gloo's ring sums each element in an order that depends on its offset in
the bucket (PLATFORM.md: a resumed 4-rank run differed by 6e-8; all-reducing
each gradient separately fixed it). The deterministic hook reduces all
gradients in one flat buffer in parameter order, so each element's offset,
and so its summation order, no longer depends on the bucket layout; one
collective per step is also far faster on gloo than one per tensor.

Both hooks call ``on_bucket()`` as each bucket's all-reduce is launched: the
hang watchdog counts it as progress (a rank hung in backward has launched
fewer buckets than its peers: PLATFORM.md) and the fault injector fires its
``allreduce`` phase there. (No ``from __future__ import annotations`` here:
DDP checks the hook's annotations at runtime and rejects string ones.)
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

BucketCallback = Callable[[], None]


class CanonicalAllreduce:
    """Deterministic gradient reduction: waits for the last bucket of the
    backward, then all-reduces every gradient in one flat buffer laid out in
    parameter order, whatever DDP's bucket layout is. One collective per step
    (no overlap with backward: deterministic mode trades speed for exactness).
    """

    def __init__(self, parameters: list[torch.nn.Parameter], on_bucket: BucketCallback) -> None:
        self.order = {id(p): i for i, p in enumerate(parameters)}
        self.on_bucket = on_bucket
        self.pending: list[tuple[dist.GradBucket, torch.futures.Future[torch.Tensor]]] = []

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self.on_bucket()
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self.pending.append((bucket, future))
        # then(): C++ gets a real error from a failed wait (PLATFORM.md: a raw
        # set_exception value only fails by a cast error).
        result = future.then(lambda f: f.wait())
        if not bucket.is_last():
            return result
        pending, self.pending = self.pending, []
        group = state if state is not None else dist.group.WORLD
        grads = sorted(
            (self.order[id(p)], g)
            for b, _ in pending
            for p, g in zip(b.parameters(), b.gradients(), strict=True)
        )
        flat = torch.cat([g.reshape(-1) for _, g in grads]).div_(dist.get_world_size(group))
        work = dist.all_reduce(flat, group=group, async_op=True)

        def scatter(done: torch.futures.Future[Any]) -> None:
            try:
                done.value()
                offset = 0
                for _, grad in grads:
                    grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                    offset += grad.numel()
            except Exception as exc:  # noqa: BLE001 - every waiting bucket must see the error
                for _, fut in pending:
                    fut.set_exception(exc)  # type: ignore[arg-type]
                return
            for b, fut in pending:
                fut.set_result(b.buffer())

        work.get_future().then(scatter)  # type: ignore[union-attr]
        return result


def observed_allreduce_hook(on_bucket: BucketCallback) -> Callable[..., Any]:
    """DDP's ordinary all-reduce, reporting each bucket."""

    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        on_bucket()
        return default_hooks.allreduce_hook(state, bucket)

    return hook
