"""Offline analysis of runs and strategies: `jitckpt report`, `jitckpt
simulate`, `jitckpt inspect` and the launcher's end-of-run summary.

Owns: the per-failure summary and the attempt timeline read from the event
log, the report (text, JSON, picture), the wasted-GPU-time cost model with
its Monte-Carlo check, and the checkpoint table. Torch-free: imports only
jitckpt.events, jitckpt.storage and the standard library (matplotlib
lazily, for pictures).
"""
