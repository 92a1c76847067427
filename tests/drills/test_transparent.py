"""Transparent mode: `jitckpt run --transparent --deterministic` on an
unchanged plain script (examples/train_cnn_plain.py: an epoch loop over a
plain DataLoader with a DistributedSampler, BatchNorm, dropout, SGD with
momentum, OneCycleLR, clipping, `dist.init_process_group`). Every failure
ends bitwise equal to the failure-free run of the same command, on the
restart path and in process; and what transparent mode cannot follow is
refused before training with exit 78."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from jobs import check_in_process, check_recovered, jitckpt_run, show, transparent_args

from jitckpt.events import read_events
from jitckpt.protocol import EXIT_FATAL, EXIT_SAVED_AND_STOPPED


def run(tmp_path: Path, *flags: str):  # type: ignore[no-untyped-def]
    return jitckpt_run(*flags, *transparent_args(tmp_path / "run", tmp_path / "digest"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cnn_reference: str) -> str:
    """The failure-free run of the same command. It trains exactly as the
    user-level integration of the script does (examples/train_cnn.py):
    the same boundaries, reseeding and data order."""
    base = tmp_path_factory.mktemp("transparent-reference")
    launch = run(base)
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == []
    digest = (base / "digest").read_text().strip()
    assert digest == cnn_reference, "transparent mode trains differently from the user-level API"
    return digest


def test_kill_in_backward_and_hang_resume_bitwise_equal(tmp_path: Path, reference: str) -> None:
    """A kill in backward on the last batch of the first epoch, then a hang
    in the first batch of the third: each resumes at its step, the epochs
    before fast-forwarded, the consumed batches skipped."""
    launch = run(
        tmp_path, "--recovery", "restart",
        "--inject", "kill@step=3,rank=2,phase=backward",
        "--inject", "hang@step=8,rank=1,phase=backward",
    )  # fmt: skip
    check_recovered(tmp_path / "run", tmp_path / "digest", reference, [3, 8], launch)
    # The script's own epoch lines are printed again for fast-forwarded epochs.
    assert launch.output.count("epoch 2 done") == 1, show(launch)


def test_preemption_stops_with_75_and_the_same_command_resumes(
    tmp_path: Path, reference: str
) -> None:
    flags = ("--inject", "term@step=6,rank=1,phase=backward")
    first = run(tmp_path, *flags)
    assert first.returncode == EXIT_SAVED_AND_STOPPED, show(first)
    saves = [e for e in read_events(tmp_path / "run") if e["event"] == "save"]
    assert {e["rank"] for e in saves} == {0, 1, 2, 3}, saves
    second = run(tmp_path, *flags)
    resumed = max(e["step"] for e in saves)
    check_recovered(tmp_path / "run", tmp_path / "digest", reference, [resumed], second)


def test_in_process_with_a_spare_kill_and_hang(tmp_path: Path, reference: str) -> None:
    """The hot spare runs the unchanged script, learns its rank in the
    adopted init_process_group, receives the state at its first draw and
    fast-forwards to the survivors' batch."""
    launch = run(
        tmp_path, "--spares", "1",
        "--inject", "kill@step=5,rank=2,phase=backward",
        "--inject", "hang@step=9,rank=3,phase=backward",
    )  # fmt: skip
    check_in_process(
        tmp_path / "run", tmp_path / "digest", reference, launch, [5, 9], "spare", "CNN with"
    )
    assert "in-process recovery does not apply" not in launch.output, show(launch)


# A plain script transparent mode cannot follow, in one of three ways.
UNFOLLOWABLE = """
import sys
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

dist.init_process_group("gloo")
kind = sys.argv[1]
net = torch.nn.Linear(4, 1)
model = net if kind == "not-ddp" else torch.nn.parallel.DistributedDataParallel(net)
data = [torch.full((4,), float(i)) for i in range(16)]
sampler = None if kind == "no-sampler" else DistributedSampler(data)
loader = DataLoader(data, batch_size=2, sampler=sampler)
optimizers = [torch.optim.SGD(model.parameters(), lr=0.01)]
if kind == "two-optimizers":
    optimizers.append(torch.optim.Adam(model.parameters(), lr=0.01))
for epoch in range(2):
    for x in loader:
        model(x).sum().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
print("trained", flush=True)
"""


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("two-optimizers", "it has 2 optimizers (SGD, Adam)"),
        ("not-ddp", "the model is not wrapped in DistributedDataParallel"),
        ("no-sampler", "no torch DataLoader with a DistributedSampler fed the first"),
    ],
)
def test_what_it_cannot_follow_is_refused_before_training_with_78(
    tmp_path: Path, kind: str, says: str
) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(UNFOLLOWABLE))
    launch = jitckpt_run(
        "--transparent", "--run-dir", str(tmp_path / "run"), str(script), kind, nproc=2
    )
    assert launch.returncode == EXIT_FATAL, show(launch)
    message = f"jitckpt: error: --transparent cannot follow this script: {says}"
    assert launch.output.count(message) == 2, show(launch)  # once per rank
    assert "user-level API" in launch.output, show(launch)
    assert "trained" not in launch.output, show(launch)
    assert "restarting all workers" not in launch.output, show(launch)


# A plain script with the habits the CNN example lacks: a peek at one batch
# once the model is built, a scheduler made after it that steps per epoch,
# loader worker processes that persist, an evaluation loader with its own
# DistributedSampler after every epoch, and an all_reduce of its metric.
HABITS = """
import hashlib, sys
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

dist.init_process_group("gloo")
torch.manual_seed(0)
data = TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
held_out = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
sampler = DistributedSampler(data, shuffle=True, seed=1)
loader = DataLoader(data, batch_size=8, sampler=sampler, num_workers=2, persistent_workers=True)
evaluation = DataLoader(held_out, batch_size=8, sampler=DistributedSampler(held_out, shuffle=False))
net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
model = torch.nn.parallel.DistributedDataParallel(net)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
print("batch shape", tuple(next(iter(loader))[0].shape), flush=True)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
for epoch in range(3):
    sampler.set_epoch(epoch)
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    scheduler.step()
    model.eval()
    with torch.no_grad():
        error = sum(torch.nn.functional.mse_loss(model(x), y) for x, y in evaluation)
    dist.all_reduce(error)
digest = hashlib.sha256()
for tensor in [*model.state_dict().values(), *optimizer.state_dict()["state"][0].values()]:
    digest.update(tensor.numpy().tobytes())
digest.update(repr(scheduler.state_dict()).encode())
if dist.get_rank() == 0:
    open(sys.argv[1], "w").write(digest.hexdigest())
dist.destroy_process_group()
"""


def test_a_script_with_common_habits_resumes_bitwise_equal(tmp_path: Path) -> None:
    """Per-epoch scheduler steps between passes (fast-forwarded epochs run
    them again: the restored state is loaded once more at the resume point),
    a kill on the first batch of an epoch (the boundary is taken again where
    the pass starts), the peek (an idle pass, replayed), workers that end
    with the job (they do not inherit jitckpt's blocked SIGTERM)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(HABITS))

    def launch(name: str, *flags: str):  # type: ignore[no-untyped-def]
        return jitckpt_run(
            "--transparent", "--run-dir", str(tmp_path / name), "--deterministic", *flags,
            str(script), str(tmp_path / f"{name}.digest"),
        )  # fmt: skip

    reference = launch("ref")
    assert reference.returncode == 0, show(reference)
    failed = launch(
        "run", "--recovery", "restart", "--inject", "kill@step=16,rank=2,phase=backward"
    )
    assert failed.returncode == 0, show(failed)
    assert failed.resumed_steps() == [16], show(failed)
    assert (tmp_path / "run.digest").read_text() == (tmp_path / "ref.digest").read_text()
