"""How a rank notices a failure it cannot see as an exception: SIGTERM
delivered to a side thread even while the training thread is stuck in gloo
(signals), and hangs, from a progress watchdog and heartbeats in the store
that name the suspects (watchdog).

What a rank does once it noticed is jitckpt.checkpoint.failure's concern.
Imports only the standard library and jitckpt.tracker and
jitckpt.protocol: the worker bootstrap installs the signal thread before
torch is imported.
"""
