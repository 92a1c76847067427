"""The run's event log: one JSON object per line in ``RUN_DIR/events.jsonl``.

Every failure, detection, save, restart, restore and resume is appended here
by whichever process saw it (workers and the launcher alike). Lines are
written with a single ``write`` on an ``O_APPEND`` descriptor, so concurrent
writers never interleave within a line, and each line is flushed to the
kernel at once, so a process killed right after logging keeps its line.

Every event type is in :data:`CATALOGUE` with the fields it carries, and
writers and readers (the summary, report, simulate, benchmarks) name event
types by this module's constants, never by string. Every event also has
``t`` (wall-clock time) and ``event``, and a worker's events ``rank``,
``attempt``, ``launch`` and ``pid`` (the agent's: ``rank: "agent"``).
docs/events.md is this catalogue as a table (``python -m jitckpt.events``
prints it; a test keeps the two equal).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class EventType:
    """One kind of event: who writes it, its own fields, what it means."""

    name: str
    writer: str
    fields: tuple[str, ...]
    doc: str


CATALOGUE: dict[str, EventType] = {}


def _event(name: str, writer: str, fields: str, doc: str) -> str:
    CATALOGUE[name] = EventType(name, writer, tuple(fields.split()), doc)
    return name


# Fields a detection carries about where the loop was (jitckpt.tracker.Position).
_POSITION = "completed dirty optimizer_started optimizer_finished"
# Fields counting a process's resources (jitckpt.inprocess.graveyard.resource_counts).
_RESOURCES = "threads fds rss_kb"

# -- a worker's life -----------------------------------------------------------------
START = _event(
    "start", "worker", "world_size process_start signal_mechanism joined",
    "JitCheckpoint is set up (joined: a spare or replacement joining in process)",
)  # fmt: skip
FRESH_START = _event("fresh_start", "worker", "", "no checkpoint to resume from: step 0")
CHECKPOINT_REFUSED = _event(
    "checkpoint_refused", "worker", "path reason",
    "a checkpoint was not used on restore, and why (partial, corrupt, foreign)",
)  # fmt: skip
RESTORE = _event(
    "restore", "worker", "step kind path source duration saved_world_size digest",
    "the state was loaded (source: staged or durable; digest in deterministic mode)",
)  # fmt: skip
FIRST_STEP_DONE = _event(
    "first_step_done", "worker", "step", "the first step after a resume completed"
)
RESOURCES = _event(
    "resources", "worker", f"step {_RESOURCES}",
    "threads, fds and memory two steps after start (with in-process recovery)",
)  # fmt: skip
LOOP_LEFT = _event(
    "loop_left", "worker", "step", "the loop was left early (break, or an exception)"
)
TRANSPARENT_FOLLOWS = _event(
    "transparent_follows", "worker", "model optimizer schedulers scaler loader",
    "transparent mode found what it follows (at the first optimizer step)",
)  # fmt: skip
FINISH = _event(
    "finish", "worker", f"step median_step_s {_RESOURCES} graveyard_left",
    "training completed its steps",
)  # fmt: skip
WARNING = _event("warning", "worker", "detail", "something the user should know")

# -- failures and saves ------------------------------------------------------------------
FAULT_INJECTED = _event(
    "fault_injected", "worker", "spec kind step phase", "an injected fault fires (--inject)"
)
DETECT = _event(
    "detect", "worker",
    f"cause detail {_POSITION} median_step_s since_boundary_s inprocess suspects stalled_s "
    "timeout_s",
    "this rank noticed a failure (cause: exception, collective_error, cuda_error, sigterm, "
    "hang, peer_failure); inprocess: a hung peer handed to in-process recovery",
)  # fmt: skip
SAVE = _event(
    "save", "worker",
    "kind step path bytes staged persister_pid duration digest writers blocked_s copy_s",
    "a checkpoint was written (kind jit or periodic; digest in deterministic mode)",
)  # fmt: skip
STAGING_FULL = _event(
    "staging_full", "worker", "step error",
    "shared memory was full: the JIT checkpoint is written to the run directory instead",
)  # fmt: skip
SAVE_SKIPPED = _event("save_skipped", "worker", "reason", "no clean state to save, and why")
RERUN_OF_FINISHED = _event(
    "rerun_of_finished", "worker", "step total finished_step",
    "a job resumed a run directory whose run had finished before: it trains again from its checkpoint",
)  # fmt: skip
LOOP_NOT_TRACKED = _event(
    "loop_not_tracked", "worker", "fix",
    "the optimizer stepped before the loop entered ckpt.steps(): no step is tracked, so no JIT checkpoint can be taken",
)  # fmt: skip
EXPORTED = _event(
    "exported", "worker", "step path duration",
    "a JIT checkpoint was also written in a framework's own layout (jitckpt.integrations)",
)  # fmt: skip
EXPORT_FAILED = _event(
    "export_failed", "worker", "step error",
    "a JIT checkpoint could not be written in the framework's layout (jitckpt's own copy stands)",
)  # fmt: skip
SAVE_FAILED = _event("save_failed", "worker", "kind step error", "a save could not be written")
SHARDS_WRITTEN = _event(
    "shards_written", "worker", "kind step duration",
    "a sharded writer wrote its shards (another rank commits)",
)  # fmt: skip
JIT_PLAN = _event(
    "jit_plan", "worker", "step writers reason lost_shard",
    "the writers of a sharded JIT checkpoint, chosen by the first rank to post",
)  # fmt: skip
JIT_IMPOSSIBLE = _event(
    "jit_impossible", "worker", "reason lost_shard held_by next",
    "no JIT checkpoint can exist (no surviving replica of a shard)",
)  # fmt: skip
PERIODIC_SKIPPED = _event(
    "periodic_skipped", "worker", "step reason", "a periodic save was due but skipped"
)
PERIODIC_FAILED = _event(
    "periodic_failed", "worker", "step error", "a periodic save could not be written"
)
EXIT = _event("exit", "worker", "code", "the failure path ends the process")
PERSISTED = _event(
    "persisted", "persister", "path staged bytes duration",
    "a staged checkpoint reached the run directory",
)  # fmt: skip
PERSIST_FAILED = _event(
    "persist_failed", "persister", "path error", "a staged checkpoint could not be persisted"
)

# -- the launcher --------------------------------------------------------------------------
WORKER_FAILED = _event(
    "worker_failed", "agent", "failed_rank exitcode worker_pid restarts_left",
    "a worker exited with an error",
)  # fmt: skip
RESTART_BEGIN = _event("restart_begin", "agent", "restarts_left", "the agent restarts workers")
RESTART = _event("restart", "agent", "duration restarts_left", "the workers were restarted")
JOB_END = _event("job_end", "agent", "outcome status", "jitckpt run ends")

# -- in-process recovery ------------------------------------------------------------------
INPROC_BEGIN = _event(
    "inproc_begin", "agent",
    "generation failed_rank exitcode worker_pid replacement replacement_pid",
    "the agent starts recovery GENERATION with a replacement (spare or fresh)",
)  # fmt: skip
INPROC_FALLBACK = _event(
    "inproc_fallback", "agent", "path reason failed_ranks",
    "in-process recovery does not apply: the restart path is taken",
)  # fmt: skip
INPROC_NOTICE = _event(
    "inproc_notice", "worker", "generation dead", "a survivor saw the agent's notice"
)
INPROC_WITHDRAWN = _event(
    "inproc_withdrawn", "worker", "reason",
    "this rank can no longer recover in process (gradient accumulation): failures take the restart path",
)  # fmt: skip
INPROC_RECOVERED = _event(
    "inproc_recovered", "worker",
    "generation role step dead failure_t notice_t seen_t unblocked_t reform_s transfer_s bytes",
    "this rank is done with recovery GENERATION (role: source, survivor, behind, "
    "replacement)",
)  # fmt: skip
INPROC_STEP_DONE = _event(
    "inproc_step_done", "worker", f"generation step {_RESOURCES}",
    "the step after a recovery completed",
)  # fmt: skip
INPROC_COLLECTIVE_ABANDONED = _event(
    "inproc_collective_abandoned", "worker", "kind",
    "a user collective was interrupted by a recovery",
)  # fmt: skip
INPROC_RELEASED = _event(
    "inproc_released", "worker", "what held_s drop_s",
    "an abandoned group or collective was dropped by the graveyard",
)  # fmt: skip


class EventLog:
    """Appends events for one process. ``fields`` are added to every event
    (rank, attempt, pid)."""

    def __init__(self, run_dir: str | os.PathLike[str], **fields: Any) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.fields = fields
        self._fd: int | None = None
        self._lost = 0
        self._lock = threading.Lock()  # several threads log (training, watchdog, signals)

    def emit(self, event: str, **data: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"t": time.time(), "event": event}
        record.update(self.fields)
        record.update(data)
        line = (json.dumps(record, default=str) + "\n").encode()
        with self._lock:
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(self._fd, line)
            except OSError as exc:
                # A full disk must not turn logging into a second failure
                # (the save path logs while handling the first one).
                if not self._lost:
                    print(
                        f"jitckpt: event log {self.path} not writable ({exc}); "
                        f"events are being lost",
                        file=sys.stderr,
                        flush=True,
                    )
                self._lost += 1
        return record

    def warn(self, event: str, **data: Any) -> dict[str, Any]:
        """Emit an event the user must also see on stderr: a save skipped or
        failed, a JIT checkpoint that cannot exist (docs/promises.md, P6:
        say so)."""
        record = self.emit(event, **data)
        detail = "; ".join(f"{k}: {v}" for k, v in data.items())
        who = f"rank {self.fields['rank']}: " if "rank" in self.fields else ""
        print(f"jitckpt: {who}{event.replace('_', ' ')}: {detail}", file=sys.stderr, flush=True)
        return record

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_events(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All events of a run in time order. A torn last line (a writer killed
    mid-write) is skipped rather than failing the reader."""
    return sorted(_iter_events(Path(run_dir) / EVENTS_FILE), key=lambda e: e.get("t", 0.0))


def _iter_events(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def catalogue_markdown() -> str:
    """docs/events.md: the catalogue as a table."""
    lines = [
        "# Events",
        "",
        "Every line of `RUN_DIR/events.jsonl` is one JSON object: `t` (wall-clock",
        "time), `event` (a name below) and the event's fields. A worker's events also",
        "carry `rank`, `attempt`, `launch` (the rendezvous run id) and `pid`; the",
        'agent\'s carry `rank: "agent"`, the persister\'s `role: "persister"`.',
        "Fields are present only where they apply. This table is generated from",
        "`jitckpt.events.CATALOGUE` (`python -m jitckpt.events > docs/events.md`).",
        "",
        "| event | written by | fields | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for event in CATALOGUE.values():
        fields = ", ".join(f"`{f}`" for f in event.fields) or "-"
        lines.append(f"| `{event.name}` | {event.writer} | {fields} | {event.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(catalogue_markdown())
