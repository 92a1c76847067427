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

    # Where it finds a BufferBroadcast's send and receive, when there is one.
    forward_buffers: Any

    def pending(self) -> bool: ...
    def add_waiter(self, event: threading.Event) -> None: ...
    def remove_waiter(self, event: threading.Event) -> None: ...
    def wait_notice(self, timeout: float) -> bool: ...
    def abandon(self, futures: list[Any], leftover: Any) -> None: ...
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


# Bytes of the reduction's first chunk and of the others: DDP's own default
# bucket sizes (a small first bucket starts communication early in backward).
FIRST_CHUNK_BYTES = 1 << 20
CHUNK_BYTES = 25 << 20


class Chunk:
    """A slice of the gradients reduced by one collective: parameters of one
    dtype at fixed offsets. Plain class, no tensors: the layout only."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.members: list[tuple[int, int, int]] = []  # (parameter index, offset, numel)
        self.numel = 0

    def add(self, index: int, numel: int) -> None:
        self.members.append((index, self.numel, numel))
        self.numel += numel


def chunk_layout(parameters: list[torch.nn.Parameter]) -> list[Chunk]:
    """The reduction's layout, a pure function of the parameter list, so that
    every rank (a replacement with a fresh DDP included) cuts the same chunks
    in the same order. Parameters go in reverse order (the order backward
    produces their gradients in, roughly), grouped by dtype; the first chunk
    holds at most FIRST_CHUNK_BYTES, the others CHUNK_BYTES."""
    chunks: list[Chunk] = []
    current: dict[torch.dtype, Chunk] = {}
    for index in reversed(range(len(parameters))):
        parameter = parameters[index]
        chunk = current.get(parameter.dtype)
        limit = FIRST_CHUNK_BYTES if not chunks or chunk is chunks[0] else CHUNK_BYTES
        size = parameter.numel() * parameter.element_size()
        if chunk is None or (
            chunk.members and (chunk.numel * parameter.element_size()) + size > limit
        ):
            chunk = current[parameter.dtype] = Chunk(parameter.dtype)
            chunks.append(chunk)
        chunk.add(index, parameter.numel())
    return chunks


class ChunkedAllreduce:
    """DDP's gradient reduction as a comm hook, in a layout of jitckpt's own.

    Each bucket DDP hands over is copied (divided by the world size) into
    fixed chunks of a flat gradient (chunk_layout); a chunk is all-reduced,
    asynchronously, as soon as all its gradients arrived and the chunks
    before it are under way, so communication overlaps backward as with
    DDP's own buckets. The results are copied back into DDP's buckets at the
    end of backward, where DDP waits for them anyway.

    The layout does not depend on DDP's bucket layout (which DDP rebuilds
    after its first step, in gradient-ready order, so a fresh replacement's
    differs from the survivors'): every rank issues the same collectives in
    the same order, and each element is summed in the same order in every
    run, which makes deterministic mode's resumes bitwise exact
    (docs/platform.md, "Bitwise-identical runs and DDP's bucket order").

    With ``recovery`` the end of backward waits from Python, so a recovery
    notice wakes it even when gloo never returns (docs/platform.md, "Nothing
    cancels a pending gloo call"); it hands over to ``recovery`` (new group,
    state to the replacement) and reduces the step again on the new group
    from the local gradients, which stay untouched in DDP's buckets until
    every chunk succeeded. The training thread never sees an error.

    Args:
        parameters: the parameters DDP reduces, in the model's order.
        on_bucket: called as each bucket arrives (watchdog progress, the
            ``allreduce`` injection phase).
        recovery: in-process recovery, if on.
        step: the step in flight.
    """

    def __init__(
        self,
        parameters: list[torch.nn.Parameter],
        on_bucket: BucketCallback,
        recovery: Recovery | None = None,
        step: Callable[[], int] = lambda: 0,
    ) -> None:
        self.index = {id(p): i for i, p in enumerate(parameters)}
        self.chunks = chunk_layout(parameters)
        self.place = {
            index: (c, offset)
            for c, chunk in enumerate(self.chunks)
            for index, offset, _ in chunk.members
        }
        self.on_bucket = on_bucket
        self.recovery = recovery
        self.step = step
        # How each of DDP's buckets maps onto the chunks, by bucket (DDP
        # rebuilds its buckets once, after its first step).
        self._maps: dict[tuple[int, ...], list[tuple[int, int, int, int, int]]] = {}
        # The two sets of chunk buffers used in turn: the last step's results
        # stay intact while this step reduces (a rank one all-reduce behind in
        # a recovery receives them). A set an abandoned collective may still
        # write into is never reused.
        self._sets: list[list[torch.Tensor] | None] = [None, None]
        self._turn = 0
        self._begin()
        self.last_reduced: list[torch.Tensor] | None = None

    def _begin(self) -> None:
        self.pending: list[tuple[dist.GradBucket, torch.futures.Future[torch.Tensor]]] = []
        self.remaining = [len(chunk.members) for chunk in self.chunks]
        self.launched: list[Any] = []  # the works of this step's chunks, in order
        self.buffers = self._sets[self._turn] or [
            torch.empty(chunk.numel, dtype=chunk.dtype) for chunk in self.chunks
        ]
        self._sets[self._turn] = self.buffers

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self.on_bucket()
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self.pending.append((bucket, future))
        # then(): C++ gets a real error from a failed wait (a raw set_exception
        # value only fails by a cast error: docs/platform.md, "Unblocking
        # backward with a future jitckpt owns").
        result = future.then(lambda f: f.wait())
        self._take(bucket, self.buffers)
        while len(self.launched) < len(self.chunks) and self.remaining[len(self.launched)] == 0:
            buffer = self.buffers[len(self.launched)]
            self.launched.append(dist.all_reduce(buffer, async_op=True))
        if not bucket.is_last():
            return result
        pending = self.pending
        try:
            reduced = self._finish(pending)
        except Exception as exc:  # noqa: BLE001 - every waiting bucket must see the error
            for _, fut in pending:
                fut.set_exception(exc)  # type: ignore[arg-type]
            return result
        for b, _ in pending:
            flat = b.buffer()
            for c, offset, start, length, _count in self._map(b):
                flat[start : start + length].copy_(reduced[c][offset : offset + length])
        self.last_reduced = reduced
        self._turn = 1 - self._turn
        self._begin()
        for b, fut in pending:
            fut.set_result(b.buffer())
        return result

    def _map(self, bucket: dist.GradBucket) -> list[tuple[int, int, int, int, int]]:
        """The bucket's gradients as runs (chunk, offset in the chunk, offset
        in the bucket, length, parameters): consecutive gradients that are
        consecutive in a chunk too are one run, so a bucket is copied with a
        few tensor operations, not one per parameter."""
        parameters = bucket.parameters()
        key = tuple(id(p) for p in parameters)
        runs = self._maps.get(key)
        if runs is None:
            runs = []
            base = bucket.buffer().data_ptr()
            for parameter, grad in zip(parameters, bucket.gradients(), strict=True):
                c, offset = self.place[self.index[id(parameter)]]
                start = (grad.data_ptr() - base) // grad.element_size()
                last = runs[-1] if runs else None
                if (
                    last is not None
                    and last[0] == c
                    and last[1] + last[3] == offset
                    and last[2] + last[3] == start
                ):
                    runs[-1] = (c, last[1], last[2], last[3] + grad.numel(), last[4] + 1)
                else:
                    runs.append((c, offset, start, grad.numel(), 1))
            self._maps[key] = runs
        return runs

    def _take(
        self, bucket: dist.GradBucket, buffers: list[torch.Tensor], count: bool = True
    ) -> None:
        """Copy the bucket's local gradients, divided by the world size,
        into their places in the chunks."""
        flat = bucket.buffer()
        world = dist.get_world_size()
        for c, offset, start, length, members in self._map(bucket):
            torch.div(flat[start : start + length], world, out=buffers[c][offset : offset + length])
            if count:
                self.remaining[c] -= members

    def last_flat(self) -> torch.Tensor | None:
        """The last completed step's reduced gradient, as one tensor (what a
        rank one all-reduce behind receives in a recovery)."""
        if self.last_reduced is None:
            return None
        return torch.cat([t.reshape(-1) for t in self.last_reduced])

    def _finish(
        self, pending: list[tuple[dist.GradBucket, torch.futures.Future[torch.Tensor]]]
    ) -> list[torch.Tensor]:
        """Wait for this step's chunks; with a recovery, redo them on the new
        group until they succeed. Returns the reduced chunks."""
        if len(self.launched) != len(self.chunks):
            raise RuntimeError(
                "jitckpt: a gradient never reached the reduction (unused parameter?)"
            )
        recovery = self.recovery
        if recovery is None:
            for work in self.launched:
                work.wait()
            return self.buffers
        while True:
            if _wait_all(recovery, self.launched, self.buffers):
                return self.buffers
            # A peer died: the works and their buffers are abandoned (they may
            # still be written into); the local gradients are intact in DDP's
            # buckets. Recover, then reduce the step again on the new group.
            self._sets[self._turn] = None
            received = recovery.recover(position(self.step(), reduce=True), self.last_flat())
            self.buffers = [torch.empty(chunk.numel, dtype=chunk.dtype) for chunk in self.chunks]
            self._sets[self._turn] = self.buffers
            if received is not None:
                # This rank was one all-reduce behind: a peer had the result.
                offset = 0
                for buffer in self.buffers:
                    buffer.copy_(received[offset : offset + buffer.numel()])
                    offset += buffer.numel()
                return self.buffers
            for b, _ in pending:
                self._take(b, self.buffers, count=False)
            self.launched = [dist.all_reduce(b, async_op=True) for b in self.buffers]


def _wait_all(recovery: Recovery, works: list[Any], buffers: list[torch.Tensor]) -> bool:
    """Wait for every work, from Python (a notice wakes it); True when all
    succeeded, False when a recovery interrupted them (all abandoned, with
    their buffers). A failed work counts as interrupted if a notice follows
    within NOTICE_TIMEOUT_S; else its error is raised."""
    woken = threading.Event()
    remaining = [len(works)]
    lock = threading.Lock()

    def one_done(_: Any) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                woken.set()

    recovery.add_waiter(woken)
    futures = [work.get_future() for work in works]
    try:
        for future in futures:
            future.add_done_callback(one_done)
        woken.wait()
    finally:
        recovery.remove_waiter(woken)
    if all(future.done() for future in futures):
        try:
            for future in futures:
                future.wait()
        except Exception:
            if not recovery.wait_notice(NOTICE_TIMEOUT_S):
                raise
        else:
            return True
    recovery.abandon(futures, (works, buffers))
    return False


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
    recovery.abandon([done], (work, buffer))
    return False


class BroadcastResults(Protocol):
    """The model's buffers as a step's forward-time broadcast left them
    (jitckpt.state.buffers.BufferSnapshots)."""

    names: list[str]

    def of_step(self, step: int) -> dict[str, torch.Tensor] | None: ...
    def live(self) -> dict[str, torch.Tensor]: ...


class BufferBroadcast:
    """DDP's forward-time buffer broadcast (rank 0's buffers to every rank at
    the start of each forward: BatchNorm's running statistics), as a DDP
    buffer hook that a recovery wakes. A survivor waiting here when a peer
    died recovers at this point (the forward of the step), then broadcasts
    again on the new group, where the replacement's redone forward meets it.

    The broadcast does not wait for every rank: its root, and a rank that
    got its part, can be in the step's reduction while another has not
    reached the forward yet. A recovery then sends that rank the buffers as
    the broadcast left them (``send``, ``receive``: TransferPlan.buffers_to),
    and its forward takes them instead of broadcasting.

    Args:
        recovery: in-process recovery.
        step: the step in flight.
        last_reduced: the gradient hook's last reduced gradient (a rank one
            all-reduce behind may need it from this rank).
        results: the buffers as each step's broadcast left them.
    """

    def __init__(
        self,
        recovery: Recovery,
        step: Callable[[], int],
        last_reduced: Callable[[], torch.Tensor | None],
        results: BroadcastResults,
    ) -> None:
        self.recovery = recovery
        self.step = step
        self.last_reduced = last_reduced
        self.results = results
        # (step, buffers by name) received in a recovery, for that step's forward.
        self._given: tuple[int, dict[str, torch.Tensor]] | None = None

    def hook(self, state: Any, named_buffers: dict[str, torch.Tensor]) -> None:
        groups = _by_dtype(list(named_buffers.values()))
        recovery = self.recovery
        with torch.no_grad():
            while True:
                if recovery.pending():
                    recovery.recover(position(self.step(), reduce=False), self.last_reduced())
                given = self._given
                if given is not None and given[0] == self.step():
                    self._given = None
                    for name, buffer in named_buffers.items():
                        if name in given[1]:
                            buffer.copy_(given[1][name])
                    return None
                flats = [_flatten(group) for group in groups]
                if all(_interruptibly(recovery, flat, _broadcaster(flat)) for flat in flats):
                    break
            for flat, group in zip(flats, groups, strict=True):
                _unflatten(flat, group)
        return None

    def send(self, step: int, peers: list[int]) -> int:
        """Send step ``step``'s broadcast buffers to ``peers`` (on the
        default group); returns the bytes sent."""
        values = self.results.of_step(step)
        if values is None:
            raise RuntimeError(
                f"in-process recovery: no copy of the buffers step {step}'s forward broadcast"
            )
        flats = [_flatten(g) for g in _by_dtype([values[n] for n in self.results.names])]
        for peer in peers:
            for flat in flats:
                dist.send(flat, peer)
        return len(peers) * sum(flat.numel() * flat.element_size() for flat in flats)

    def receive(self, step: int, source: int) -> None:
        """Receive step ``step``'s broadcast buffers from ``source``, for
        that step's forward."""
        live = self.results.live()
        received = [torch.empty_like(live[n]) for n in self.results.names]
        for group in _by_dtype(received):
            flat = _flatten(group)
            dist.recv(flat, source)
            _unflatten(flat, group)
        self._given = (step, dict(zip(self.results.names, received, strict=True)))


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors grouped by dtype, in order (one collective per group)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return list(groups.values())


def _flatten(group: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in group])


def _unflatten(flat: torch.Tensor, group: list[torch.Tensor]) -> None:
    offset = 0
    for tensor in group:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def _broadcaster(flat: torch.Tensor) -> Callable[[], Any]:
    return lambda: dist.broadcast(flat, 0, async_op=True)


def observed_allreduce_hook(on_bucket: BucketCallback) -> Callable[..., Any]:
    """DDP's ordinary all-reduce, reporting each bucket."""

    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        on_bucket()
        return default_hooks.allreduce_hook(state, bucket)

    return hook
