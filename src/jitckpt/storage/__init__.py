"""Where checkpoints live, and how they get there safely.

Owns: the checkpoint format on disk (the manifest, atomic directory
writes, checksums, retention), shared-memory staging with its detached
persister, and the run directory's identity. Imports only the standard
library and jitckpt's torch-free modules (errors, events, protocol): the
persister runs as its own process without torch, and `jitckpt inspect`
reads checkpoints without it.
"""

from jitckpt.storage.base import WRITE_POINTS, Candidate, Payload, Storage
from jitckpt.storage.directory import (
    CHECKPOINTS_DIR,
    DirectoryStorage,
    checkpoints_dir,
    run_storage,
)
from jitckpt.storage.manifest import MANIFEST, PAYLOAD, FileEntry, Manifest, read_manifest

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "PAYLOAD",
    "WRITE_POINTS",
    "Candidate",
    "DirectoryStorage",
    "FileEntry",
    "Manifest",
    "Payload",
    "Storage",
    "checkpoints_dir",
    "read_manifest",
    "run_storage",
]
