"""The storage interface: what jitckpt needs from a place that holds
checkpoints, and the value types that cross it.

A checkpoint is written once and never modified: a single writer calls
:meth:`Storage.write`; several writers of one sharded checkpoint each put
their files into :meth:`Storage.temporary` and one of them calls
:meth:`Storage.commit`. Either way the checkpoint appears whole or not at
all. Readers list :meth:`Storage.candidates` newest first, verify what they
pick (:meth:`Storage.read_verified` for the payload, :meth:`Storage.verify_files`
for every file) and never trust a file the manifest does not vouch for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jitckpt.storage.manifest import KINDS, Manifest

# Points of a write where a crash-consistency test (and the fault injector's
# ``save`` phase, at "payload_written") can stop the writer.
WRITE_POINTS = ("tmp_created", "payload_half", "payload_written", "manifest_written", "renamed")
WritePointHook = Callable[[str], None]
# A checkpoint directory's name (jitckpt.storage.manifest.Manifest.name).
_NAME = re.compile(r"step-(\d+)-([a-z]+)-a(\d+)-r(\d+)")


class Payload(Protocol):
    """Bytes to store, produced in pieces (jitckpt.state.archive.Archive)."""

    size: int

    def chunks(self) -> Iterable[bytes | bytearray | memoryview]: ...


@dataclass
class Candidate:
    """A checkpoint directory and its manifest, or why it has none usable."""

    path: Path
    manifest: Manifest | None
    problem: str | None  # why it cannot be used, if known without reading the payload

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return self.manifest.step if self.manifest else -1

    @property
    def checksum(self) -> str | None:
        """The payload's recorded checksum, as ``algorithm:hex``."""
        return self.manifest.payload_checksum if self.manifest else None

    def sort_key(self) -> tuple[int, int, int, int, int]:
        """Newest step first; at one step a JIT copy before a periodic one,
        a copy with the failure-free run's buffers before one without
        (jitckpt.state.buffers), then the newest attempt, then the lowest
        writer rank."""
        m = self.manifest
        if m is None:
            # Ranked by what its directory name says, after every valid copy
            # of that step: a corrupt newest checkpoint is reached (and
            # refused, with its reason) before an older one is loaded.
            named = _NAME.fullmatch(self.path.name)
            if named is None:
                return (1, len(KINDS), 2, 0, 0)
            kind = KINDS.index(named[2]) if named[2] in KINDS else len(KINDS)
            return (-int(named[1]), kind, 2, -int(named[3]), int(named[4]))
        kind = KINDS.index(m.kind) if m.kind in KINDS else len(KINDS)
        inexact = 1 if m.exact_buffers is False else 0
        return (-m.step, kind, inexact, -m.attempt, m.writer_rank)


class Storage(Protocol):
    """A place that holds checkpoints (jitckpt.storage.directory implements
    it on a filesystem). Every method raises CheckpointError for a
    checkpoint that cannot be used and CheckpointWriteError for a write that
    failed (nothing of it left behind)."""

    root: Path
    location: str

    def write(
        self,
        manifest: Manifest,
        payload: Payload | bytes | bytearray,
        on_point: WritePointHook | None = None,
    ) -> Path:
        """Write one checkpoint (the payload as its one file) atomically."""
        ...

    def temporary(self, manifest: Manifest) -> Path:
        """The shared temporary directory of a multi-writer checkpoint."""
        ...

    def commit(self, tmp: Path, manifest: Manifest, payload: Payload | bytes) -> Path:
        """Finish a multi-writer checkpoint: payload, file table, manifest, rename."""
        ...

    def candidates(self) -> list[Candidate]:
        """Every checkpoint, newest first (Candidate.sort_key)."""
        ...

    def find(self, name: str) -> Candidate | None:
        """The checkpoint of that directory name, if present."""
        ...

    def read_verified(self, candidate: Candidate) -> bytearray:
        """The payload's bytes, size and checksum checked."""
        ...

    def check_sizes(self, candidate: Candidate) -> None:
        """The cheap check: every listed file exists with its size."""
        ...

    def verify_files(self, candidate: Candidate) -> None:
        """Size and checksum of every listed file."""
        ...

    def prune(self, kind: str, keep: int, keep_from_step: int | None = None) -> list[Path]:
        """Remove all but the ``keep`` newest steps of one kind."""
        ...

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove what interrupted writes left, never what a live writer
        is writing (at startup only)."""
        ...
