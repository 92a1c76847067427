"""``jitckpt run``: the launcher, its elastic agent, and how workers start.

Owns: torchrun's parser and torch.distributed.elastic's agent with a short
kill grace, fatal-error stop and event logging (launcher, agent); one
process context per worker and per hot spare for in-process recovery
(workers); the warm process pool that forks workers with torch already
imported (warmpool, zygote, warmclient, wire); and the worker entry point
that installs the signal thread first (bootstrap). Talks to workers only
through jitckpt.protocol (environment, control directory, store keys, exit
codes); never imports the worker runtime (checkpoint, state, inprocess).
One exception, in a worker only: adopt hands a script's plain
``torch.distributed.init_process_group`` to jitckpt.distributed when the
script calls it.
At the end of a run it waits for the persisters of staged checkpoints and
frees what they persisted (jitckpt.storage.staging.settle, torch-free) and
prints jitckpt.analysis.summary (torch-free).
bootstrap and the warm-pool client run before torch is imported in a
worker and import only the standard library.
"""
