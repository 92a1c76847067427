"""Helpers for tests and benchmarks of real multi-process jobs: tagging
every process a command starts so that cleanup can kill exactly those, by
pid. Standard library only; never imported by the library itself.
"""
