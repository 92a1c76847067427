"""The figures and the report of benchmarks/recovery.py's results: per mode
min / median / max of every part of a recovery, of the end-to-end time and
of the iterations lost, the goals met, and the tables the benchmark prints.

The modes are recovery.MODES, passed in; the job's shape (ranks, failing
rank and phase, the hang goal's margin) comes from the result's config.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from harness import INPROC_LABELS, INPROC_PARTS, JIT_PARTS, PART_LABELS, stats

# A mode is a recovery.Mode (not imported: recovery.py is the benchmark
# script, which imports this module).
Mode = Any


def parts_of(mode: Mode) -> tuple[str, ...]:
    return INPROC_PARTS if mode.replacement else JIT_PARTS


def aggregate(drills: list[dict[str, Any]], all_modes: Sequence[Mode]) -> dict[str, Any]:
    """Per mode: min/median/max of every part and of the end-to-end time."""
    result: dict[str, Any] = {}
    for mode in all_modes:
        runs = [d for d in drills if d["mode"] == mode.name]
        ok = [d for d in runs if d["ok"]]
        entry: dict[str, Any] = {"drills": len(runs), "ok": len(ok)}
        entry["parts"] = {p: stats([d["parts"][p] for d in ok]) for p in parts_of(mode)}
        for key in ("recovery_s", "iterations_lost", "regain_s", "goal_s"):
            entry[key] = stats([d[key] for d in ok])
        with_goal = [d for d in ok if d["goal_s"] is not None]
        for key in ("before_redo_s", "step_s"):  # in-process drills only
            entry[key] = stats([d[key] for d in ok if d.get(key) is not None])
        entry["goal_met"] = sum(d["recovery_s"] <= d["goal_s"] for d in with_goal)
        entry["goal_drills"] = len(with_goal)
        result[mode.name] = entry
    return result


def _median(entry: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    return "-" if entry is None else fmt.format(entry["median"])


def _goal(mode: Mode, entry: dict[str, Any], hang_margin_s: float) -> str:
    if mode.fault is None:
        return "none (baseline)"
    if not entry["goal_drills"]:
        return "-"
    limit = entry["goal_s"]["median"]
    met = entry["recovery_s"]["median"] <= limit
    how = (
        "" if mode.fault == "kill" or mode.goal_s else f" (timeout {limit - hang_margin_s:.2f} + 5)"
    )
    return (
        f"<= {limit:.2f} s{how}: {'met' if met else 'NOT met'}, "
        f"{entry['goal_met']}/{entry['goal_drills']} drills"
    )


def _header(labels: dict[str, str], parts: Sequence[str]) -> str:
    return (
        f"{'mode':<23} {'ok':>4} "
        + " ".join(f"{labels[p]:>8}" for p in parts)
        + f" {'end-to-end (min..max)':>23} {'lost':>5}"
    )


def _row(mode: Mode, entry: dict[str, Any], fmt: str) -> str:
    """A table row: mode, drills, median parts, end to end, iterations lost."""
    recovery = entry["recovery_s"]
    span = (
        f"{fmt.format(recovery['median'])} "
        f"({fmt.format(recovery['min'])}..{fmt.format(recovery['max'])})"
        if recovery
        else "-"
    )
    return (
        f"{mode.label:<23} {entry['ok']:>2}/{entry['drills']:<1} "
        + " ".join(f"{_median(entry['parts'][p], fmt):>8}" for p in parts_of(mode))
        + f" {span:>23} {_median(entry['iterations_lost'], '{:g}'):>5}"
    )


def report(result: dict[str, Any], all_modes: Sequence[Mode]) -> str:
    modes = result["modes"]
    config = result["config"]
    margin = config["hang_goal_margin_s"]
    params = next((d["params_m"] for d in result["drills"] if d.get("params_m")), None)
    model = f"example GPT ({params:.2f}M params)" if params else "example GPT"
    lines = [
        "",
        f"Recovery from a failure of rank {config['fail_rank']} of {config['nproc']}: "
        f"{model}, gloo, {os.cpu_count()} CPUs, jitckpt at {result['source']}",
        f"jitckpt run {' '.join(config['jitckpt_args']) or '(default options)'}: fault in the "
        f"{config['fail_phase']} of step {config['fail_step']}; baseline: SIGKILL "
        f"early in step {config['baseline_kill_step']}, checkpoint every {config['save_every']} steps",
        "medians over the successful drills, in seconds; the parts add up to end-to-end",
    ]
    if any(modes[m.name]["drills"] for m in all_modes if not m.replacement):
        lines += ["", _header(PART_LABELS, JIT_PARTS) + f" {'regain':>7}  goal"]
    for mode in all_modes:
        entry = modes[mode.name]
        if not entry["drills"] or mode.replacement:
            continue
        lines.append(
            _row(mode, entry, "{:.2f}")
            + f" {_median(entry['regain_s']):>7}  {_goal(mode, entry, margin)}"
        )
    inproc = [m for m in all_modes if m.replacement and modes[m.name]["drills"]]
    if inproc:
        lines += [
            "",
            "in-process recovery (survivors keep running): failure to the next step "
            "completed by every rank",
            _header(INPROC_LABELS, INPROC_PARTS) + "  goal",
        ]
    for mode in inproc:
        entry = modes[mode.name]
        lines.append(_row(mode, entry, "{:.3f}") + f"  {_goal(mode, entry, margin)}")
    before_goal = config.get("before_redo_goal_s")
    for mode in inproc:
        entry = modes[mode.name]
        before, step = entry.get("before_redo_s"), entry.get("step_s")
        if not before or not step or mode.goal_s is not None or before_goal is None:
            continue
        met = before["median"] <= before_goal
        lines.append(
            f"  {mode.label}: before the redo {before['median']:.3f} s "
            f"({before['min']:.3f}..{before['max']:.3f}), goal <= {before_goal:.2f} s: "
            f"{'met' if met else 'NOT met'}; median step {step['median']:.3f} s, so end to "
            f"end goal <= {entry['goal_s']['median']:.3f} s"
        )
    lines += ["", "min / median / max per part, seconds:"]
    for mode in all_modes:
        entry = modes[mode.name]
        if not entry["ok"]:
            continue
        cells = []
        labels = {**PART_LABELS, **INPROC_LABELS}
        for part in (*parts_of(mode), "recovery_s"):
            s = entry["parts"].get(part) if part != "recovery_s" else entry["recovery_s"]
            if s is not None:
                label = "end-to-end" if part == "recovery_s" else labels[part]
                cells.append(f"{label} {s['min']:.2f}/{s['median']:.2f}/{s['max']:.2f}")
        lines.append(f"  {mode.label:<23} " + ", ".join(cells))
    failed = [d for d in result["drills"] if not d["ok"]]
    for drill in failed:
        first_line = drill["error"].splitlines()[0] if drill["error"] else "?"
        lines.append(f"  FAILED {drill['mode']} drill {drill['drill']}: {first_line}")
    return "\n".join(lines)
