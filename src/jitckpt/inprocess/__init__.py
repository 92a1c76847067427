"""In-process recovery, worker side: survivors keep running while one
process (a hot spare or a fresh one) takes the dead rank's place.

Owns: the recovery itself (recovery: the notice watcher, re-forming the
default group, position exchange, state and gradient transfer; plan: who
sends what once the positions are known), the
graveyard that drops abandoned groups off the training thread, how a spare
or replacement joins (join), and the process group that never
communicates (detached). Imports torch, jitckpt.state, jitckpt.comm,
jitckpt.tracker, jitckpt.attempt, jitckpt.events, jitckpt.protocol and
jitckpt.detect.signals (the launcher's notice arrives as a signal);
never jitckpt.checkpoint (which composes it) or the launcher, whose side
of the recovery (jitckpt.launch.agent) it meets only through the store
keys of jitckpt.protocol.
"""
