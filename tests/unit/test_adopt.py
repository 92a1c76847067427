"""jitckpt.launch.adopt: which init_process_group calls are adopted, and
that the patch lands whether torch is imported before or after it (run in
a fresh interpreter: the patch changes torch.distributed for the process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jitckpt.launch.adopt import adopts

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize(
    ("arguments", "adopted"),
    [
        ({"backend": "gloo"}, True),
        ({}, True),
        ({"backend": "gloo", "init_method": "env://"}, True),
        ({"backend": "nccl", "device_id": 0}, True),
        ({"backend": "gloo", "store": object()}, False),
        ({"backend": "gloo", "init_method": "tcp://127.0.0.1:1234"}, False),
        ({"backend": "gloo", "init_method": "file:///tmp/x"}, False),
        ({"backend": "gloo", "group_name": "mine"}, False),
    ],
)
def test_only_the_call_that_reads_the_launchers_environment_is_adopted(
    arguments: dict[str, object], adopted: bool
) -> None:
    assert adopts(arguments) is adopted


PROBE = """
import sys
from jitckpt.launch import adopt
{before}
adopt.install()
import torch.distributed as dist
from torch.distributed import distributed_c10d, device_mesh
calls = []
import jitckpt.distributed
jitckpt.distributed.init_process_group = lambda backend, **kw: calls.append((backend, kw))
print(getattr(dist.init_process_group, adopt.ADOPTED_MARK, False),
      distributed_c10d.init_process_group is dist.init_process_group,
      device_mesh.init_process_group is dist.init_process_group)
dist.init_process_group("gloo")
print(calls)
# A call with its own store goes to torch's own function, untouched.
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
print(dist.get_world_size(), len(calls))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("torch_first", [True, False], ids=["warm-pool", "cold"])
def test_the_plain_call_builds_jitckpts_group(torch_first: bool) -> None:
    code = PROBE.format(before="import torch" if torch_first else "")
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # torch.distributed, the defining module and device_mesh's own copy
    # (init_device_mesh makes the group through it when none exists).
    assert lines[0] == "True True True", done.stdout
    assert lines[1] == "[('gloo', {'timeout': None})]", done.stdout
    assert lines[2] == "1 1", done.stdout
