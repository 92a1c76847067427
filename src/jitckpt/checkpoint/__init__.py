"""JitCheckpoint and its parts: the library a training process runs.

Owns: composing a rank's JIT checkpointing (jit_checkpoint), the layouts
that make DDP and sharded models differ behind one interface (layout, ddp,
sharded, writers), writing checkpoints (saver, periodic, gpu), choosing
and loading one on start (restorer), the one failure exit (failure), and
the hooks on the script's objects (hooks). May import everything below it:
state, detect, storage, inprocess, comm, tracker, attempt and the
torch-free vocabulary (errors, events, protocol, inject); never the
launcher (jitckpt.launch) or the offline analysis (jitckpt.analysis).
"""

from jitckpt.checkpoint.jit_checkpoint import JitCheckpoint

__all__ = ["JitCheckpoint"]
