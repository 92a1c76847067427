"""jitckpt: just-in-time checkpointing for data-parallel PyTorch training.

When a rank crashes, hangs, raises or is preempted, the healthy replicas save
the state of the last completed step on the spot and the job resumes losing
at most one iteration. See README.md for the five-line change to a training
script and ARCHITECTURE.md for how the pieces fit.

The public names are imported lazily so that ``import jitckpt`` (and the
``jitckpt`` command line) does not pay for ``import torch``, and so that the
worker bootstrap can block SIGTERM before torch starts any thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jitckpt._version import __version__

__all__ = [
    "JitCheckpoint",
    "ElasticDistributedSampler",
    "init_process_group",
    "init_device_mesh",
    "state_digest",
    "CheckpointError",
    "CheckpointMismatchError",
    "RunDirError",
    "UsageError",
    "__version__",
]

_LAZY = {
    "JitCheckpoint": "jitckpt.checkpoint",
    "ElasticDistributedSampler": "jitckpt.state.data",
    "init_process_group": "jitckpt.distributed",
    "init_device_mesh": "jitckpt.state.mesh",
    "state_digest": "jitckpt.state.digest",
    "CheckpointError": "jitckpt.errors",
    "CheckpointMismatchError": "jitckpt.errors",
    "RunDirError": "jitckpt.errors",
    "UsageError": "jitckpt.errors",
}

if TYPE_CHECKING:
    from jitckpt.checkpoint import JitCheckpoint
    from jitckpt.distributed import init_process_group
    from jitckpt.errors import CheckpointError, CheckpointMismatchError, RunDirError, UsageError
    from jitckpt.state.data import ElasticDistributedSampler
    from jitckpt.state.digest import state_digest
    from jitckpt.state.mesh import init_device_mesh


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jitckpt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
