"""What a training state is: its parts, its bytes, its randomness, its data
position, its digest, and the mesh of a sharded model.

Owns: TrainingState (capture and restore of model, optimizer, scheduler,
scaler, data position, RNG, extras), the pickle-free archive format, RNG
capture and deterministic reseeding, the data loader position and the
world-size-change rule, the SHA-256 digest, and the FSDP/HSDP mesh with
its DCP reads and writes. Imports torch, and of jitckpt only the errors
and compat modules: it knows nothing of failures, storage or launchers.
"""
