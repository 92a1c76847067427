"""The run directory: checks before training, and the run's identity.

Every run directory gets a random run id the first time a job uses it
(``RUN_DIR/.jitckpt/run.json``). Checkpoints record it, so a checkpoint
copied in from another run is recognised and refused instead of being
resumed from silently.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

from jitckpt.errors import RunDirError

PRIVATE_DIR = ".jitckpt"
RUN_FILE = "run.json"
# Worker-side detail the console does not need (a survivor's traceback of
# the collective its dead peer broke): one file per attempt and rank.
LOGS_DIR = "logs"


# Written by rank 0 when a run's training loop completes: which launch
# finished it at which step (a later launch that resumes the run says so).
FINISHED_FILE = "finished.json"


def record_finished(run_dir: str | os.PathLike[str], step: int, launch: str | None) -> None:
    """Mark the run finished at ``step`` by ``launch`` (written whole)."""
    private = Path(run_dir) / PRIVATE_DIR
    private.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=private, prefix=".finished-", delete=False) as tmp:
        json.dump({"step": step, "launch": launch}, tmp)
    os.replace(tmp.name, private / FINISHED_FILE)


def read_finished(run_dir: str | os.PathLike[str]) -> tuple[int, str | None] | None:
    """(step, launch) of the run's completion, or None (not finished, or a
    marker that does not parse: it only feeds a message)."""
    try:
        data = json.loads((Path(run_dir) / PRIVATE_DIR / FINISHED_FILE).read_text())
        step, launch = data["step"], data.get("launch")
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(step, int) or isinstance(step, bool) or not isinstance(launch, str | None):
        return None
    return step, launch


def worker_log(run_dir: str | os.PathLike[str], attempt: object, rank: object) -> Path:
    """Where a worker of ``attempt`` and ``rank`` writes its detail."""
    return Path(run_dir) / LOGS_DIR / f"attempt-{attempt}-rank-{rank}.log"


def prepare_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Create the run directory and prove it is writable, or raise RunDirError."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(
            f"run directory {path} exists and is not a directory; pass a directory path"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {path}: {exc.strerror or exc}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise RunDirError(
            f"run directory {path} is not writable ({exc.strerror or exc}); checkpoints could "
            f"not be saved there. Pass a writable --run-dir."
        ) from None
    return path


def run_id(run_dir: Path) -> str:
    """The run directory's id, created on first use. Every rank may call
    this at once: the file is published with link(), which fails if another
    rank got there first, so all ranks read the same id. A run directory
    that has checkpoints but lost its id file (or predates it) takes the id
    its newest checkpoint recorded, so its own checkpoints stay usable."""
    private = run_dir / PRIVATE_DIR
    target = private / RUN_FILE
    if not target.exists():
        private.mkdir(exist_ok=True)
        value = _recorded_run_id(run_dir) or uuid.uuid4().hex
        with tempfile.NamedTemporaryFile("w", dir=private, prefix=".run-", delete=False) as tmp:
            json.dump({"run_id": value}, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        try:
            os.link(tmp.name, target)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp.name)
    try:
        value = json.loads(target.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(
            f"{target} is unreadable ({exc}); it names this run. Restore it from a backup, or "
            f"delete it if no checkpoint of this run directory is needed."
        ) from None
    return str(value)


def _recorded_run_id(run_dir: Path) -> str | None:
    for manifest in sorted(run_dir.glob("checkpoints/step-*/manifest.json"), reverse=True):
        try:
            value = json.loads(manifest.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str):
            return value
    return None
