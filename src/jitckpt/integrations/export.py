"""Writing a JIT checkpoint into a framework's own checkpoint directory,
shared by the integrations.

Every survivor of a failure saves the same step (DDP: any copy serves every
rank), so every survivor exports it, each into a temporary directory of its
own; the first to rename it into place wins, and the others add only their
per-rank files (their random-number states) to the winner's. A directory
that already exists under the final name (the framework's own save of that
step, or an earlier export) is never overwritten. A framework whose
checkpoint is one file (Lightning's ``.ckpt``) gets the same from
:func:`export_file`: a temporary file hard-linked into place, which fails
rather than replace a file of that name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jitckpt import _version
from jitckpt.storage.directory import fsync_path

# The marker file of an exported directory: jitckpt wrote it on a failure.
MARKER = "jitckpt-export.json"


def copied(tree: Any) -> Any:
    """The tree with every tensor cloned to its own storage: torch.save of a
    view would write the whole storage it views."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {key: copied(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(copied(value) for value in tree)
    return tree


def plain_rng(saved: Mapping[str, Any]) -> dict[str, Any]:
    """jitckpt's saved RNG state (jitckpt.state.rng.to_checkpoint) as the
    generators' own get-state values."""
    version, internal, gauss = saved["python"]
    name, keys, pos, has_gauss, cached = saved["numpy"]
    return {
        "python": (version, tuple(internal), gauss),
        "numpy": (name, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached),
        "torch": saved["torch"],
        **({"cuda": saved["cuda"]} if "cuda" in saved else {}),
    }


def export_directory(
    final: Path,
    rank: int,
    write_shared: Callable[[Path], None],
    write_own: Callable[[Path], None],
    marker: Mapping[str, Any],
    *,
    temporary: str | None = None,
) -> Path | None:
    """Create ``final`` with ``write_shared`` (the state every copy has) and
    ``write_own`` (this rank's files), atomically; if another rank created it
    first, add this rank's own files to it. Returns ``final``, or None when a
    directory of that name was there before (left as it was). ``temporary``
    names the temporary directory beside it (default
    ``.<final name>.jitckpt-tmp``; rank and pid are appended)."""
    if final.exists() and not (final / MARKER).exists():
        return None  # the framework's own checkpoint of this step
    stem = temporary if temporary is not None else f".{final.name}.jitckpt-tmp"
    tmp = final.parent / f"{stem}-{rank}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if not final.exists():
            write_shared(tmp)
            (tmp / MARKER).write_text(
                json.dumps({**marker, "writer_rank": rank, "jitckpt_version": _version.__version__})
            )
            write_own(tmp)
            _fsync_tree(tmp)
            try:
                os.rename(tmp, final)
                fsync_path(final.parent)
                return final
            except OSError:
                if not (final / MARKER).exists():
                    raise
        # Another survivor's copy is in place: add this rank's own files.
        own = tmp / "own"
        own.mkdir(exist_ok=True)
        write_own(own)
        for item in own.iterdir():
            os.replace(item, final / item.name)
        fsync_path(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_file(final: Path, rank: int, write: Callable[[Path], None]) -> Path:
    """Create the file ``final`` with ``write``, atomically, unless a file of
    that name exists: the framework's own, or another survivor's copy of
    the same step (left as it is). Returns ``final``."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.jitckpt-tmp-{rank}-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, final)  # never replaces a file: fails if one is there
        except FileExistsError:
            return final
        except OSError:  # a filesystem without hard links
            if final.exists():
                return final
            os.rename(tmp, final)
        fsync_path(final.parent)
        return final
    finally:
        tmp.unlink(missing_ok=True)


def read_marker(directory: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The marker of a checkpoint directory jitckpt exported, else None."""
    if directory is None:
        return None
    try:
        return dict(json.loads((Path(directory) / MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_path(root)
