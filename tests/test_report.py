"""`jitckpt report`: text, JSON and a PNG for a real drill run (2 ranks, one
SIGKILLed mid-backward), the goodput arithmetic on a hand-made event log,
and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jobs import TINY, jitckpt_run, show

from jitckpt.analysis.report import main
from jitckpt.analysis.timeline import build

STEPS = 8
FAIL_STEP = 4


@pytest.fixture(scope="module")
def drill_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    launch = jitckpt_run(
        # The restart path: its attempts, restart and restore are what the
        # timeline cuts into phases.
        "--recovery",
        "restart",
        "--inject",
        f"kill@step={FAIL_STEP},rank=1,phase=backward",
        str(TINY),
        "--steps",
        str(STEPS),
        "--run-dir",
        str(run_dir),
        nproc=2,
        timeout=120,
    )
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == [FAIL_STEP], show(launch)
    return run_dir


def report(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_text_has_failure_table_timeline_and_goodput(
    drill_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = report(capsys, str(drill_run))
    assert status == 0
    assert "finished, 2 attempt(s), 1 failure(s)" in out
    assert "iterations lost: 1" in out  # the launcher summary's line, kept as it was
    assert "timeline (seconds since the first worker process started" in out
    # "training lost" (the partial step) can be empty and left out: under load
    # the killed rank may fail before the detecting rank has even passed the
    # boundary of the step in flight.
    for phase in ("startup", "restore", "training kept", "detection", "save"):
        assert f" {phase} " in out, out
    assert f"from step {FAIL_STEP}, {STEPS - FAIL_STEP} step(s) kept" in out
    goodput = re.search(r"^goodput (\d+\.\d) %: ", out, re.M)
    assert goodput is not None and 0 < float(goodput.group(1)) < 100, out


def test_json_phases_add_up_and_every_step_is_kept_once(
    drill_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = report(capsys, str(drill_run), "--json")
    assert status == 0
    data = json.loads(out)
    assert len(data["failures"]) == 1
    failure = data["failures"][0]
    assert failure["iterations_lost"] == 1 and failure["resumed_step"] == FAIL_STEP
    assert failure["detection_s"] >= 0 and failure["save_s"] >= 0 and failure["restart_s"] > 0
    assert 0 < failure["at_s"] < data["wall_s"]
    assert [a["kept_steps"] for a in data["attempts"]] == [FAIL_STEP, STEPS - FAIL_STEP]
    assert sum(data["phase_totals_s"].values()) == pytest.approx(data["wall_s"], rel=1e-6)
    assert 0 < data["goodput"] < 1
    assert data["goodput"] == pytest.approx(data["kept_training_s"] / data["wall_s"])
    phases = [p["phase"] for p in data["attempts"][0]["phases"]]
    assert [p for p in phases if p != "training lost"][-3:] == ["detection", "save", "restart"]
    assert data["attempts"][1]["phases"][-1]["phase"] == "exit"


def test_plot_is_a_png(drill_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "timeline.png"
    status, _, _ = report(capsys, str(drill_run), "--plot", str(picture))
    assert status == 0
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_matplotlib_names_the_extra(
    drill_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    status, _, err = report(capsys, str(drill_run), "--plot", str(tmp_path / "t.png"))
    assert status == 1
    assert "pip install 'jitckpt[plot]'" in err


def test_directory_without_event_log_is_an_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jitckpt", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "has no events.jsonl" in done.stderr and str(tmp_path) in done.stderr


def event(t: float, name: str, attempt: int | None = None, **fields: object) -> dict:
    record: dict = {"t": t, "event": name, "launch": "L", **fields}
    if attempt is not None:
        record["attempt"] = attempt
    return record


def test_goodput_of_a_hand_made_log() -> None:
    # Attempt 0 trains steps 0..3 from t=1 to the boundary of step 4 at 4.5
    # (detected at 5.5, 1.0 s after that boundary); the failure at 5 loses
    # 0.5 s. Attempt 1 restores step 4 (8.5 .. 9) and finishes 8 steps at 13.
    log = [
        event(0.1, "start", 0, rank=0, process_start=0.0),
        event(1.0, "fresh_start", 0, rank=0),
        event(5.0, "fault_injected", 0, rank=1, spec="kill@step=4,rank=1", step=4),
        event(5.2, "worker_failed", failed_rank=1),
        event(
            5.5, "detect", 0, rank=0, cause="collective_error", completed=4, since_boundary_s=1.0
        ),
        event(6.0, "save", 0, rank=0, step=4),
        event(8.2, "start", 1, rank=0, process_start=8.0),
        event(9.0, "restore", 1, rank=0, step=4, kind="jit", duration=0.5),
        event(13.0, "finish", 1, rank=0, step=8),
        event(14.0, "job_end", outcome="finished", status=0),
    ]
    result = build(log)
    assert result["wall_s"] == pytest.approx(14.0)
    # kept: 1 .. 4.5 and 9 .. 13
    assert result["kept_training_s"] == pytest.approx(3.5 + 4.0)
    assert result["goodput"] == pytest.approx(7.5 / 14.0)
    totals = result["phase_totals_s"]
    assert totals == pytest.approx(
        {
            "startup": 1.0 + 0.5,
            "restore": 0.5,
            "training kept": 7.5,
            "training lost": 0.5,
            "detection": 0.5,
            "save": 0.5,
            "restart": 2.0,
            "exit": 1.0,
        }
    )
    assert [a["kept_steps"] for a in result["attempts"]] == [4, 4]


def test_simulate_takes_its_inputs_from_the_drill(drill_run: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jitckpt", "simulate", "--from-run", str(drill_run), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    measured = ("iteration_s", "detection_s", "jit_save_s", "restart_s")
    assert {key: result["sources"][key] for key in measured} == dict.fromkeys(measured, "run")
    assert 0 < result["inputs"]["iteration_s"] < 5 and result["inputs"]["restart_s"] > 0
    assert result["sources"]["gpus"] == "default"
