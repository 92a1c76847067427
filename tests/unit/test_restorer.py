"""Choosing the checkpoint to resume from (jitckpt.checkpoint.restorer), in
one process: the ranking of candidates across staging and the run
directory, refusals, and a save-then-restore round trip through the parts
JitCheckpoint composes (no process group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from forgery import reseal

from jitckpt import storage
from jitckpt.checkpoint.context import RankContext
from jitckpt.checkpoint.layout import layout_for
from jitckpt.checkpoint.restorer import Restorer, foreign_run, rank_candidates
from jitckpt.errors import CheckpointMismatchError
from jitckpt.events import EventLog, read_events
from jitckpt.inject import Injector
from jitckpt.state import archive
from jitckpt.state.archive import Archive
from jitckpt.state.buffers import BufferSnapshots
from jitckpt.state.training import TrainingState, decode
from jitckpt.storage.rundir import prepare_run_dir, run_id
from jitckpt.tracker import StepTracker


def manifest(step: int, kind: str = "jit", attempt: int = 0, rank: int = 0) -> storage.Manifest:
    return storage.Manifest(kind=kind, step=step, world_size=2, writer_rank=rank, attempt=attempt)


def names(ranked: list) -> list[tuple[str, int]]:  # type: ignore[type-arg]
    return [(r.candidate.name, r.preference) for r in ranked]


def test_staged_copy_comes_before_the_durable_copy_of_the_same_checkpoint(
    tmp_path: Path,
) -> None:
    staged = storage.DirectoryStorage(tmp_path / "shm")
    durable = storage.DirectoryStorage(tmp_path / "run")
    for target in (durable, staged):
        target.write(manifest(4), b"p")
    assert names(rank_candidates([staged, durable])) == [
        ("step-000000004-jit-a0-r0", 0),
        ("step-000000004-jit-a0-r0", 1),
    ]


def test_the_newest_step_wins_whatever_its_source(tmp_path: Path) -> None:
    staged = storage.DirectoryStorage(tmp_path / "shm")
    durable = storage.DirectoryStorage(tmp_path / "run")
    staged.write(manifest(3), b"p")
    durable.write(manifest(5), b"p")
    assert [r.candidate.step for r in rank_candidates([staged, durable])] == [5, 3]


def test_at_one_step_jit_before_periodic_then_newest_attempt_then_lowest_writer(
    tmp_path: Path,
) -> None:
    durable = storage.DirectoryStorage(tmp_path / "run")
    for m in (
        manifest(6, "periodic"),
        manifest(6, attempt=0, rank=1),
        manifest(6, attempt=1, rank=3),
        manifest(6, attempt=1, rank=2),
    ):
        durable.write(m, b"p")
    assert [r.candidate.name for r in rank_candidates([durable])] == [
        "step-000000006-jit-a1-r2",
        "step-000000006-jit-a1-r3",
        "step-000000006-jit-a0-r1",
        "step-000000006-periodic-a0-r0",
    ]


def test_a_checkpoint_of_another_run_is_refused_with_both_ids() -> None:
    own = storage.Manifest(kind="jit", step=1, world_size=1, run_id="aaa")
    assert foreign_run(own, "aaa") is None
    assert foreign_run(own.replace(run_id=None), "aaa") is None  # older checkpoints had none
    reason = foreign_run(own.replace(run_id="bbb"), "aaa")
    assert reason is not None and "bbb" in reason and "aaa" in reason
    # A staged copy always carries its run's id: one without is not this run's.
    strict = foreign_run(own.replace(run_id=None), "aaa", strict=True)
    assert strict is not None and "no run id" in strict


# -- a rank's parts, without a process group ---------------------------------------------
def tiny_model(seed: int, width: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def rank_context(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> RankContext:
    directory = prepare_run_dir(run_dir)
    events = EventLog(directory, rank=0, attempt=0)
    tracker = StepTracker()
    return RankContext(
        rank=0,
        world_size=1,
        attempt=0,
        run_dir=directory,
        run_id=run_id(directory),
        deterministic=False,
        seed=0,
        uses_store=False,
        events=events,
        tracker=tracker,
        state=TrainingState(model, optimizer),
        storage=storage.run_storage(directory),
        staging=None,
        injector=Injector([], directory, 0, events, tracker),
        buffers=BufferSnapshots(model, lambda: tracker.position().in_progress),
    )


def save_at(ctx: RankContext, step: int) -> Path:
    """What JitCheckpoint.save does at a clean step boundary."""
    ctx.tracker.boundary(step, {"data": None, "rng": None, "scheduler_epoch": None})
    layout = layout_for(ctx, ctx.state.model, None, None)
    path = layout.save_jit("manual", 0.0)
    assert path is not None
    return path


def restore(ctx: RankContext) -> int:
    return Restorer(ctx, layout_for(ctx, ctx.state.model, None, None), keep_jit=2).restore()


def test_restore_loads_the_saved_state_bitwise(tmp_path: Path) -> None:
    model, optimizer = tiny_model(0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    save_at(rank_context(tmp_path / "run", model, optimizer), 7)
    other, other_opt = tiny_model(1)
    ctx = rank_context(tmp_path / "run", other, other_opt)
    assert restore(ctx) == 7
    for key, value in other.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert other_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    (event,) = [e for e in read_events(ctx.run_dir) if e["event"] == "restore"]
    assert event["step"] == 7 and event["kind"] == "jit" and event["source"] == "durable"


def test_no_checkpoint_is_a_fresh_start(tmp_path: Path) -> None:
    model, optimizer = tiny_model(0)
    ctx = rank_context(tmp_path / "run", model, optimizer)
    assert restore(ctx) == 0
    assert [e["event"] for e in read_events(ctx.run_dir)] == ["fresh_start"]


def test_a_corrupt_newest_checkpoint_is_refused_and_the_older_one_used(tmp_path: Path) -> None:
    model, optimizer = tiny_model(0)
    ctx = rank_context(tmp_path / "run", model, optimizer)
    save_at(ctx, 3)
    newest = save_at(ctx, 4)
    payload = newest / storage.PAYLOAD
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped bit
    payload.write_bytes(bytes(data))
    assert restore(rank_context(tmp_path / "run", *tiny_model(1))) == 3
    refused = [e for e in read_events(ctx.run_dir) if e["event"] == "checkpoint_refused"]
    assert len(refused) == 1 and "checksum mismatch" in refused[0]["reason"]
    assert refused[0]["path"] == str(newest)


def test_a_checkpoint_of_another_model_stops_the_restore_and_loads_nothing(
    tmp_path: Path,
) -> None:
    model, optimizer = tiny_model(0)
    save_at(rank_context(tmp_path / "run", model, optimizer), 5)
    wider, wider_opt = tiny_model(1, width=16)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="does not fit this model"):
        restore(rank_context(tmp_path / "run", wider, wider_opt))
    for key, value in wider.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- corrupt and forged checkpoints: refused, the next candidate used ------------------
def three_checkpoints(tmp_path: Path) -> tuple[RankContext, dict[str, torch.Tensor], Path]:
    """Checkpoints of steps 3 and 4; the state of step 3 and the path of 4."""
    model, optimizer = tiny_model(0)
    ctx = rank_context(tmp_path / "run", model, optimizer)
    save_at(ctx, 3)
    at_three = {k: v.clone() for k, v in model.state_dict().items()}
    return ctx, at_three, save_at(ctx, 4)


def restored_from(tmp_path: Path, at_three: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    model, optimizer = tiny_model(1)
    ctx = rank_context(tmp_path / "run", model, optimizer)
    step = restore(ctx)
    if step == 3:
        for key, value in model.state_dict().items():
            assert torch.equal(value, at_three[key]), key
    # A candidate whose manifest is refused ranks last: it is refused when
    # reached, if no valid one comes before it.
    refused = [e["reason"] for e in read_events(ctx.run_dir) if e["event"] == "checkpoint_refused"]
    unlisted = [
        c.problem for c in ctx.storage.candidates() if c.problem and c.problem not in refused
    ]
    return step, refused + unlisted


def flip_signature_digit(data: dict) -> None:  # type: ignore[type-arg]
    data["model_signature"]["0.weight"][0][0] += 2  # 8 -> 10: one flipped bit in "8"


@pytest.mark.parametrize("recompute", [False, True])
def test_a_flipped_bit_in_the_model_signature_falls_back_to_the_older_checkpoint(
    tmp_path: Path, recompute: bool
) -> None:
    _, at_three, newest = three_checkpoints(tmp_path)
    reseal(newest, edit=flip_signature_digit, recompute=recompute)
    step, reasons = restored_from(tmp_path, at_three)
    assert step == 3
    wanted = "signature disagrees" if recompute else "manifest checksum mismatch"
    assert len(reasons) == 1 and wanted in reasons[0], reasons


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("step", "4"),
        ("world_size", [2]),
        ("model_signature", {"0.weight": "float32"}),
        ("layout", "ddp"),
        ("files", {"state.pt": {"size": "big", "crc32": "00000000"}}),
        ("kind", None),
        ("writer_rank", 0.5),
        ("run_id", {"id": 1}),
    ],
)
def test_manifest_fields_of_the_wrong_type_fall_back_to_the_older_checkpoint(
    tmp_path: Path, field: str, value: object
) -> None:
    _, at_three, newest = three_checkpoints(tmp_path)
    reseal(newest, edit=lambda d: d.__setitem__(field, value))
    step, reasons = restored_from(tmp_path, at_three)
    assert step == 3 and len(reasons) == 1 and f"'{field}'" in reasons[0], reasons


def test_a_payload_whose_step_differs_from_its_manifest_is_refused(tmp_path: Path) -> None:
    ctx, at_three, newest = three_checkpoints(tmp_path)
    payload = decode(bytearray((newest / storage.PAYLOAD).read_bytes()), "x")
    payload["step"] = 5
    reseal(newest, Archive(payload).to_bytes())
    step, reasons = restored_from(tmp_path, at_three)
    assert step == 3 and "holds step 5, its manifest says 4" in reasons[0]


def test_a_payload_whose_optimizer_state_does_not_fit_its_parameters_is_refused(
    tmp_path: Path,
) -> None:
    ctx, at_three, newest = three_checkpoints(tmp_path)
    payload = decode(bytearray((newest / storage.PAYLOAD).read_bytes()), "x")
    payload["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    reseal(newest, Archive(payload).to_bytes())
    step, reasons = restored_from(tmp_path, at_three)
    assert step == 3 and "'exp_avg' of parameter 0" in reasons[0]


def test_when_no_checkpoint_is_valid_the_run_starts_fresh(tmp_path: Path) -> None:
    ctx, at_three, newest = three_checkpoints(tmp_path)
    for path in ctx.storage.root.iterdir():
        reseal(path, edit=flip_signature_digit, recompute=False)
    step, reasons = restored_from(tmp_path, at_three)
    assert step == 0 and len(reasons) == 2


def test_pruning_after_the_first_step_never_removes_the_only_valid_copies(
    tmp_path: Path,
) -> None:
    ctx, at_three, newest = three_checkpoints(tmp_path)
    model, optimizer = tiny_model(1)
    later = rank_context(tmp_path / "run", model, optimizer)
    save_at(later, 5)
    save_at(later, 6)
    for step in (5, 6):
        (path,) = [
            p for p in ctx.storage.root.iterdir() if p.name.startswith(f"step-00000000{step}")
        ]
        data = bytearray((path / storage.PAYLOAD).read_bytes())
        data[-1] ^= 1
        (path / storage.PAYLOAD).write_bytes(bytes(data))
    restorer = Restorer(later, layout_for(later, model, None, None), keep_jit=2)
    restorer.after_first_step(4)
    assert restorer.pruning is not None
    restorer.pruning.join()
    assert sorted(c.step for c in ctx.storage.candidates()) == [3, 4, 5, 6]


def test_inspect_verify_decodes_the_payload(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jitckpt.analysis.inspect import main as inspect_main
    from jitckpt.checkpoint.restorer import decode_checked

    ctx, at_three, newest = three_checkpoints(tmp_path)
    payload = bytearray((newest / storage.PAYLOAD).read_bytes())
    payload[len(archive.MAGIC) + 8] = ord("]")  # the header's JSON, checksum recomputed
    reseal(newest, bytes(payload))
    assert inspect_main([str(ctx.run_dir)]) == 0
    assert "INVALID" not in capsys.readouterr().out  # sizes only: looks valid
    assert inspect_main([str(ctx.run_dir), "--verify"], decoder=decode_checked) == 0
    out = capsys.readouterr().out
    assert "INVALID" in out and "not JSON" in out
    from jitckpt.cli import main as cli_main

    assert cli_main(["inspect", str(ctx.run_dir), "--verify"]) == 0  # the CLI passes the decoder
    assert "not JSON" in capsys.readouterr().out
