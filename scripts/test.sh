#!/usr/bin/env bash
# The test command: installs the pinned dev requirements, then runs the
# linters, the type checker and the whole test suite (about 11 minutes on a
# 2-core machine: tests/unit in under a minute, then tests/drills, real 4-rank jobs
# on gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps -r requirements-torchtitan.txt
ruff check src tests examples benchmarks
ruff format --check src tests benchmarks
mypy
python -m pytest -q "$@"
