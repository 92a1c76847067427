"""Who sends what in an in-process recovery, once the new group has
exchanged the ranks' positions (where each waits: jitckpt.comm.position)."""

from __future__ import annotations

from dataclasses import dataclass

from jitckpt.comm import at_reduce, step_of

# A position meaning "no state at all" (a replacement).
NO_STATE = -1


@dataclass(frozen=True)
class TransferPlan:
    """Who sends what after the new group exchanged positions (each rank's
    position: where it waits, jitckpt.comm.position: the forward of a step
    (its buffer broadcast) or the reduction of its gradients; NO_STATE for a
    replacement). The most advanced position is one every rank can reach:
    the lowest rank at it sends the whole state to each replacement and, to
    the ranks behind, what they would otherwise wait for from peers that are
    past it.

    How far behind a healthy rank can be: an all-reduce needs everybody, so
    at most one reduction (a rank that had not read the last bytes of step
    s-1's all-reduce when the dead peer's connection reset). DDP's buffer
    broadcast at forward s does not need everybody: its root (rank 0), and
    any rank that received its part before the failure, go on to step s's
    reduction without the others. So when the target is the reduction of
    step s, a rank at forward s or at step s-1's reduction will reach
    forward s, where nobody broadcasts any more: it receives the buffers as
    that broadcast left them (``buffers_to``)."""

    positions: tuple[int, ...]  # each rank's, in rank order

    @property
    def position(self) -> int:
        """The most advanced position: where every rank continues."""
        return max(self.positions)

    @property
    def source(self) -> int:
        return self.positions.index(self.position)

    @property
    def replacements(self) -> list[int]:
        return [r for r, p in enumerate(self.positions) if p == NO_STATE]

    @property
    def behind(self) -> list[int]:
        target = self.position  # a max over every rank: once, not per rank
        return [r for r, p in enumerate(self.positions) if NO_STATE < p < target]

    @property
    def gradient_to(self) -> list[int]:
        """Ranks one reduction behind (step s-1's, the target being step
        s's forward or reduction): they get the source's last reduced
        gradient, which is step s-1's."""
        return [r for r in self.behind if at_reduce(self.positions[r])]

    @property
    def buffers_to(self) -> list[int]:
        """Ranks that will reach the forward of the target's step after the
        others left it (see the class docstring)."""
        return list(self.behind) if self.at_reduce else []

    @property
    def step(self) -> int:
        """The step every rank continues (a replacement redoes it)."""
        return step_of(self.position)

    @property
    def at_reduce(self) -> bool:
        """The survivors are past the step's forward (in its reduction)."""
        return at_reduce(self.position)

    def role(self, rank: int) -> str:
        if rank == self.source:
            return "source"
        if rank in self.replacements:
            return "replacement"
        return "behind" if rank in self.behind else "survivor"


def plan_transfer(positions: list[int]) -> TransferPlan:
    if max(positions) == NO_STATE:
        raise RuntimeError("in-process recovery: no rank has a state to send")
    return TransferPlan(tuple(positions))
