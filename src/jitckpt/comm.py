"""DDP communication hooks.

Default DDP is not bitwise reproducible across a resume: its first iteration
buckets gradients in parameter order, later ones in gradient-ready order,
and gloo's ring sums each element in an order that depends on its offset in
the bucket (docs/platform.md, "Bitwise-identical runs and DDP's bucket
order": a resumed 4-rank run differed by 6e-8; all-reducing each gradient
separately fixed it). The deterministic hook reduces all
gradients in one flat buffer in parameter order, so each element's offset,
and so its summation order, no longer depends on the bucket layout; one
collective per step is also far faster on gloo than one per tensor.

Both hooks call ``on_bucket()`` as each bucket's all-reduce is launched: the
hang watchdog counts it as progress (a rank hung in backward has launched
fewer buckets than its peers: docs/platform.md, "Detecting a hang and
naming the hung rank") and the fault injector fires its
``allreduce`` phase there. (No ``from __future__ import annotations`` here:
DDP checks the hook's annotations at runtime and rejects string ones.)
"""

import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

BucketCallback = Callable[[], None]


class Recovery(Protocol):
    """What the deterministic hook needs from in-process recovery
    (jitckpt.inprocess.recovery.InProcessRecovery)."""

    def pending(self) -> bool: ...
    def add_waiter(self, event: threading.Event) -> None: ...
    def remove_waiter(self, event: threading.Event) -> None: ...
    def wait_notice(self, timeout: float) -> bool: ...
    def abandon(self, leftover: Any) -> None: ...
    def recover(self, position: int, last_reduced: torch.Tensor | None) -> torch.Tensor | None: ...


def position(step: int, *, reduce: bool) -> int:
    """Where a rank waits, as one comparable number: in the forward of step
    ``step`` (DDP's buffer broadcast) or in the reduction of its gradients,
    which comes after. In-process recovery compares the ranks' positions."""
    return 2 * step + (1 if reduce else 0)


def step_of(position: int) -> int:
    return position // 2


def at_reduce(position: int) -> bool:
    return position % 2 == 1


# How long a rank whose all-reduce failed (a ring neighbour of a dead rank)
# waits for the launcher's recovery notice before it lets the error go to
# the restart path. The launcher notices an exit within its 0.1 s monitor
# interval; this only bounds a launcher that decided against recovery.
NOTICE_TIMEOUT_S = 10.0


class CanonicalAllreduce:
    """Deterministic gradient reduction: waits for the last bucket of the
    backward, then all-reduces every gradient in one flat buffer laid out in
    parameter order, whatever DDP's bucket layout is. One collective per step
    (no overlap with backward: deterministic mode trades speed for exactness).

    With ``recovery`` the hook also survives a dead peer: it waits on the
    all-reduce from Python, so a recovery notice wakes it even when gloo
    never returns (docs/platform.md, "Nothing cancels a pending gloo call"), hands
    over to ``recovery`` (new group, state to the replacement), and reduces
    again on the new group. The training thread never sees an error and the
    script's loop needs no change. ``step()`` says which step is in flight.
    """

    def __init__(
        self,
        parameters: list[torch.nn.Parameter],
        on_bucket: BucketCallback,
        recovery: Recovery | None = None,
        step: Callable[[], int] = lambda: 0,
    ) -> None:
        self.order = {id(p): i for i, p in enumerate(parameters)}
        self.on_bucket = on_bucket
        self.recovery = recovery
        self.step = step
        self.pending: list[tuple[dist.GradBucket, torch.futures.Future[torch.Tensor]]] = []
        # The result of the last completed all-reduce: a rank that fell one
        # all-reduce behind in a recovery receives it instead of redoing it.
        self.last_reduced: torch.Tensor | None = None

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self.on_bucket()
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self.pending.append((bucket, future))
        # then(): C++ gets a real error from a failed wait (a raw set_exception
        # value only fails by a cast error: docs/platform.md, "Unblocking
        # backward with a future jitckpt owns").
        result = future.then(lambda f: f.wait())
        if not bucket.is_last():
            return result
        pending, self.pending = self.pending, []
        grads = sorted(
            (self.order[id(p)], g)
            for b, _ in pending
            for p, g in zip(b.parameters(), b.gradients(), strict=True)
        )
        group = state if state is not None else dist.group.WORLD
        flat = torch.cat([g.reshape(-1) for _, g in grads]).div_(dist.get_world_size(group))
        try:
            reduced = self._reduce(flat, state)
        except Exception as exc:  # noqa: BLE001 - every waiting bucket must see the error
            for _, fut in pending:
                fut.set_exception(exc)  # type: ignore[arg-type]
            return result
        offset = 0
        for _, grad in grads:
            grad.copy_(reduced[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        self.last_reduced = reduced
        for b, fut in pending:
            fut.set_result(b.buffer())
        return result

    def _reduce(self, local: torch.Tensor, state: Any) -> torch.Tensor:
        recovery = self.recovery
        if recovery is None:
            dist.all_reduce(local, group=state if state is not None else dist.group.WORLD)
            return local
        while True:
            if recovery.pending():
                received = recovery.recover(position(self.step(), reduce=True), self.last_reduced)
                if received is not None:
                    return received
            reduced = interruptible_all_reduce(recovery, local)
            if reduced is not None:
                return reduced
            # A peer died: recover (above), then reduce again on the new group.


def interruptible_all_reduce(
    recovery: Recovery, tensor: torch.Tensor, op: Any = None
) -> torch.Tensor | None:
    """All-reduce a private copy of ``tensor`` over the default group, waited
    for from Python so that a recovery notice wakes the wait even when gloo
    never returns (nothing cancels a pending gloo call). Returns the reduced
    copy; None when a recovery interrupted it (the pending call and its
    buffer are handed to ``recovery.abandon``). A failed all-reduce counts as
    interrupted if a notice follows within NOTICE_TIMEOUT_S; else it raises.

    The copy matters: an abandoned all-reduce may still write into its
    buffer much later, so live tensors are never handed to gloo."""
    flat = tensor.detach().clone()
    reduce_op = op if op is not None else dist.ReduceOp.SUM
    done = _interruptibly(
        recovery, flat, lambda: dist.all_reduce(flat, op=reduce_op, async_op=True)
    )
    return flat if done else None


def _interruptibly(recovery: Recovery, buffer: torch.Tensor, start: Callable[[], Any]) -> bool:
    """Run the collective ``start()`` launches on ``buffer`` (a private copy),
    waited for from Python; True once it completed, False when a recovery
    interrupted it (see interruptible_all_reduce)."""
    woken = threading.Event()
    recovery.add_waiter(woken)
    try:
        work = start()
        done = work.get_future()
        done.add_done_callback(lambda _, woken=woken: woken.set())
        woken.wait()
    finally:
        recovery.remove_waiter(woken)
    if done.done():
        try:
            done.wait()
        except Exception:
            if not recovery.wait_notice(NOTICE_TIMEOUT_S):
                raise
        else:
            return True
    recovery.abandon((work, done, buffer))
    return False


class BufferBroadcast:
    """DDP's forward-time buffer broadcast (rank 0's buffers to every rank at
    the start of each forward: BatchNorm's running statistics), as a DDP
    buffer hook that a recovery wakes. A survivor waiting here when a peer
    died recovers at this point (the forward of the step), then broadcasts
    again on the new group, where the replacement's redone forward meets it.

    Args:
        recovery: in-process recovery.
        step: the step in flight.
        last_reduced: the gradient hook's last reduced gradient (a rank one
            all-reduce behind may need it from this rank).
    """

    def __init__(
        self,
        recovery: Recovery,
        step: Callable[[], int],
        last_reduced: Callable[[], torch.Tensor | None],
    ) -> None:
        self.recovery = recovery
        self.step = step
        self.last_reduced = last_reduced

    def hook(self, state: Any, named_buffers: dict[str, torch.Tensor]) -> None:
        buffers = list(named_buffers.values())
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in buffers:
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        recovery = self.recovery
        with torch.no_grad():
            while True:
                if recovery.pending():
                    recovery.recover(position(self.step(), reduce=False), self.last_reduced())
                flats = [torch.cat([b.reshape(-1) for b in group]) for group in by_dtype.values()]
                if all(_interruptibly(recovery, flat, _broadcaster(flat)) for flat in flats):
                    break
            for flat, group in zip(flats, by_dtype.values(), strict=True):
                offset = 0
                for buffer in group:
                    buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
                    offset += buffer.numel()
        return None


def _broadcaster(flat: torch.Tensor) -> Callable[[], Any]:
    return lambda: dist.broadcast(flat, 0, async_op=True)


def observed_allreduce_hook(on_bucket: BucketCallback) -> Callable[..., Any]:
    """DDP's ordinary all-reduce, reporting each bucket."""

    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        on_bucket()
        return default_hooks.allreduce_hook(state, bucket)

    return hook
