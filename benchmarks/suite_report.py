"""Figures and the markdown table of benchmarks/suite.py's results."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from importlib import metadata
from typing import Any

from harness import JIT_PARTS, PART_LABELS

# Recovery sections, their labels, and the baseline every recovery is compared with.
SYSTEMS = {
    "jitckpt-kill": "jitckpt run, replica SIGKILLed",
    "jitckpt-hang": "jitckpt run, replica hung",
    "torchrun-dcp-kill": "torchrun + periodic DCP, replica SIGKILLed",
    "torchft-ddp-kill": "torchft 0.2.0 (its DDP wrapper), replica SIGKILLed",
    "torchft-allreduce-kill": "torchft 0.2.0 (all-reduce of grads), replica SIGKILLed",
}
BASELINE = "torchrun-dcp-kill"
SAVE_LABELS = {
    "bare": "bare loop (baseline)",
    "jitckpt": "jitckpt, no periodic checkpoint",
    "torch_save": "torch.save (rank 0, synchronous)",
    "dcp_async": "DCP async_save (every rank)",
    "jitckpt_periodic": "jitckpt periodic backstop",
}


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": version("torch"),
        "torchft": version("torchft"),
        "load_avg_before": list(load_before),
        "load_avg_after": list(load_after),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def recovery_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per system: how many failures it survived, recovery and loss spreads,
    and the median of every part over the survived failures."""
    failures = result.get("failures", [])
    survived = [f for f in failures if f.get("survived")]
    parts_seen = {key for f in survived for key in (f.get("parts") or {})}
    return {
        "drills": len(failures),
        "planned": result.get("planned"),
        "survived": len(survived),
        "recovery_s": spread(
            [f["recovery_s"] for f in failures if f.get("recovery_s") is not None]
        ),
        "iterations_lost": spread(
            [f["iterations_lost"] for f in failures if f.get("iterations_lost") is not None]
        ),
        "parts": {
            part: spread([f["parts"][part] for f in survived if f["parts"].get(part) is not None])
            for part in sorted(parts_seen)
        },
        "survivor_restarted": sum(bool(f.get("survivor_restarted")) for f in failures),
        # torchft: steps the survivor trained without the killed group (a
        # survivor that crashed trained none worth counting).
        "degraded_steps": spread(
            [f["degraded_steps"] for f in survived if f.get("degraded_steps") is not None]
        ),
        # torchft: the killed group's return, whether or not the survivor lived.
        "replica_back_s": spread(
            [
                f["parts"]["replica_back"]
                for f in failures
                if (f.get("parts") or {}).get("replica_back")
            ]
        ),
        "skipped": result.get("skipped"),
        "error": result.get("error"),
    }


def aggregate(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    steady = results.get("steady", {})
    comparisons = steady.get("comparisons", {})
    sync = comparisons.get("torch_save", {}).get("blocked_median_s")
    rows = {}
    for mode in SAVE_LABELS:
        if mode not in steady.get("modes", {}):
            continue
        c = comparisons.get(mode, {})
        blocked = c.get("blocked_median_s")
        rows[mode] = {
            "median_step_s": steady["modes"][mode]["median_s"],
            "ratio_median_of_rounds": c.get("ratio_median_of_rounds", 1.0),
            "ratio_round_stderr": c.get("ratio_round_stderr"),
            "ratio_of_means": c.get("ratio_of_means", 1.0),
            "blocked_median_s": blocked,
            "blocked_vs_torch_save": blocked / sync if blocked is not None and sync else None,
        }
    summary["steady"] = rows
    recovery = {name: recovery_summary(results[name]) for name in SYSTEMS if name in results}
    base = (recovery.get(BASELINE, {}).get("recovery_s") or {}).get("median")
    for entry in recovery.values():
        median = (entry["recovery_s"] or {}).get("median")
        entry["recovery_vs_baseline"] = median / base if median is not None and base else None
    summary["recovery"] = recovery
    return summary


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _spread(entry: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if entry is None:
        return "-"
    return f"{fmt.format(entry['median'])} ({fmt.format(entry['min'])}..{fmt.format(entry['max'])})"


def steady_table(report: dict[str, Any]) -> list[str]:
    steady = report["sections"].get("steady", {})
    if steady.get("error") or "steady" not in report["sections"]:
        return [f"Steady state: FAILED: {steady.get('error', 'not run')[:300]}"]
    config = steady["config"]
    lines = [
        f"Step time of the example GPT ({steady['params'] / 1e6:.2f}M params, "
        f"{steady['world_size']} ranks, gloo), {config['rounds']} rounds x {config['steps']} "
        f"timed steps per mode, modes interleaved; checkpoints every {config['save_every']} "
        "steps. Ratio: median over rounds of each round's median step time against bare's "
        "(± standard error); blocking: what one checkpoint stalls the loop (rank 0).",
        "",
        "| mode | median step ms | step vs bare | mean step vs bare | blocking per "
        "checkpoint ms | blocking vs torch.save |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, row in report["summary"]["steady"].items():
        stderr = row["ratio_round_stderr"]
        ratio = _f(row["ratio_median_of_rounds"], "{:.3f}") + (
            f" ± {stderr:.3f}" if stderr is not None and mode != "bare" else ""
        )
        blocked = row["blocked_median_s"]
        lines.append(
            f"| {SAVE_LABELS[mode]} | {row['median_step_s'] * 1e3:.1f} | {ratio} | "
            f"{_f(row['ratio_of_means'], '{:.3f}')} | "
            f"{_f(blocked * 1e3 if blocked is not None else None, '{:.1f}')} | "
            f"{_f(row['blocked_vs_torch_save'], '{:.3f}')} |"
        )
    return lines


def parts_table(report: dict[str, Any]) -> list[str]:
    recovery = report["summary"]["recovery"]
    lines = [
        "jitckpt's recovery by part (medians over the survived failures, seconds; the parts "
        "add up to end to end: failure to the first step completed after the resume):",
        "",
        "| failure | survived | "
        + " | ".join(PART_LABELS[p] for p in JIT_PARTS)
        + " | end to end (min..max) | iterations lost |",
        "| --- | --- | " + " | ".join("---" for _ in JIT_PARTS) + " | --- | --- |",
    ]
    for name in ("jitckpt-kill", "jitckpt-hang"):
        entry = recovery.get(name)
        if entry is None:
            continue
        cells = [_f((entry["parts"].get(p) or {}).get("median")) for p in JIT_PARTS]
        lost = entry["iterations_lost"]
        lines.append(
            f"| {SYSTEMS[name]} | {entry['survived']}/{entry['drills']} | "
            + " | ".join(cells)
            + f" | {_spread(entry['recovery_s'])} | {_f(lost and lost['median'], '{:g}')} |"
        )
    return lines


def peers_notes(name: str, entry: dict[str, Any], report: dict[str, Any]) -> str:
    if entry["skipped"]:
        return f"not run: {entry['skipped']}"
    notes = []
    if entry["error"]:
        notes.append(f"job error: {entry['error'].splitlines()[0][:120]}")
    if name.startswith("torchft"):
        section = report["sections"][name]
        back = entry["replica_back_s"]
        notes.append(
            f"lighthouse heartbeat timeout {section.get('heartbeat_timeout_ms')} ms; "
            f"survivor crashed and restarted in {entry['survivor_restarted']}/{entry['drills']}"
        )
        if back:
            notes.append(f"killed group training again after {back['median']:.1f} s (median)")
        degraded = entry["degraded_steps"]
        if degraded and entry["survived"]:
            notes.append(
                f"while it was away the surviving group trained {degraded['median']:g} steps "
                "(median over the survived failures) at half the global batch"
            )
    elif name == BASELINE:
        every = report["config"]["save_every"]
        notes.append(f"DCP checkpoint every {every} steps, kill half an interval after one")
    elif name == "jitckpt-kill":
        notes.append("killed in backward by jitckpt's --inject")
    return "; ".join(notes)


def peers_table(report: dict[str, Any]) -> list[str]:
    recovery = report["summary"]["recovery"]
    lines = [
        "Beside peers, the same failure (SIGKILL of one replica mid-training). Recovery: "
        "failure to the end of the first step begun after it and kept (seconds, median "
        "(min..max) over the failures it came back from); vs torchrun: against torchrun + "
        "periodic DCP measured in the same command.",
        "",
        "| system | failures | survived | recovery s | vs torchrun | iterations lost "
        "median (max) | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("jitckpt-kill", BASELINE, "torchft-ddp-kill", "torchft-allreduce-kill"):
        entry = recovery.get(name)
        if entry is None:
            continue
        lost = entry["iterations_lost"]
        lost_cell = f"{lost['median']:g} ({lost['max']:g})" if lost else "-"
        lines.append(
            f"| {SYSTEMS[name]} | {entry['drills']} | {entry['survived']}/{entry['drills']} | "
            f"{_spread(entry['recovery_s'])} | {_f(entry['recovery_vs_baseline'], '{:.2f}')} | "
            f"{lost_cell} | {peers_notes(name, entry, report)} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    before = ", ".join(f"{x:.1f}" for x in m["load_avg_before"])
    after = ", ".join(f"{x:.1f}" for x in m["load_avg_after"])
    lines = [
        f"# jitckpt benchmark suite ({'quick' if report['quick'] else 'full'})",
        "",
        f"`{report['command']}` at {report['source']}, {m['date']}, {report['wall_s']:.0f} s. "
        f"Machine: {m['cpus']} CPUs, no GPU, Python {m['python']}, torch {m['torch']}, "
        f"torchft {m['torchft'] or 'not installed'}; load average (1, 5, 15 min) {before} "
        f"before, {after} after (the suite's own ranks add about {report['config']['ranks']}); "
        "1-min load average before each part: "
        + ", ".join(
            f"{name} {section.get('load_avg_before', 0):.1f}"
            for name, section in report["sections"].items()
        )
        + ".",
        "",
        *steady_table(report),
        "",
        *parts_table(report),
        "",
        *peers_table(report),
        "",
    ]
    return "\n".join(lines)
