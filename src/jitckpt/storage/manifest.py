"""The manifest: what a checkpoint holds, written last into its directory.

``manifest.json`` is the checkpoint's table of contents and its proof of
completeness: it names the step, the job that wrote it (world size, layout,
run id, writer ranks) and every file with its size and checksum. A
checkpoint directory without a valid manifest is not a checkpoint.

:class:`Manifest` is the typed form. :meth:`Manifest.from_json` is the only
way a manifest is read from disk: it refuses (``CheckpointError``, naming
the file and the field) anything this version did not write, so a garbled
or forged manifest never reaches the code that trusts its fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jitckpt.errors import CheckpointError

MANIFEST = "manifest.json"
PAYLOAD = "state.pt"
FORMAT = "jitckpt/1"
# Kinds, by preference when two checkpoints hold the same step.
KINDS = ("jit", "periodic")


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its size and checksum (CRC32 as 8 hex
    digits; SHA-256 is read for checkpoints of other tools)."""

    size: int
    crc32: str | None = None
    sha256: str | None = None

    @property
    def checksum(self) -> str:
        """``algorithm:hex``."""
        return f"crc32:{self.crc32}" if self.crc32 is not None else f"sha256:{self.sha256}"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Manifest:
    """A checkpoint's manifest.

    Args:
        kind: "jit" (saved on a failure) or "periodic" (the backstop).
        step: completed iterations of the saved state.
        world_size: ranks of the job that saved it.
        writer_rank: the rank that wrote (committed) it; with ``attempt``,
            ``kind`` and ``step`` it names the directory.
        attempt: the restart attempt that wrote it.
        layout: the parallel layout ({"type": "ddp"}, or a sharded mesh).
        model_signature: name -> [shape, dtype] of every model tensor.
        run_id: the run directory's id (a copy from another run is refused).
        created, torch_version, jitckpt_version: provenance.
        reason: what triggered a JIT save (a detector's cause, or "manual").
        writer_ranks: the ranks that wrote a sharded checkpoint's shards.
        exact_buffers: whether the model buffers saved are those the
            failure-free run uses at this step (jitckpt.state.buffers); None
            where that does not apply (no buffers, or none DDP broadcasts).
        files: every file with size and checksum (filled in by the storage).
    """

    kind: str
    step: int
    world_size: int
    writer_rank: int = 0
    attempt: int = 0
    layout: dict[str, Any] = field(default_factory=lambda: {"type": "ddp"})
    model_signature: dict[str, list[Any]] = field(default_factory=dict)
    run_id: str | None = None
    created: float | None = None
    torch_version: str | None = None
    jitckpt_version: str | None = None
    reason: str | None = None
    writer_ranks: list[int] | None = None
    exact_buffers: bool | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The checkpoint's directory name."""
        return f"step-{self.step:09d}-{self.kind}-a{self.attempt}-r{self.writer_rank}"

    @property
    def payload_checksum(self) -> str | None:
        entry = self.files.get(PAYLOAD)
        return entry.checksum if entry is not None else None

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "files"
        }
        data["files"] = {name: entry.to_json() for name, entry in self.files.items()}
        data["format"] = FORMAT
        return data

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Validate parsed JSON; raise CheckpointError naming ``where`` and
        the first field that is missing or of the wrong type."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise CheckpointError(f"{where}: not a {FORMAT} manifest (format={found!r})")
        for key in ("kind", "step", "world_size", "files"):
            if key not in data:
                raise CheckpointError(f"{where}: manifest lacks '{key}'")

        def bad(key: str, wanted: str) -> CheckpointError:
            return CheckpointError(
                f"{where}: manifest field '{key}' is {data[key]!r}, not {wanted} (garbled)"
            )

        def integer(key: str, low: int) -> int:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(key, f"an integer >= {low}")
            return value

        def optional(key: str, kinds: tuple[type, ...], wanted: str) -> Any:
            value = data.get(key)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise bad(key, wanted)
            return value

        if not isinstance(data["kind"], str):
            raise bad("kind", "a string")
        fields: dict[str, Any] = {
            "kind": data["kind"],
            "step": integer("step", 0),
            "world_size": integer("world_size", 1),
            "writer_rank": integer("writer_rank", 0) if "writer_rank" in data else 0,
            "attempt": integer("attempt", 0) if "attempt" in data else 0,
            "layout": optional("layout", (dict,), "an object") or {"type": "ddp"},
            "model_signature": optional("model_signature", (dict,), "an object") or {},
            "run_id": optional("run_id", (str,), "a string"),
            "created": optional("created", (int, float), "a number"),
            "torch_version": optional("torch_version", (str,), "a string"),
            "jitckpt_version": optional("jitckpt_version", (str,), "a string"),
            "reason": optional("reason", (str,), "a string"),
        }
        writers = optional("writer_ranks", (list,), "a list of ranks")
        if writers is not None and not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in writers
        ):
            raise bad("writer_ranks", "a list of ranks")
        fields["writer_ranks"] = writers
        exact = data.get("exact_buffers")
        if exact is not None and not isinstance(exact, bool):
            raise bad("exact_buffers", "true, false or null")
        fields["exact_buffers"] = exact
        fields["files"] = _files(data["files"], where)
        return cls(**fields)


def _files(files: Any, where: str) -> dict[str, FileEntry]:
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: manifest field 'files' is not an object (garbled)")
    entries = {}
    for name, entry in files.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and not isinstance(entry.get("size"), bool)
            and entry["size"] >= 0
            and (isinstance(entry.get("crc32"), str) or isinstance(entry.get("sha256"), str))
        )
        if not ok:
            raise CheckpointError(
                f"{where}: manifest entry of file {name!r} is {entry!r}, not a size and a "
                f"checksum (garbled)"
            )
        entries[name] = FileEntry(entry["size"], entry.get("crc32"), entry.get("sha256"))
    return entries


def read_manifest(path: Path) -> Manifest:
    """The manifest of the checkpoint directory ``path``; CheckpointError if
    it is missing, not JSON, or not a valid manifest."""
    manifest_path = path / MANIFEST
    try:
        data = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{manifest_path}: manifest missing (incomplete checkpoint)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: manifest is not valid JSON ({exc})") from None
    return Manifest.from_json(data, str(manifest_path))
