"""`jitckpt report`: text, JSON and a PNG for a real drill run (2 ranks, one
SIGKILLed mid-backward). The goodput arithmetic on a hand-made event log
and bad input are unit tests (tests/unit/test_timeline.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jobs import TINY, jitckpt_run, show

from jitckpt.analysis.report import main

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
