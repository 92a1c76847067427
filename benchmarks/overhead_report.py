"""The summary and report of benchmarks/overhead.py (kept apart so the
benchmark itself stays about running the job)."""

from __future__ import annotations

import math
import statistics
from typing import Any

# The overhead the project aims for: jitckpt may cost at most 1% of a step.
GOAL_RATIO = 1.01
# Modes held to GOAL_RATIO (the others' cost is reported).
GOAL_MODES = ("jitckpt", "jitckpt_inprocess")
SAVE_MODES = ("torch_save", "dcp_async", "jitckpt_periodic")


def compare(rounds: list[dict[str, Any]], modes: dict[str, Any], mode: str) -> dict[str, Any]:
    """One mode against bare: per-round ratios of the median step times (the
    headline), the ratios over all steps, and for checkpoint modes the
    blocking per checkpoint."""
    ratios = [statistics.median(r[mode]) / statistics.median(r["bare"]) for r in rounds]
    stderr = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else math.nan
    bare, this = modes["bare"], modes[mode]
    result = {
        "round_ratios": ratios,
        "ratio_median_of_rounds": statistics.median(ratios),
        "ratio_round_min": min(ratios),
        "ratio_round_max": max(ratios),
        "ratio_round_stderr": stderr,
        "ratio_of_medians": this["median_s"] / bare["median_s"],
        "ratio_of_means": this["mean_s"] / bare["mean_s"],
        "cpu_ratio_of_medians": this["cpu_median_s"] / bare["cpu_median_s"],
        "overhead_median_ms": (this["median_s"] - bare["median_s"]) * 1e3,
        "overhead_mean_ms": (this["mean_s"] - bare["mean_s"]) * 1e3,
        "cpu_overhead_median_ms": (this["cpu_median_s"] - bare["cpu_median_s"]) * 1e3,
    }
    blocked = [t for r in rounds for t in r.get(f"{mode}_blocked", [])]
    if mode in SAVE_MODES:
        result["checkpoints"] = len(blocked)
        result["blocked_median_s"] = statistics.median(blocked) if blocked else None
        result["blocked_max_s"] = max(blocked) if blocked else None
    return result


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per-mode statistics of the step times rank 0 recorded, and every
    mode against bare."""
    rounds = raw["rounds"]
    names = rounds[0]["order"]
    modes = {}
    for mode in names:
        times = [t for record in rounds for t in record[mode]]
        cpu = [t for record in rounds for t in record[f"{mode}_cpu"]]
        deciles = statistics.quantiles(times, n=10)
        modes[mode] = {
            "steps": len(times),
            "median_s": statistics.median(times),
            "mean_s": statistics.fmean(times),
            "p10_s": deciles[0],
            "p90_s": deciles[-1],
            "cpu_median_s": statistics.median(cpu),
        }
    comparisons = {mode: compare(rounds, modes, mode) for mode in names if mode != "bare"}
    per_round = []
    for index, record in enumerate(rounds):
        entry: dict[str, Any] = {"round": index + 1, "order": record["order"]}
        for mode in names:
            entry[f"{mode}_median_s"] = statistics.median(record[mode])
        for mode in comparisons:
            entry[f"{mode}_ratio"] = comparisons[mode]["round_ratios"][index]
        per_round.append(entry)
    summary: dict[str, Any] = {
        "world_size": raw["world_size"],
        "params": raw["params"],
        "torch": raw["torch"],
        "threads_per_rank": raw["threads_per_rank"],
        "modes": modes,
        "rounds": per_round,
        "comparisons": comparisons,
        "goal_ratio": GOAL_RATIO,
    }
    if "jitckpt" in comparisons:  # the headline of the steady-state overhead
        jit = comparisons["jitckpt"]
        summary.update({key: value for key, value in jit.items() if key != "round_ratios"})
        summary["meets_goal"] = jit["ratio_median_of_rounds"] <= GOAL_RATIO
    summary["goals"] = {
        mode: comparisons[mode]["ratio_median_of_rounds"] <= GOAL_RATIO
        for mode in GOAL_MODES
        if mode in comparisons
    }
    return summary


def report(summary: dict[str, Any]) -> str:
    config = summary["config"]
    names = list(summary["modes"])
    others = [mode for mode in names if mode != "bare"]
    ms = 1e3
    lines = [
        "",
        f"step time against the bare loop: example GPT ({summary['params'] / 1e6:.2f}M params), "
        f"{summary['world_size']} ranks, gloo, {summary['threads_per_rank']} thread/rank, "
        f"torch {summary['torch']}, jitckpt at {summary['source']}",
        f"{config['rounds']} rounds x {config['steps']} timed steps per mode "
        f"(+{config['warmup']} warmup steps per round, not timed); times of rank 0",
        "",
        f"{'round':>5}  {'bare ms':>8}  " + "  ".join(f"{m + ' ratio':>22}" for m in others),
    ]
    for r in summary["rounds"]:
        lines.append(
            f"{r['round']:>5}  {r['bare_median_s'] * ms:>8.2f}  "
            + "  ".join(f"{r[f'{m}_ratio']:>22.4f}" for m in others)
        )
    lines += [
        "",
        f"{'mode':<16}  {'steps':>5}  {'median ms':>9}  {'mean ms':>8}  {'p10 ms':>7}  "
        f"{'p90 ms':>7}  {'CPU ms':>7}",
    ]
    for mode in names:
        m = summary["modes"][mode]
        lines.append(
            f"{mode:<16}  {m['steps']:>5}  {m['median_s'] * ms:>9.2f}  {m['mean_s'] * ms:>8.2f}  "
            f"{m['p10_s'] * ms:>7.2f}  {m['p90_s'] * ms:>7.2f}  {m['cpu_median_s'] * ms:>7.2f}"
        )
    lines += ["(CPU ms: median CPU time of rank 0's process per step, all its threads)", ""]
    for mode, c in summary["comparisons"].items():
        line = (
            f"{mode}/bare: median of per-round ratios {c['ratio_median_of_rounds']:.4f} "
            f"(rounds {c['ratio_round_min']:.4f} .. {c['ratio_round_max']:.4f}, standard error "
            f"{c['ratio_round_stderr']:.4f}); ratio of means {c['ratio_of_means']:.4f} "
            f"({c['overhead_mean_ms']:+.2f} ms per step)"
        )
        if c.get("blocked_median_s") is not None:
            line += (
                f"; {c['checkpoints']} checkpoints every {config['save_every']} steps blocked "
                f"the loop {c['blocked_median_s'] * ms:.1f} ms each (median, max "
                f"{c['blocked_max_s'] * ms:.1f})"
            )
        lines.append(line)
    if "meets_goal" in summary:
        lines.append(
            f"CPU time ratio of medians jitckpt/bare: {summary['cpu_ratio_of_medians']:.4f} "
            f"({summary['cpu_overhead_median_ms']:+.2f} ms per step)"
        )
    for mode, met in summary.get("goals", {}).items():
        verdict = "meets the goal" if met else "ABOVE the goal"
        lines.append(f"goal: {mode}'s median of per-round ratios <= {GOAL_RATIO} -> {verdict}")
    return "\n".join(lines)
