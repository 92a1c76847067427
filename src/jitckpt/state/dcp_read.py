"""Reading a sharded checkpoint with torch.distributed.checkpoint without
running code from it.

DCP's ``FileSystemReader.read_metadata`` reads the ``.metadata`` file with
``pickle.load``, and its default load planner reads every non-tensor entry
(the optimizer's param_groups) with ``torch.load(weights_only=False)``: a
forged sharded checkpoint could run anything on load. jitckpt reads both
itself: :class:`SafeReader` unpickles ``.metadata`` with
:class:`MetadataUnpickler`, which resolves only the classes DCP's metadata
is made of (an allow-list) and refuses every other global, so nothing a
forger writes there can be called; it also confines every storage entry to
a plain file name of the checkpoint directory, with a non-negative extent
inside that file. :class:`SafePlanner` reads the non-tensor entries with
``weights_only=True``. Tensor entries DCP already reads with
``weights_only=True``. Every refusal is a CheckpointError naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from jitckpt.errors import CheckpointError
from jitckpt.state.training import SAFE_REFUSAL, first_line

METADATA_FILE = ".metadata"

# (module, name) pairs the metadata of a DCP save is made of, as measured on
# torch 2.13: the metadata dataclasses, the storage entries, torch.Size,
# dtypes and layouts, and the path the checkpoint was saved to.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the allow-listed classes (and torch
    dtypes): any other global (``os.system``, ``builtins.eval``, a user
    class) is refused before it could be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"global {module}.{name} is not part of DCP's metadata (refused, not called)"
        )


def read_metadata(path: Path) -> Metadata:
    """The metadata of the DCP checkpoint in directory ``path``, unpickled
    with :class:`MetadataUnpickler` and checked; CheckpointError otherwise."""
    file = path / METADATA_FILE
    data = _read_plain_file(file)
    try:
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - whatever a garbled pickle raises
        raise CheckpointError(
            f"{file}: refused by jitckpt's restricted unpickler for DCP metadata "
            f"({type(exc).__name__}: {exc}); nothing in it was run"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: not DCP metadata ({type(metadata).__name__})")
    for index, info in metadata.storage_data.items():
        _check_entry(path, file, index, info)
    return metadata


def _check_entry(path: Path, file: Path, index: Any, info: Any) -> None:
    name: Any = getattr(info, "relative_path", None)
    offset: Any = getattr(info, "offset", None)
    length: Any = getattr(info, "length", None)
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
    ints = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (offset, length))
    if not plain or not ints or getattr(info, "transform_descriptors", None):
        raise CheckpointError(
            f"{file}: entry {index} points at {name!r} [{offset!r}, +{length!r}], not an "
            f"extent of a plain file of the checkpoint (forged or garbled)"
        )
    try:
        info_stat = (path / name).lstat()
    except OSError:
        raise CheckpointError(f"{file}: entry {index} names a missing file {name!r}") from None
    if not stat.S_ISREG(info_stat.st_mode) or offset + length > info_stat.st_size:
        raise CheckpointError(
            f"{file}: entry {index} lies outside the regular file {name!r} (forged or garbled)"
        )


def _read_plain_file(file: Path) -> bytes:
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(
            f"{file}: cannot be read as a regular file ({exc.strerror})"
        ) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{file}: not a regular file (refused)")
        return handle.read()


class SafeReader(FileSystemReader):
    """DCP's file-system reader serving metadata already read by
    :func:`read_metadata` (before ``dcp.load``, so that a refusal is a
    CheckpointError rather than DCP's wrapped exception) in place of its
    ``pickle.load``."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._metadata = read_metadata(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor entries with
    ``weights_only=True`` (plain values and containers only)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - refused or garbled
            raise CheckpointError(
                f"DCP entry {read_item.dest_index.fqn}: {SAFE_REFUSAL}: {first_line(exc)}"
            ) from None
        # Handed on re-serialized from what weights_only accepted (plain values
        # and tensors): DefaultLoadPlanner's own torch.load then sees only that.
        clean = io.BytesIO()
        torch.save(loaded, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)
