"""Helpers for tests and benchmarks of real multi-process jobs: tagging
every process a command starts so that cleanup can kill exactly those, by
pid (proctag); the TCP sockets a process listens on (sockets). Standard
library only; imports nothing else of jitckpt; never imported by the
library itself.
"""
