"""The Lightning checkpoint that JitCheckpointCallback writes on a failure
is the one ``trainer.save_checkpoint`` writes at the same step, and
Lightning resumes from it; forward and backward run before the dirty
window opens (jitckpt.integrations.lightning).

One process, no launcher; in a subprocess, since JitCheckpoint installs
process-wide handlers (SIGTERM, sys.excepthook)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lightning")

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, sys.argv[2])
from train_lightning import Regressor, dataset

from jitckpt.integrations.lightning import JitCheckpointCallback, loop_state

torch.set_num_threads(1)
root = Path(sys.argv[1])
STEP = 5
dirty_in_step = []
loaded = {}


class Model(Regressor):
    def training_step(self, batch, batch_idx):
        dirty_in_step.append(jit.ckpt.tracker.position().dirty)
        return super().training_step(batch, batch_idx)


class Probe(Callback):
    # After JitCheckpointCallback's on_train_batch_end (callbacks run in order).
    def on_train_batch_end(self, trainer, module, *_):
        # The fast copy of the loops' state is in use, and equal to Lightning's own.
        assert jit._loop_state is loop_state
        assert loop_state(trainer.fit_loop) == trainer.fit_loop.state_dict()
        if trainer.global_step == STEP:
            trainer.save_checkpoint(root / "lightning.ckpt")
            tree = {"step": STEP, **jit.ckpt.state.components()}
            exported = jit._export(STEP, tree, root / "jitckpt-saved")
            assert exported == root / "checkpoints" / f"last-jitckpt-step={STEP}.ckpt", exported
            loaded["ours"] = torch.load(exported, weights_only=False)


def trainer(steps, callbacks):
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )


def same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b))
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


pl.seed_everything(0, verbose=False)
jit = JitCheckpointCallback()
checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
loader = DataLoader(dataset(64), batch_size=4, shuffle=True)
trainer(STEP + 2, [jit, Probe(), checkpoints]).fit(Model(), loader)
assert dirty_in_step and not any(dirty_in_step), dirty_in_step

# The exports of a finished run are removed at its end.
assert not list((root / "checkpoints").glob("last-jitckpt-*"))
ours = loaded["ours"]
theirs = torch.load(root / "lightning.ckpt", weights_only=False)
marker = ours.pop("jitckpt")
assert marker["kind"] == "jit" and marker["step"] == STEP, marker
same(ours, theirs)
assert ours["global_step"] == STEP and ours["hyper_parameters"]["lr"] == 0.05

# Lightning's own resume takes it.
torch.save({**ours, "jitckpt": marker}, root / "checkpoints" / "last-jitckpt-step=5.ckpt")
started = []


class Start(Callback):
    def on_train_start(self, trainer, module):
        started.append(trainer.global_step)


again = trainer(STEP + 3, [JitCheckpointCallback(), Start(), checkpoints])
again.fit(Model(), loader, ckpt_path=root / "checkpoints" / "last-jitckpt-step=5.ckpt")
assert started == [STEP] and again.global_step == STEP + 3, (started, again.global_step)
print("OK")
"""


def test_the_export_is_what_lightning_saves_at_that_step_and_resumes_from(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path), str(REPO / "examples")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), (
        done.stdout[-3000:] + done.stderr[-5000:]
    )


def test_loop_state_asks_a_tracker_it_cannot_read_for_its_own_state() -> None:
    from dataclasses import dataclass, field

    from lightning.pytorch.loops.loop import _Loop
    from lightning.pytorch.loops.progress import _BaseProgress, _Progress

    from jitckpt.integrations.lightning import loop_state

    @dataclass
    class Listed(_BaseProgress):  # a field asdict would convert, not a plain value
        seen: list = field(default_factory=lambda: [1, 2])

    class Inner(_Loop):
        def __init__(self) -> None:
            super().__init__(trainer=None)
            self.progress = _Progress()
            self.listed = Listed()

    class Outer(_Loop):
        def __init__(self) -> None:
            super().__init__(trainer=None)
            self.inner = Inner()
            self.progress = _Progress()

    outer = Outer()
    outer.progress.increment_ready()
    outer.inner.progress.increment_completed()
    state = loop_state(outer)
    assert state == outer.state_dict()
    assert list(state) == list(outer.state_dict())  # the same order too
    assert state["inner.listed"] == {"seen": [1, 2]}
    outer.inner.listed.seen.append(3)
    assert state["inner.listed"] == {"seen": [1, 2]}  # a copy, as asdict's
