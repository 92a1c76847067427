"""The data position of a plain DataLoader: the pass over it, and the
batches of that pass the loop has taken.

A plain ``torch.utils.data.DataLoader`` has no ``state_dict()``, yet at a
step boundary its position is two numbers: which pass over the loader (its
epoch) and how many batches of that pass were consumed. The order of a pass
is a function of the sampler's seed and epoch (DistributedSampler shuffles
by them), so a resume rebuilds that order and skips the consumed batches
*without loading them*: the skip happens in the index sampler of a one-off
loader with the original's settings, never by drawing batches from an
iterator (with worker processes an iterator starts loading, prefetching, as
soon as it exists).

A resumed process meets the passes again from its own first one (a script's
``for epoch in range(...)`` restarts at 0): passes before the saved one are
*fast-forwarded* (they yield nothing), the saved pass skips its consumed
batches, later passes are whole. ``JitCheckpoint.epochs()`` starts the loop
at the saved pass instead, so nothing is fast-forwarded.

World-size changes follow the rule of jitckpt.state.data (the per-rank batch
is kept, the rest of the epoch's order is split among the new ranks), which
needs :class:`~jitckpt.state.data.ElasticDistributedSampler`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from jitckpt.errors import CheckpointMismatchError, UsageError
from jitckpt.state.data import ElasticDistributedSampler, check_world_size

KIND = "passes"


@dataclass(frozen=True)
class ResumePoint:
    """Where a restored position continues: batch ``consumed`` of pass ``pass_index``."""

    pass_index: int
    consumed: int
    sampler_start: int = 0
    idle: tuple[int, ...] = ()


def check_loader(loader: Any) -> None:
    """Refuse, before training, a loader whose position cannot be rebuilt."""
    if not isinstance(loader, DataLoader):
        raise UsageError(
            f"jitckpt needs a torch DataLoader to follow the data position; got "
            f"{type(loader).__name__}. Wrap a torch.utils.data.DataLoader, or pass a loader "
            f"with state_dict()/load_state_dict() to JitCheckpoint(loader=...) and loop with "
            f"ckpt.steps()."
        )
    if isinstance(loader.dataset, IterableDataset):
        raise UsageError(
            "jitckpt cannot rebuild the order of a DataLoader over an IterableDataset (it has "
            "no sampler); use a map-style dataset with a DistributedSampler."
        )
    sampler = loader.sampler
    if not (isinstance(sampler, SequentialSampler) or hasattr(sampler, "set_epoch")):
        # RandomSampler draws each pass's order from the global generator
        # when the pass starts: a resume cannot draw the same one again.
        raise UsageError(
            f"jitckpt cannot rebuild the order of a pass over a {type(sampler).__name__} (it is "
            f"drawn anew at every pass); use DistributedSampler(dataset, shuffle=True, seed=...), "
            f"whose order is a function of its seed and epoch."
        )


class PassPosition:
    """``state_dict()``/``load_state_dict()`` of a plain loader's position.

    The live position moves with the loop (:meth:`begin_pass`,
    :meth:`consumed`); a boundary snapshot reads it with :meth:`state_dict`.
    ``loader`` may be bound later (:meth:`bind`): transparent mode learns
    which loader trains only at the first optimizer step.
    """

    def __init__(self, loader: Any = None) -> None:
        self.loader: Any = None
        self.pass_index = -1  # no pass begun
        self.batches = 0
        self._passes_begun = 0
        self.resume: ResumePoint | None = None
        # Passes with no optimizer step (a peek at one batch, an evaluation
        # over the training loader): a resume replays them, not skips them.
        self.idle: list[int] = []
        self.fast_forwarded = 0  # passes skipped whole by this resume
        self.just_resumed = False  # the last pass begun is the resume point
        # Which of the script's loaders trains (transparent mode: the
        # ordinal of its first pass among the loaders iterated); saved so a
        # resumed process, which meets the loaders again, knows it.
        self.key: int | None = None
        if loader is not None:
            self.bind(loader)

    def bind(self, loader: Any, *, replace: bool = False) -> None:
        """Follow ``loader`` (``replace``: a script that makes its training
        loader anew for every epoch, as transparent mode sees it)."""
        if self.loader is loader:
            return
        if self.loader is not None and not replace:
            raise UsageError(
                "jitckpt follows one training loader; this loop iterates another one through "
                "ckpt.batches(). Iterate evaluation loaders directly, not through ckpt.batches()."
            )
        check_loader(loader)
        self.loader = loader

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    def _world_size(self) -> int | None:
        return getattr(self.sampler, "num_replicas", None)

    # -- the loop's side ---------------------------------------------------------------
    def begin_pass(self, pass_index: int | None = None) -> int | None:
        """A new pass over the loader starts (``pass_index``: the epoch, if
        the loop knows it; else the count of passes begun). Returns how many
        batches of it to skip, or None when the whole pass lies before the
        resume point (fast-forward: nothing of it is iterated)."""
        index = self._passes_begun if pass_index is None else pass_index
        self._passes_begun = index + 1
        self.pass_index, self.batches = index, 0
        self.just_resumed = False
        resume = self.resume
        if resume is None:
            return 0
        if index < resume.pass_index:
            if index in resume.idle:
                return 0  # as the run that saved it did: a whole pass, no step
            self.fast_forwarded += 1
            return None
        self.resume = None
        self.just_resumed = True
        if index > resume.pass_index:
            return 0  # the loop went past the saved pass (a shorter epoch loop)
        if isinstance(self.sampler, ElasticDistributedSampler):
            self.sampler.start = resume.sampler_start
        self.batches = resume.consumed
        return resume.consumed

    def consumed(self, batches: int) -> None:
        self.batches = batches

    def mark_idle(self, pass_index: int) -> None:
        """Pass ``pass_index`` ended without an optimizer step."""
        if pass_index >= 0 and pass_index not in self.idle:
            self.idle.append(pass_index)

    def resume_pass(self) -> int | None:
        """The pass a restored position continues in (None: not resumed)."""
        return None if self.resume is None else self.resume.pass_index

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "kind": KIND,
            "pass": self.pass_index,
            "consumed": self.batches,
            "epoch": getattr(sampler, "epoch", None),
            "start": getattr(sampler, "start", 0),
            "world_size": self._world_size(),
            "batch_size": getattr(self.loader, "batch_size", None),
            "loader": self.key,
            "idle": list(self.idle),
        }

    def check(self, state: Any, where: str) -> None:
        """Refuse, before anything is loaded, a position this loop cannot take."""
        if state is None:
            return
        if not isinstance(state, dict) or state.get("kind") != KIND:
            raise CheckpointMismatchError(
                f"checkpoint {where} holds the position of a stateful loader "
                f"(StatefulDataLoader), and this job iterates a plain DataLoader through "
                f"ckpt.batches(); use the same kind of loader as the run that wrote it."
            )
        check_world_size(state, self.loader, self.sampler, where)

    def load_state_dict(self, state: Any) -> None:
        if state is None or int(state.get("pass", -1)) < 0:
            self.resume = None  # saved before the loop took its first batch
            return
        consumed, start = int(state["consumed"]), int(state.get("start") or 0)
        saved_world, current_world = state.get("world_size"), self._world_size()
        if saved_world is not None and current_world is not None and saved_world != current_world:
            # Another world size (check() allowed it: elastic sampler, same
            # batch): the rest of the epoch's order is split anew, from the
            # samples every old rank consumed.
            size = len(self.sampler.dataset)
            start = min(start + consumed * int(state["batch_size"]) * int(saved_world), size)
            consumed = 0
        idle = tuple(int(i) for i in state.get("idle") or ())
        self.resume = ResumePoint(int(state["pass"]), consumed, start, idle)
        self.idle = list(idle)
        self.key = state.get("loader")


# -- iterating a pass without loading what it skips ------------------------------------
class _SkipFirst:
    """An index (or batch) sampler without its first ``skip`` items: drawing
    indices loads nothing."""

    def __init__(self, sampler: Iterable[Any], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]


ONE_OFF_MARK = "_jitckpt_one_off"


def skipping(
    loader: DataLoader,  # type: ignore[type-arg]
    skip: int,
    iterate: Callable[[Any], Iterator[Any]] = iter,
) -> Iterator[Any]:
    """The batches of a new pass over ``loader`` after its first ``skip``
    ones, which are never loaded: for ``skip`` > 0 a one-off loader with the
    same settings draws from the same index sampler minus those batches (the
    sampler's order for its current epoch, as the loader itself would).
    ``iterate`` starts a pass over a loader (transparent mode passes the
    DataLoader's own ``__iter__``)."""
    if skip <= 0:
        return iterate(loader)
    settings: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "in_order": getattr(loader, "in_order", True),
    }
    if loader.num_workers > 0:
        settings["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_sampler is not None:
        one_off = DataLoader(
            loader.dataset, batch_sampler=_SkipFirst(loader.batch_sampler, skip), **settings
        )
    else:
        one_off = DataLoader(
            loader.dataset, batch_size=None, sampler=_SkipFirst(loader.sampler, skip), **settings
        )
    setattr(one_off, ONE_OFF_MARK, True)
    return iter(one_off)  # a plain DataLoader: its own __iter__ (transparent mode lets it through)
