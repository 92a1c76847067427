"""Editing a checkpoint on disk as a forger (or a bug) would: the payload
or the manifest changed, and the checksums left stale or recomputed so
that only the readers' other checks stand between the edit and a load."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jitckpt.storage import MANIFEST, PAYLOAD
from jitckpt.storage.manifest import CHECKSUM, own_checksum


def read_json(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_bytes())


def reseal(
    path: Path,
    payload: bytes | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    *,
    recompute: bool = True,
) -> None:
    """Replace the payload of checkpoint ``path`` and/or edit its manifest's
    JSON; with ``recompute`` the payload's size and CRC32 and the
    manifest's own checksum are made to match again."""
    data = read_json(path)
    if payload is not None:
        (path / PAYLOAD).write_bytes(payload)
        if recompute:
            data["files"][PAYLOAD] = {"size": len(payload), "crc32": f"{zlib.crc32(payload):08x}"}
    if edit is not None:
        edit(data)
    if recompute and isinstance(data, dict):
        data[CHECKSUM] = own_checksum(data)
    (path / MANIFEST).write_text(json.dumps(data))
