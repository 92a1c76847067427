"""Fault injection: ``KIND@step=N,rank=R[,phase=P]``.

Kinds: kill (SIGKILL to the rank), hang (stop making progress and ignore
SIGTERM), raise (a Python exception in the step), term (SIGTERM to every
rank, as a scheduler's preemption), node (the rank's whole node: its agent
and workers). Phases: data, forward, backward, allreduce, optimizer, save,
restore, recovery (default: forward). ``recovery`` fires inside an in-process
recovery of step N (jitckpt.inprocess), after the new group is formed and
before the state transfer: in a survivor, or in the replacement that joins
for rank R (a failure during the recovery itself: the launcher falls back
to the restart path). Several SPECs are separated by ``;`` in the
``JITCKPT_INJECT`` environment variable; ``jitckpt run --inject`` sets it.

An injection fires at most once per run directory: a marker file is created
with O_EXCL just before it fires, so a restarted or re-submitted run that
reaches the same step is not injected again.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jitckpt import events as ev
from jitckpt import protocol
from jitckpt.errors import FaultSpecError, InjectedFault

KINDS = ("kill", "hang", "raise", "term", "node")
PHASES = (
    "data", "forward", "backward", "allreduce", "optimizer", "save", "restore", "recovery",
)  # fmt: skip
MARKER_DIR = Path(".jitckpt") / "injections"


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    step: int
    rank: int
    phase: str = "forward"

    def __str__(self) -> str:
        return f"{self.kind}@step={self.step},rank={self.rank},phase={self.phase}"

    @property
    def marker_name(self) -> str:
        return f"{self.kind}-step{self.step}-rank{self.rank}-{self.phase}"


def parse_spec(text: str) -> FaultSpec:
    """Parse one SPEC; FaultSpecError names the part that is wrong."""
    text = text.strip()
    kind, at, rest = text.partition("@")
    if not at:
        raise FaultSpecError(f"fault spec {text!r}: expected KIND@step=N,rank=R[,phase=P]")
    if kind not in KINDS:
        raise FaultSpecError(
            f"fault spec {text!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})"
        )
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise FaultSpecError(f"fault spec {text!r}: {part!r} is not key=value")
        if key not in ("step", "rank", "phase"):
            raise FaultSpecError(f"fault spec {text!r}: unknown key {key!r} (step, rank, phase)")
        if key in fields:
            raise FaultSpecError(f"fault spec {text!r}: {key!r} given twice")
        fields[key] = value
    for key in ("step", "rank"):
        if key not in fields:
            raise FaultSpecError(f"fault spec {text!r}: missing {key}=")
        if not fields[key].isdigit():
            raise FaultSpecError(
                f"fault spec {text!r}: {key}={fields[key]!r} is not a non-negative integer"
            )
    phase = fields.get("phase", "forward")
    if phase not in PHASES:
        raise FaultSpecError(
            f"fault spec {text!r}: unknown phase {phase!r} (one of {', '.join(PHASES)})"
        )
    return FaultSpec(kind, int(fields["step"]), int(fields["rank"]), phase)


def parse_specs(text: str | None) -> list[FaultSpec]:
    if not text:
        return []
    return [parse_spec(part) for part in text.split(";") if part.strip()]


class Injector:
    """Fires the faults meant for one rank at the phases the loop reports."""

    def __init__(
        self, specs: list[FaultSpec], run_dir: Path, rank: int, events: Any, tracker: Any
    ) -> None:
        self.specs = [spec for spec in specs if spec.rank == rank]
        self.run_dir = run_dir
        self.events = events
        self.tracker = tracker
        self.phases = {spec.phase for spec in self.specs}

    def wants(self, phase: str) -> bool:
        return phase in self.phases

    def at(self, phase: str, step: int | None = None) -> None:
        """Called by the loop's hooks; ``step`` defaults to the iteration in progress."""
        if phase not in self.phases:
            return
        if step is None:
            step = self.tracker.position().in_progress
        for spec in self.specs:
            if spec.phase == phase and spec.step == step and self._claim(spec):
                self._fire(spec)

    def _claim(self, spec: FaultSpec) -> bool:
        marker = self.run_dir / MARKER_DIR / spec.marker_name
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        return True

    def _fire(self, spec: FaultSpec) -> None:
        self.events.emit(
            ev.FAULT_INJECTED, spec=str(spec), kind=spec.kind, step=spec.step, phase=spec.phase
        )
        if spec.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif spec.kind == "raise":
            raise InjectedFault(f"injected fault {spec}")
        elif spec.kind == "term":
            preempt_job()
        elif spec.kind == "hang":
            hang_forever()
        elif spec.kind == "node":
            kill_node()


def preempt_job() -> None:
    """SIGTERM the whole job as a scheduler would: the launcher forwards it to
    every worker and stops. Without a launcher, signal every rank directly."""
    agent = os.environ.get(protocol.AGENT_PID_ENV)
    if agent:
        os.kill(int(agent), signal.SIGTERM)
        return
    from jitckpt import attempt

    store = attempt.store()
    world = int(os.environ.get(protocol.WORLD_SIZE_ENV, "1"))
    for rank in range(world):
        os.kill(int(store.get(protocol.PID_KEY.format(rank=rank)).decode()), signal.SIGTERM)


def hang_forever() -> None:
    """Stop making progress like a wedged rank: no exit, SIGTERM ignored."""
    from jitckpt.detect import signals

    signals.set_callback(lambda signum: None)
    while True:
        time.sleep(3600)


def kill_node() -> None:
    """SIGKILL this rank's agent and every worker it started, as if the
    machine lost power. Workers list their pids in the launcher's control
    directory (private to this node's launcher)."""
    agent = os.environ.get(protocol.AGENT_PID_ENV)
    control = protocol.ControlDir.from_env()
    if not agent or control is None:
        raise FaultSpecError("node faults need the jitckpt launcher (jitckpt run)")
    os.kill(int(agent), signal.SIGKILL)
    for pid in control.pids():
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)
