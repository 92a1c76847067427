"""FrameworkResume: a framework integration (jitckpt.integrations) restored
the training state from its own checkpoint, and JitCheckpoint only reports
it (``JitCheckpoint(resumed_by_framework=...)``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from jitckpt import events as ev
from jitckpt.checkpoint.context import RankContext


@dataclass(frozen=True)
class FrameworkResume:
    """A framework restored the state itself, from its own checkpoint (a
    Trainer's ``checkpoint-N``): ``step`` steps done, read from ``path``;
    ``kind`` is "jit" when jitckpt wrote that checkpoint on a failure, else
    the framework's own ("framework")."""

    step: int
    path: str | None
    kind: str

    def announce(self, ctx: RankContext) -> None:
        """The event (and rank 0's line) a jitckpt restore writes: restore,
        or fresh_start at step 0 (reports take the training loop's start
        from one or the other)."""
        if self.step <= 0:
            ctx.events.emit(ev.FRESH_START)
            return
        ctx.events.emit(
            ev.RESTORE,
            step=self.step,
            kind=self.kind,
            path=self.path,
            source="framework",
            duration=0.0,
            saved_world_size=None,
            digest=None,
        )
        if ctx.rank == 0:
            print(
                f"jitckpt: resumed from step {self.step} ({self.kind} checkpoint, {self.path}, "
                f"loaded by the framework)",
                file=sys.stderr,
                flush=True,
            )
