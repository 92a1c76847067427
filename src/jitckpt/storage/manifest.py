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
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jitckpt.errors import CheckpointError
from jitckpt.storage.files import read_regular

MANIFEST = "manifest.json"
PAYLOAD = "state.pt"
FORMAT = "jitckpt/1"
# Kinds, by preference when two checkpoints hold the same step.
KINDS = ("jit", "periodic")
# Layout types this version writes (jitckpt.state.mesh: DDP, and FSDP2/HSDP).
LAYOUT_TYPES = ("ddp", "fsdp", "hsdp")


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
        data[CHECKSUM] = own_checksum(data)
        return data

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Validate parsed JSON; raise CheckpointError naming ``where`` and
        the first field that is missing, of the wrong type or of a value this
        version never writes, then the manifest's own checksum (a flipped
        bit anywhere, in a manifest that carries one)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise CheckpointError(f"{where}: not a {FORMAT} manifest (format={found!r})")
        for key in ("kind", "step", "world_size", "files"):
            if key not in data:
                raise CheckpointError(f"{where}: manifest lacks '{key}'")
        check = _Fields(data, where)
        fields: dict[str, Any] = {
            "kind": check.choice("kind", KINDS),
            "step": check.integer("step", 0),
            "world_size": check.integer("world_size", 1),
            "writer_rank": check.integer("writer_rank", 0) if "writer_rank" in data else 0,
            "attempt": check.integer("attempt", 0) if "attempt" in data else 0,
            "layout": check.layout(),
            "model_signature": check.signature(),
            "run_id": check.optional("run_id", (str,), "a string"),
            "created": check.optional("created", (int, float), "a number"),
            "torch_version": check.optional("torch_version", (str,), "a string"),
            "jitckpt_version": check.optional("jitckpt_version", (str,), "a string"),
            "reason": check.optional("reason", (str,), "a string"),
            "writer_ranks": check.ranks("writer_ranks"),
            "exact_buffers": check.optional_bool("exact_buffers"),
            "files": _files(data["files"], where),
        }
        recorded = data.get(CHECKSUM)
        if recorded is not None and recorded != own_checksum(data):
            raise CheckpointError(
                f"{where}: manifest checksum mismatch ({own_checksum(data)}, the manifest "
                f"says {recorded!r}): the manifest is corrupt. An older checkpoint is used "
                f"instead if one is valid"
            )
        return cls(**fields)


# The manifest's own checksum: CRC32 of its canonical JSON without this key.
# Manifests of earlier versions lack it and are checked field by field only.
CHECKSUM = "manifest_crc32"


def own_checksum(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode()):08x}"


class _Fields:
    """Checks of the fields of one parsed manifest; each raises
    CheckpointError naming the file, the field, its value and what this
    version writes there."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def bad(self, key: str, wanted: str, value: Any = None) -> CheckpointError:
        shown = self.data[key] if value is None else value
        text = repr(shown)
        text = text if len(text) <= 80 else text[:77] + "..."
        return CheckpointError(
            f"{self.where}: manifest field '{key}' is {text}, not {wanted} (garbled); "
            f"this checkpoint is refused and an older one is used if one is valid"
        )

    def integer(self, key: str, low: int) -> int:
        value = self.data[key]
        if not _is_int(value) or value < low:
            raise self.bad(key, f"an integer >= {low}")
        return int(value)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.data[key]
        if value not in allowed or not isinstance(value, str):
            raise self.bad(key, "one of " + ", ".join(allowed))
        return value

    def optional(self, key: str, kinds: tuple[type, ...], wanted: str) -> Any:
        value = self.data.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise self.bad(key, wanted)
        return value

    def optional_bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.bad(key, "true, false or null")
        return value

    def ranks(self, key: str) -> list[int] | None:
        value = self.optional(key, (list,), "a list of ranks")
        if value is not None and not all(_is_int(r) and r >= 0 for r in value):
            raise self.bad(key, "a list of ranks")
        return value

    def layout(self) -> dict[str, Any]:
        value = self.optional("layout", (dict,), "an object")
        if value is None:
            return {"type": "ddp"}
        if value.get("type") not in LAYOUT_TYPES:
            raise self.bad("layout", "an object whose 'type' is one of " + ", ".join(LAYOUT_TYPES))
        shape = value.get("mesh_shape")
        if shape is not None and not (
            isinstance(shape, list) and all(_is_int(n) and n > 0 for n in shape)
        ):
            raise self.bad("layout", "a mesh_shape of positive integers")
        dims = value.get("mesh_dim_names")
        if dims is not None and not (
            isinstance(dims, list) and all(isinstance(d, str) for d in dims)
        ):
            raise self.bad("layout", "mesh_dim_names of strings")
        return value

    def signature(self) -> dict[str, list[Any]]:
        value = self.optional("model_signature", (dict,), "an object")
        for name, entry in (value or {}).items():
            ok = (
                isinstance(entry, list)
                and len(entry) == 2
                and isinstance(entry[0], list)
                and all(_is_int(n) and n >= 0 for n in entry[0])
                and isinstance(entry[1], str)
                and entry[1].isidentifier()
            )
            if not ok:
                raise self.bad("model_signature", f"[shape, dtype] for {name!r}", {name: entry})
        return value or {}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_file_name(name: Any, where: str) -> str:
    """A file name a manifest may list: one plain name inside the checkpoint
    directory (no '/', no '..', not absolute, no NUL), or CheckpointError."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name) > 255
    ):
        raise CheckpointError(
            f"{where}: manifest lists the file {name!r}, which is not a plain name inside "
            f"the checkpoint directory (garbled or forged); refused"
        )
    return name


def _files(files: Any, where: str) -> dict[str, FileEntry]:
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: manifest field 'files' is not an object (garbled)")
    entries = {}
    for name, entry in files.items():
        check_file_name(name, where)
        ok = (
            isinstance(entry, dict)
            and _is_int(entry.get("size"))
            and entry["size"] >= 0
            and set(entry) <= {"size", "crc32", "sha256"}
            and (_is_hex(entry.get("crc32"), 8) or _is_hex(entry.get("sha256"), 64))
        )
        if not ok:
            raise CheckpointError(
                f"{where}: manifest field 'files': the entry of {name!r} is {entry!r}, not a size and a "
                f"checksum (garbled)"
            )
        entries[name] = FileEntry(entry["size"], entry.get("crc32"), entry.get("sha256"))
    return entries


def _is_hex(value: Any, digits: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == digits
        and all(c in "0123456789abcdef" for c in value)
    )


# Largest manifest read: a model signature of a few hundred thousand tensors
# fits many times over; a bigger file is garbage, not read into memory.
MAX_MANIFEST_BYTES = 64 << 20


def read_manifest(path: Path) -> Manifest:
    """The manifest of the checkpoint directory ``path``; CheckpointError if
    it is missing, not a regular file, not JSON, or not a valid manifest."""
    manifest_path = path / MANIFEST
    try:
        data = json.loads(read_regular(manifest_path, limit=MAX_MANIFEST_BYTES))
    except CheckpointError as exc:
        if str(exc).endswith("file missing"):
            raise CheckpointError(
                f"{manifest_path}: manifest missing (incomplete checkpoint)"
            ) from None
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{manifest_path}: manifest is not valid JSON ({exc})") from None
    return Manifest.from_json(data, str(manifest_path))
