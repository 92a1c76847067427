"""Checkpoints on a filesystem: layout, atomic writes, verification.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-<N>-<kind>-a<attempt>-r<rank>``
holding ``state.pt`` (the payload) and ``manifest.json`` (written last). It
is written under a temporary name, every file and the directory fsynced,
then renamed into place, and the parent directory fsynced: a checkpoint
exists only once it is complete, and a writer killed mid-save leaves at most
a ``.tmp-*`` directory that readers ignore and rank 0 removes when the job
next starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jitckpt.errors import CheckpointError

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
PAYLOAD = "state.pt"
FORMAT = "jitckpt/1"
# Kinds, by preference when two checkpoints hold the same step.
KINDS = ("jit", "periodic")
_HASH_CHUNK = 1 << 22


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Points of a write where a crash-consistency test (and the fault injector's
# ``save`` phase, at "payload_written") can stop the writer.
WRITE_POINTS = ("tmp_created", "payload_half", "payload_written", "manifest_written", "renamed")
WritePointHook = Callable[[str], None]


def _write_file(path: Path, data: bytes, on_point: WritePointHook | None = None) -> None:
    with open(path, "wb") as handle:
        half = len(data) // 2
        handle.write(data[:half])
        if on_point is not None:
            handle.flush()
            on_point("payload_half")
        handle.write(data[half:])
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(
    run_dir: str | os.PathLike[str],
    manifest: dict[str, Any],
    payload: bytes,
    on_point: WritePointHook | None = None,
) -> Path:
    """Write one checkpoint atomically and return its directory.
    ``manifest`` must hold kind, step, attempt and writer_rank; the file table
    and format are added here. ``on_point(name)`` is called at each of
    WRITE_POINTS (for fault injection and crash tests)."""
    point = on_point or (lambda _name: None)
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = (
        f"step-{manifest['step']:09d}-{manifest['kind']}"
        f"-a{manifest['attempt']}-r{manifest['writer_rank']}"
    )
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    point("tmp_created")
    _write_file(tmp / PAYLOAD, payload, on_point)
    point("payload_written")
    full = dict(manifest)
    full["format"] = FORMAT
    full["files"] = {PAYLOAD: {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}
    _write_file(tmp / MANIFEST, json.dumps(full, indent=1, sort_keys=True).encode())
    point("manifest_written")
    _fsync_path(tmp)
    os.rename(tmp, final)
    point("renamed")
    _fsync_path(root)
    return final


@dataclass
class Candidate:
    """A checkpoint directory and what its manifest says (if readable)."""

    path: Path
    manifest: dict[str, Any] | None
    problem: str | None  # why it cannot be used, if known without reading the payload

    @property
    def step(self) -> int:
        return int(self.manifest["step"]) if self.manifest else -1

    def sort_key(self) -> tuple[int, int, int, int]:
        m = self.manifest or {}
        kind = KINDS.index(m["kind"]) if m.get("kind") in KINDS else len(KINDS)
        return (-self.step, kind, -int(m.get("attempt", 0)), int(m.get("writer_rank", 0)))


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a checkpoint's manifest; raise CheckpointError."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{manifest_path}: manifest missing (incomplete checkpoint)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{manifest_path}: not a {FORMAT} manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    for key in ("kind", "step", "world_size", "files"):
        if key not in manifest:
            raise CheckpointError(f"{manifest_path}: manifest lacks '{key}'")
    files = manifest["files"]
    if (
        not isinstance(manifest["step"], int)
        or not isinstance(manifest["world_size"], int)
        or not isinstance(files, dict)
        or not all(
            isinstance(e, dict)
            and isinstance(e.get("size"), int)
            and isinstance(e.get("sha256"), str)
            for e in files.values()
        )
    ):
        raise CheckpointError(f"{manifest_path}: manifest fields have the wrong types (garbled)")
    return manifest


def read_manifest_or_explain(path: Path, shared_hint: bool = False) -> dict[str, Any]:
    """read_manifest, with a hint when a peer's choice is missing here."""
    if shared_hint and not path.exists():
        raise CheckpointError(
            f"{path}: chosen by rank 0 but not present on this rank; do all ranks see the "
            f"same --run-dir (a shared filesystem at the same path)?"
        )
    return read_manifest(path)


def candidates(run_dir: str | os.PathLike[str]) -> list[Candidate]:
    """Every checkpoint directory of a run, newest step first. Temporary
    directories of interrupted saves are not candidates."""
    root = checkpoints_dir(run_dir)
    found: list[Candidate] = []
    if not root.is_dir():
        return found
    for path in root.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            found.append(Candidate(path, read_manifest(path), None))
        except CheckpointError as exc:
            found.append(Candidate(path, None, str(exc)))
    found.sort(key=Candidate.sort_key)
    return found


def read_verified(path: Path, manifest: dict[str, Any]) -> bytes:
    """The payload's bytes, after checking size and SHA-256 against the manifest."""
    entry = manifest["files"].get(PAYLOAD)
    file_path = path / PAYLOAD
    if entry is None:
        raise CheckpointError(f"{path / MANIFEST}: lists no {PAYLOAD}")
    try:
        data = file_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file_path}: file missing") from None
    if len(data) != entry["size"]:
        raise CheckpointError(
            f"{file_path}: truncated or padded: {len(data)} bytes, manifest says {entry['size']}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"{file_path}: checksum mismatch (sha256 {digest[:12]}..., manifest says "
            f"{entry['sha256'][:12]}...): the file is corrupt"
        )
    return data


def check_sizes(path: Path, manifest: dict[str, Any]) -> None:
    """The cheap check: every listed file exists with its recorded size."""
    for name, entry in manifest["files"].items():
        file_path = path / name
        try:
            size = file_path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file_path}: file missing") from None
        if size != entry["size"]:
            raise CheckpointError(
                f"{file_path}: truncated or padded: {size} bytes, manifest says {entry['size']}"
            )


def verify(path: Path) -> dict[str, Any]:
    manifest = read_manifest(path)
    read_verified(path, manifest)
    return manifest


def iter_valid(
    run_dir: str | os.PathLike[str],
) -> Iterator[tuple[Candidate, bytes | None, str | None]]:
    """Candidates newest first, each with its verified payload or the reason it
    was refused."""
    for candidate in candidates(run_dir):
        if candidate.problem is not None or candidate.manifest is None:
            yield candidate, None, candidate.problem
            continue
        try:
            yield candidate, read_verified(candidate.path, candidate.manifest), None
        except CheckpointError as exc:
            yield candidate, None, str(exc)


def remove_stale_temporaries(run_dir: str | os.PathLike[str]) -> None:
    """Remove ``.tmp-*`` leftovers of saves that were killed midway. Only
    called at startup, when no save of this run can be in flight."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def prune(
    run_dir: str | os.PathLike[str], kind: str, keep: int, keep_from_step: int | None = None
) -> list[Path]:
    """Remove all but the ``keep`` newest steps of one kind; returns what was
    removed. Several ranks' copies of one step count as one step, and only
    checkpoints whose files are all there count. Nothing at or after
    ``keep_from_step`` (the step just restored) is removed."""
    usable = []
    for candidate in candidates(run_dir):
        if candidate.manifest is None or candidate.manifest.get("kind") != kind:
            continue
        try:
            check_sizes(candidate.path, candidate.manifest)
        except CheckpointError:
            continue
        usable.append(candidate)
    steps = sorted({c.step for c in usable}, reverse=True)
    if len(steps) <= keep or keep <= 0:
        return []
    cutoff = steps[keep - 1]
    if keep_from_step is not None:
        cutoff = min(cutoff, keep_from_step)
    removed = []
    for candidate in usable:
        if candidate.step < cutoff:
            shutil.rmtree(candidate.path, ignore_errors=True)
            removed.append(candidate.path)
    return removed
