"""`jitckpt simulate`: the closed forms against numbers worked out by hand,
the Monte-Carlo replay against the closed forms, bad input, the plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jitckpt.analysis import montecarlo
from jitckpt.analysis.costmodel import ClusterInputs, exact_waste, first_order_waste, strategies
from jitckpt.analysis.simulate import main

HOURS = 1000.0

# Three parameter sets, in seconds, with the wasted GPU-hours for 1000 h of
# training worked out by hand: W = N t (steady + lambda * per_failure) + K t,
# lambda = N f per hour; periodic: steady = c o, per failure d + r + 1/(2c);
# JIT restart: steady = o_jit, per failure d + s + r + m/2; JIT in-process:
# per failure d + x + m/2.
SMALL = {
    "flags": ["--gpus", "100", "--failure-rate", "1e-4", "--checkpoint-s", "36"]
    + ["--restart-s", "360", "--detection-s", "0", "--iteration-s", "3.6"]
    + ["--jit-save-s", "36", "--inprocess-recovery-s", "18"],
    # lambda = 100 * 1e-4 = 0.01/h; o = 0.01 h; c* = sqrt(0.01 / 0.02) = sqrt(0.5)
    "periodic": 100 * 1000 * (math.sqrt(0.5) * 0.01 + 0.01 * (0.1 + 1 / (2 * math.sqrt(0.5)))),
    # = 1514.21356...
    "jit-restart": 100 * 1000 * 0.01 * (0.01 + 0.1 + 0.0005),  # = 110.5
    "jit-inprocess": 100 * 1000 * 0.01 * (0.005 + 0.0005),  # = 5.5
}
MEDIUM = {
    "flags": ["--gpus", "1000", "--failure-rate", "2e-5", "--checkpoint-s", "36"]
    + ["--restart-s", "900", "--detection-s", "36", "--iteration-s", "36"]
    + ["--jit-save-s", "180", "--inprocess-recovery-s", "360"],
    # lambda = 0.02/h; o = 0.01 h; c* = sqrt(0.02 / 0.02) = 1 per hour
    "periodic": 1000 * 1000 * (1 * 0.01 + 0.02 * (0.01 + 0.25 + 0.5)),  # = 25200
    "jit-restart": 1000 * 1000 * 0.02 * (0.01 + 0.05 + 0.25 + 0.005),  # = 6300
    "jit-inprocess": 1000 * 1000 * 0.02 * (0.01 + 0.1 + 0.005),  # = 2300
}
EVERY_TERM = {
    "flags": ["--gpus", "512", "--failure-rate", "5e-5", "--checkpoint-s", "18"]
    + ["--interval-s", "1800", "--restart-s", "720", "--detection-s", "72"]
    + ["--iteration-s", "7.2", "--jit-save-s", "36", "--inprocess-recovery-s", "36"]
    + ["--jit-overhead", "0.01", "--spares", "8"],
    # lambda = 0.0256/h; c = 2 per hour (30 min interval), o = 0.005 h
    "periodic": 512 * 1000 * (2 * 0.005 + 0.0256 * (0.02 + 0.2 + 0.25)),  # = 11280.384
    "jit-restart": 512 * 1000 * (0.01 + 0.0256 * (0.02 + 0.01 + 0.2 + 0.001)),  # = 8147.7632
    # 8 idle spares for 1000 h add 8000 GPU-hours
    "jit-inprocess": 512 * 1000 * (0.01 + 0.0256 * (0.02 + 0.01 + 0.001)) + 8 * 1000,
}
SETS = {"small": SMALL, "medium": MEDIUM, "every-term": EVERY_TERM}


def simulate_json(capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    assert main([*flags, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_strategy(result: dict) -> dict[str, dict]:
    return {row["strategy"]: row for row in result["strategies"]}


@pytest.mark.parametrize("name", SETS)
def test_closed_form_matches_hand_computed_values(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = SETS[name]
    rows = by_strategy(simulate_json(capsys, *expected["flags"]))
    for strategy in ("periodic", "jit-restart", "jit-inprocess"):
        assert rows[strategy]["wasted_gpu_h"] == pytest.approx(expected[strategy], rel=1e-9)


def test_hand_values_written_out() -> None:
    # The sums above, evaluated once more as plain numbers.
    assert SMALL["periodic"] == pytest.approx(1514.2135624)
    assert EVERY_TERM["periodic"] == pytest.approx(11280.384)
    assert EVERY_TERM["jit-restart"] == pytest.approx(8147.7632)
    assert EVERY_TERM["jit-inprocess"] == pytest.approx(13526.3232)


def test_optimal_interval_minimises_first_order_waste(capsys: pytest.CaptureFixture[str]) -> None:
    result = simulate_json(capsys, *MEDIUM["flags"])
    assert result["checkpoints_per_hour"] == pytest.approx(1.0)
    best = by_strategy(result)["periodic"]["wasted_gpu_h"]
    for interval in ("2700", "4800"):
        other = simulate_json(capsys, *MEDIUM["flags"], "--interval-s", interval)
        assert by_strategy(other)["periodic"]["wasted_gpu_h"] > best


@pytest.mark.parametrize("name", SETS)
def test_monte_carlo_agrees_with_closed_forms(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = simulate_json(capsys, *SETS[name]["flags"], "--monte-carlo", "--seed", "7")
    for row in result["strategies"]:
        mc = row["monte_carlo"]
        assert mc["failures"] >= 0.9 * montecarlo.DEFAULT_FAILURES
        assert abs(mc["vs_first_order"]) < 0.05, row
        assert abs(mc["vs_exact"]) < 0.02, row


def test_monte_carlo_lost_work_is_half_the_work_between_safe_points() -> None:
    inputs = ClusterInputs(1000, 2e-5, 36, 900, 36, 36, 180, 360)
    for strategy in strategies(inputs):
        mc = montecarlo.simulate(strategy, inputs, HOURS, seed=3)
        # Periodic also loses the whole interval when a failure hits the save.
        bound = strategy.work_h / 2 + (strategy.segment_h - strategy.work_h)
        assert strategy.work_h / 2 * 0.97 < mc.mean_lost_work_h < bound * 1.03


def test_first_order_underestimates_periodic_at_llama_scale() -> None:
    # The paper's form counts no failure during a save or a restart; at one
    # failure every 3 h that misses about 10 % of the periodic waste, which
    # the exact form and the replay agree on (docs/cost-model.md).
    inputs = ClusterInputs(16384, 419 / (54 * 24 * 16384), 60, 600, 30, 6, 30, 60)
    periodic = strategies(inputs)[0]
    first, exact = first_order_waste(periodic, inputs, HOURS), exact_waste(periodic, inputs, HOURS)
    replayed = montecarlo.simulate(periodic, inputs, HOURS, seed=1).waste_gpu_h
    assert exact / first - 1 > 0.05
    assert replayed == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpus", "0"], "--gpus: must be >= 1"),
        (["--gpus", "-4"], "--gpus: must be >= 1"),
        (["--gpus", "2.5"], "--gpus: not a number"),
        (["--failure-rate", "0"], "--failure-rate: must be > 0"),
        (["--checkpoint-s", "-1"], "--checkpoint-s: must be > 0"),
        (["--restart-s", "-5"], "--restart-s: must be >= 0"),
        (["--iteration-s", "abc"], "--iteration-s: not a number"),
    ],
)
def test_bad_values_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_value_exit_status_from_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jitckpt", "simulate", "--gpus", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "usage: jitckpt simulate" in done.stderr and "--gpus" in done.stderr


def test_from_run_without_event_log_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--from-run", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no events.jsonl" in capsys.readouterr().err


def test_table_names_inputs_and_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(MEDIUM["flags"]) == 0
    out = capsys.readouterr().out
    assert "N=1000 GPUs [flag]" in out and "periodic interval (optimal): 60 min" in out
    for strategy in ("periodic", "jit-restart", "jit-inprocess"):
        assert strategy in out
    assert "2.52e+04" in out  # periodic, 25200 GPU-hours


def test_plot_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "waste.png"
    assert main([*SMALL["flags"], "--plot", str(picture)]) == 0
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert main([*SMALL["flags"], "--plot", str(tmp_path / "waste.png")]) == 1
    assert "pip install 'jitckpt[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "waste.png").exists()
