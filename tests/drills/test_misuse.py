"""Mistakes a user integrating jitckpt makes, each caught with a message
that names the fix (not a silent run, a restart loop or a misleading error)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from jobs import jitckpt_run, show

from jitckpt.events import read_events

# A loop that forgot ckpt.steps(): everything else is integrated.
UNTRACKED_LOOP = """
import sys
import torch
import jitckpt

jitckpt.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
ckpt = jitckpt.JitCheckpoint(sys.argv[1], model, optimizer)
for step in range(4):  # should be: for step in ckpt.steps(4)
    optimizer.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
"""


def test_a_loop_outside_ckpt_steps_is_warned_about_and_its_inject_said_never_fired(
    tmp_path: Path,
) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(UNTRACKED_LOOP))
    spec = "kill@step=2,rank=1,phase=backward"
    launch = jitckpt_run(
        "--inject", spec, str(script), str(tmp_path / "run"), nproc=2
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    # Once per rank, at the first optimizer step, naming the fix.
    assert launch.output.count("loop not tracked") == 2, show(launch)
    assert "for step in ckpt.steps(total_steps):" in launch.output, show(launch)
    # The kill could not fire: no step was counted. The summary says so.
    assert f"injected fault {spec} never fired" in launch.output, show(launch)


# Integrated, but looping over a plain DataLoader with ckpt.steps(), which
# cannot know the loader's position (ckpt.batches(loader) can).
PLAIN_LOADER = """
import sys
import torch
from torch.utils.data import DataLoader
import jitckpt

jitckpt.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(list(range(8)), batch_size=2)
ckpt = jitckpt.JitCheckpoint(sys.argv[1], model, optimizer, loader=loader)
for step in ckpt.steps(4):
    pass
"""


def test_an_error_no_restart_can_fix_stops_the_job_at_once_with_78(tmp_path: Path) -> None:
    """A loader jitckpt cannot take is the script's configuration: every
    attempt would fail the same way, so the launcher stops after the first
    (exit 78) instead of restarting three times and exiting 1."""
    from jitckpt.protocol import EXIT_FATAL

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(PLAIN_LOADER))
    launch = jitckpt_run(str(script), str(tmp_path / "run"), nproc=2)
    assert launch.returncode == EXIT_FATAL, show(launch)
    assert "ckpt.batches(loader)" in launch.output, show(launch)
    assert "StatefulDataLoader" in launch.output, show(launch)
    # One attempt: both ranks failed once, nothing was restarted, and the
    # console does not claim otherwise.
    assert launch.output.count("jitckpt: error: a plain DataLoader has no state_dict") == 2, show(
        launch
    )
    assert not [e for e in read_events(tmp_path / "run") if e["event"] == "restart_begin"]
    assert "restarting all workers" not in launch.output, show(launch)


# Integrated, but the group is still made the plain way.
PLAIN_INIT = """
import sys
import torch
import torch.distributed as dist
import jitckpt

dist.init_process_group("gloo")  # not jitckpt.init_process_group
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
ckpt = jitckpt.JitCheckpoint(sys.argv[1], model, optimizer)
for step in ckpt.steps(6):
    optimizer.zero_grad()
    gen = torch.Generator().manual_seed(step * 10 + dist.get_rank())
    model(torch.randn(2, 4, generator=gen)).sum().backward()
    optimizer.step()
if dist.get_rank() == 0:
    print("final", model.module.weight.sum().item(), flush=True)
"""


@pytest.fixture(scope="module")
def plain_init_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The PLAIN_INIT script and the final line of its failure-free run."""
    base = tmp_path_factory.mktemp("plain-init")
    script = base / "train.py"
    script.write_text(textwrap.dedent(PLAIN_INIT))
    reference = jitckpt_run(str(script), str(base / "ref"), nproc=2)
    assert reference.returncode == 0, show(reference)
    return script, final_lines(reference.output)


def final_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("final ")]


@pytest.mark.parametrize("recovery", ["restart", "auto"])
def test_a_plain_init_process_group_is_adopted_and_survives_a_failure(
    tmp_path: Path, recovery: str, plain_init_reference: tuple[Path, list[str]]
) -> None:
    """A script that kept `dist.init_process_group("gloo")`: the restarted
    attempt used to fail ("Gloo connectFullMesh failed ... Connection
    refused": the agent's store still held the old attempt's addresses).
    Adopted by the bootstrap, the group survives a kill on both paths and
    the run ends where the failure-free run does."""
    script, expected = plain_init_reference
    launch = jitckpt_run(
        "--recovery", recovery, "--inject", "kill@step=3,rank=1,phase=backward",
        str(script), str(tmp_path / "run"), nproc=2,
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    assert "Connection refused" not in launch.output, show(launch)
    failed = [e for e in read_events(tmp_path / "run") if e["event"] == "fault_injected"]
    assert len(failed) == 1, show(launch)
    final = final_lines(launch.output)
    assert final == expected and final, show(launch)


def test_the_same_command_on_a_finished_run_directory_says_so(tmp_path: Path) -> None:
    """Re-running a finished run resumes its newest checkpoint (here a
    manual save of step 2) and trains again from it: said, with what to do,
    instead of a silent second run."""
    from jobs import TINY

    args = [str(TINY), "--run-dir", str(tmp_path / "run"), "--steps", "4", "--save-at", "2"]
    first = jitckpt_run(*args, nproc=2)
    assert first.returncode == 0, show(first)
    assert "had finished" not in first.output, show(first)
    again = jitckpt_run(*args, nproc=2)
    assert again.returncode == 0, show(again)
    said = "had finished (4 steps); this job resumes its checkpoint of step 2: steps 2..3 are trained again"
    assert said in again.output, show(again)
    assert "use a new --run-dir" in again.output, show(again)
