"""The run's event log: one JSON object per line in ``RUN_DIR/events.jsonl``.

Every failure, detection, save, restart, restore and resume is appended here
by whichever process saw it (workers and the launcher alike). Lines are
written with a single ``write`` on an ``O_APPEND`` descriptor, so concurrent
writers never interleave within a line, and each line is flushed to the
kernel at once, so a process killed right after logging keeps its line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


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
