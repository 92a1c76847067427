#!/usr/bin/env bash
# Installs the peer that benchmarks/suite.py measures jitckpt against: torchft 0.2.0
# (its wheel carries the torchft_lighthouse binary). Optional, never a dependency of
# jitckpt. torchft goes in with --no-deps and its other requirements from
# benchmarks/requirements-peers.txt, so that pip leaves the installed torch alone;
# the script fails if torch changed anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_before=$(python -c "import torch; print(torch.__version__)")
python -m pip install -q --no-deps torchft==0.2.0
python -m pip install -q -r benchmarks/requirements-peers.txt
torch_after=$(python -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
    echo "install_peers: torch changed from $torch_before to $torch_after" >&2
    exit 1
fi
python -c "import torchft; print('torchft', torchft.__file__)"
command -v torchft_lighthouse
