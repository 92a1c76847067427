"""``jitckpt simulate``: wasted GPU time of periodic checkpointing against JIT
(with a restart, and in-process), from the cost model in costmodel.py, for
inputs given as flags or measured in a run (``--from-run DIR``). Prints a
table, or JSON; ``--monte-carlo`` checks the closed forms by replay;
``--plot`` draws the waste against the number of GPUs."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from jitckpt import events as ev
from jitckpt.analysis import montecarlo
from jitckpt.analysis.costmodel import (
    HOUR_S,
    ClusterInputs,
    exact_waste,
    first_order_waste,
    strategies,
)
from jitckpt.analysis.plotting import PlotUnavailable, pyplot
from jitckpt.analysis.summary import summarize
from jitckpt.events import EVENTS_FILE, read_events

# Defaults: a Llama-3-405B-scale job (docs/cost-model.md says where each
# number comes from). Failure rate: 419 unexpected interruptions in 54 days
# on 16,384 GPUs (Llama 3 report, sec. 3.3.4).
LLAMA3_FAILURE_RATE = 419 / (54 * 24 * 16384)
DEFAULTS: dict[str, float | int | None] = {
    "gpus": 16384,
    "failure_rate": LLAMA3_FAILURE_RATE,
    "checkpoint_s": 60.0,
    "restart_s": 600.0,
    "detection_s": 30.0,
    "iteration_s": 6.0,
    "jit_save_s": 30.0,
    "inprocess_recovery_s": 60.0,
    "jit_overhead": 0.0,
    "spares": 0,
    "interval_s": None,
}
DEFAULT_HOURS = 1000.0
# The plot's x axis: from a small job to past the largest published runs.
PLOT_GPUS = [2**k for k in range(3, 18)]


def _number(kind: type, low: float, inclusive: bool) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


POSITIVE_INT = _number(int, 1, True)
NON_NEGATIVE_INT = _number(int, 0, True)
POSITIVE = _number(float, 0.0, False)
NON_NEGATIVE = _number(float, 0.0, True)


# The model's inputs as flags: name, parser, meaning and unit. Each flag's
# default is DEFAULTS[name], shown in --help.
INPUT_FLAGS: list[tuple[str, Callable[[str], Any], str]] = [
    ("gpus", POSITIVE_INT, "N, GPUs in the job"),
    (
        "failure_rate",
        POSITIVE,
        "f, failures per GPU-hour; the default is Llama 3 405B's: 419 in 54 days on 16384 GPUs",
    ),
    ("checkpoint_s", POSITIVE, "o, seconds one periodic checkpoint stalls training"),
    ("restart_s", NON_NEGATIVE, "r, seconds to restart the job after a failure, restore included"),
    ("detection_s", NON_NEGATIVE, "d, seconds from a failure to its detection"),
    ("iteration_s", POSITIVE, "m, seconds per training iteration"),
    ("jit_save_s", NON_NEGATIVE, "s, seconds to write the JIT checkpoint"),
    (
        "inprocess_recovery_s",
        NON_NEGATIVE,
        "x, seconds of in-process recovery: new group formed, state sent to the replacement",
    ),
    ("jit_overhead", NON_NEGATIVE, "o_jit, steady-state slowdown of JIT, a fraction (0.01 = 1%%)"),
    ("spares", NON_NEGATIVE_INT, "K, idle hot-spare GPUs kept for in-process recovery"),
    ("interval_s", POSITIVE, "periodic checkpoint interval in seconds"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jitckpt simulate",
        description="Wasted GPU-hours of periodic checkpointing vs JIT checkpointing "
        "(docs/cost-model.md). Unset inputs come from --from-run, else from a "
        "Llama-3-405B-scale default.",
    )
    add = p.add_argument
    for name, parse, meaning in INPUT_FLAGS:
        default = DEFAULTS[name]
        shown = "the optimum" if default is None else f"{default:.3g}".replace("e-0", "e-")
        if isinstance(default, int):
            shown = str(default)
        add("--" + name.replace("_", "-"), type=parse, help=f"{meaning} (default {shown})")
    add(
        "--hours",
        type=POSITIVE,
        default=DEFAULT_HOURS,
        help=f"hours of failure-free training to cost (default {DEFAULT_HOURS:g})",
    )
    add("--from-run", metavar="DIR", help="take m, d, s and r from this run's events.jsonl")
    add("--monte-carlo", action="store_true", help="also replay each strategy with random failures")
    add("--seed", type=int, default=0, help="Monte-Carlo seed (default 0)")
    add(
        "--mc-failures",
        type=POSITIVE_INT,
        default=montecarlo.DEFAULT_FAILURES,
        help=f"failures drawn per strategy (default {montecarlo.DEFAULT_FAILURES})",
    )
    add("--json", action="store_true", help="print JSON instead of a table")
    add("--plot", metavar="FILE.png", help="plot wasted GPU-hours against N for each strategy")
    return p


def measured_inputs(run_dir: str | Path) -> dict[str, float]:
    """m, d, s and r measured in a run: medians over its failures. r is the
    restart plus the restore (what a job restart costs besides the save)."""
    events = read_events(run_dir)
    failures = summarize(events)
    found: dict[str, float] = {}
    step_times = [
        e["median_step_s"]
        for e in events
        if e["event"] in (ev.FINISH, ev.DETECT) and e.get("median_step_s")
    ]
    if step_times:
        found["iteration_s"] = statistics.median(step_times)

    def median_of(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    detection = median_of([f["detection_s"] for f in failures])
    save = median_of([f["save_s"] for f in failures])
    restart = median_of(
        [
            f["restart_s"] + f["restore_s"]
            if f["restart_s"] is not None and f["restore_s"] is not None
            else None
            for f in failures
        ]
    )
    for key, value in (("detection_s", detection), ("jit_save_s", save), ("restart_s", restart)):
        if value is not None:
            found[key] = max(0.0, value)
    return found


def resolve_inputs(args: argparse.Namespace) -> tuple[ClusterInputs, dict[str, str]]:
    """Flag, else measured in --from-run, else default; and where each came from."""
    measured = measured_inputs(args.from_run) if args.from_run else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in DEFAULTS.items():
        flag = getattr(args, key)
        if flag is not None:
            values[key], sources[key] = flag, "flag"
        elif key in measured:
            values[key], sources[key] = measured[key], "run"
        else:
            values[key], sources[key] = default, "default"
    return ClusterInputs(**values), sources


def evaluate(
    inputs: ClusterInputs,
    hours: float,
    monte_carlo: bool = False,
    seed: int = 0,
    mc_failures: int = montecarlo.DEFAULT_FAILURES,
) -> dict[str, Any]:
    """Everything the table, JSON and plot show, as one dictionary."""
    rows = []
    all_strategies = strategies(inputs)
    periodic = first_order_waste(all_strategies[0], inputs, hours)
    for index, strategy in enumerate(all_strategies):
        waste = first_order_waste(strategy, inputs, hours)
        exact = exact_waste(strategy, inputs, hours)
        row: dict[str, Any] = {
            "strategy": strategy.name,
            "wasted_gpu_h": waste,
            "wasted_fraction": waste / (inputs.gpus * hours),
            "exact_gpu_h": exact,
            "periodic_over_this": periodic / waste if waste > 0 else float("inf"),
            "cost_per_failure_s": (strategy.recovery_h + strategy.work_h / 2) * HOUR_S,
        }
        if monte_carlo:
            # One stream per strategy, so adding a strategy changes no other.
            mc = montecarlo.simulate(
                strategy, inputs, hours, seed=seed * 1000 + index, failures=mc_failures
            )
            row["monte_carlo"] = {
                "wasted_gpu_h": mc.waste_gpu_h,
                "stderr_gpu_h": mc.stderr_gpu_h,
                "failures": mc.failures,
                "mean_lost_work_s": mc.mean_lost_work_h * HOUR_S,
                "vs_first_order": mc.waste_gpu_h / waste - 1 if waste > 0 else None,
                "vs_exact": mc.waste_gpu_h / exact - 1 if exact > 0 else None,
            }
        rows.append(row)
    rate = inputs.job_failure_rate
    return {
        "inputs": asdict(inputs),
        "hours": hours,
        "job_failures_per_hour": rate,
        "checkpoints_per_hour": inputs.checkpoints_per_hour(),
        "interval_s": HOUR_S / inputs.checkpoints_per_hour(),
        "strategies": rows,
    }


# Table columns: header and cell of one strategy's row.
COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("strategy", lambda r: r["strategy"]),
    ("wasted GPU-h", lambda r: f"{r['wasted_gpu_h']:.4g}"),
    ("% of GPU time", lambda r: f"{100 * r['wasted_fraction']:.3g} %"),
    ("per failure", lambda r: f"{r['cost_per_failure_s']:.4g} s"),
    ("exact", lambda r: f"{r['exact_gpu_h']:.4g}"),
    ("periodic/this", lambda r: f"{r['periodic_over_this']:.3g}x"),
]
MONTE_CARLO_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("monte carlo", lambda r: f"{r['monte_carlo']['wasted_gpu_h']:.4g}"),
    ("+- s.e.", lambda r: f"{r['monte_carlo']['stderr_gpu_h']:.2g}"),
    ("vs 1st order", lambda r: f"{100 * r['monte_carlo']['vs_first_order']:+.2f} %"),
    ("vs exact", lambda r: f"{100 * r['monte_carlo']['vs_exact']:+.2f} %"),
]


def _inputs_lines(result: dict[str, Any], sources: dict[str, str]) -> list[str]:
    i = result["inputs"]
    rate = result["job_failures_per_hour"]

    def given(key: str, text: str) -> str:
        source = sources.get(key, "default")
        return text if source == "default" else f"{text} [{source}]"

    interval = "optimal" if i["interval_s"] is None else "set"
    return [
        f"jitckpt simulate: {result['hours']:g} h of failure-free training on "
        + given("gpus", f"N={i['gpus']} GPUs"),
        "  failures: "
        + given("failure_rate", f"f={i['failure_rate']:.3g} per GPU-hour")
        + f" -> N f = {rate:.3g} per hour for the job (one every {1 / rate:.3g} h)",
        "  "
        + ", ".join(
            [
                given("checkpoint_s", f"o={i['checkpoint_s']:.3g} s checkpoint"),
                given("restart_s", f"r={i['restart_s']:.3g} s restart"),
                given("detection_s", f"d={i['detection_s']:.3g} s detection"),
                given("iteration_s", f"m={i['iteration_s']:.3g} s iteration"),
            ]
        ),
        "  "
        + ", ".join(
            [
                given("jit_save_s", f"s={i['jit_save_s']:.3g} s JIT save"),
                given("inprocess_recovery_s", f"x={i['inprocess_recovery_s']:.3g} s in-process"),
                given("jit_overhead", f"o_jit={i['jit_overhead']:g}"),
                given("spares", f"K={i['spares']} spares"),
            ]
        ),
        f"  periodic interval ({interval}): {result['interval_s'] / 60:.3g} min "
        f"(c = {result['checkpoints_per_hour']:.3g} per hour)",
    ]


def format_table(result: dict[str, Any], sources: dict[str, str]) -> str:
    with_mc = "monte_carlo" in result["strategies"][0]
    columns = COLUMNS + (MONTE_CARLO_COLUMNS if with_mc else [])
    cells = [[header for header, _ in columns]] + [
        [cell(row) for _, cell in columns] for row in result["strategies"]
    ]
    widths = [max(len(line[k]) for line in cells) for k in range(len(columns))]
    table = [
        "  "
        + "  ".join(
            text.ljust(width) if k == 0 else text.rjust(width)
            for k, (text, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    work = result["inputs"]["gpus"] * result["hours"]
    notes = [
        f"  wasted GPU-h: lost to checkpoints, failures and recoveries while the job does "
        f"{result['hours']:g} h",
        f"  of training ({work:.4g} GPU-hours of work), first-order closed form; exact: also "
        "counts",
        "  failures during saves and recoveries; per failure: recovery + half the work between "
        "safe points.",
    ]
    if with_mc:
        failures = result["strategies"][0]["monte_carlo"]["failures"]
        notes.append(
            f"  monte carlo: mean of {montecarlo.REPLICAS} replays, about {failures} failures "
            "per strategy."
        )
    return "\n".join(_inputs_lines(result, sources) + [""] + table + [""] + notes)


def plot(inputs: ClusterInputs, hours: float, path: str) -> None:
    plt = pyplot()
    gpus = sorted(set(PLOT_GPUS) | {inputs.gpus})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for index, name in enumerate(s.name for s in strategies(inputs)):
        colour = f"C{index}"
        first, exact = [], []
        for n in gpus:
            scaled = replace(inputs, gpus=n)
            strategy = strategies(scaled)[index]
            first.append(first_order_waste(strategy, scaled, hours))
            exact.append(exact_waste(strategy, scaled, hours))
        ax.plot(gpus, first, color=colour, marker="o", markersize=3, label=f"{name}")
        ax.plot(gpus, exact, color=colour, linestyle=":", linewidth=1)
    ax.axvline(inputs.gpus, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N, GPUs in the job")
    ax.set_ylabel(f"wasted GPU-hours per {hours:g} h of training")
    ax.set_title(
        f"f={inputs.failure_rate:.3g}/GPU-h, o={inputs.checkpoint_s:.3g} s, "
        f"r={inputs.restart_s:.3g} s, d={inputs.detection_s:.3g} s, m={inputs.iteration_s:.3g} s, "
        f"s={inputs.jit_save_s:.3g} s, x={inputs.inprocess_recovery_s:.3g} s",
        fontsize=8,
    )
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(title="solid: first order; dotted: exact", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_run and not (Path(args.from_run) / EVENTS_FILE).is_file():
        parser.error(
            f"--from-run {args.from_run}: no {EVENTS_FILE} there; is it a jitckpt run directory?"
        )
    inputs, sources = resolve_inputs(args)
    result = evaluate(inputs, args.hours, args.monte_carlo, args.seed, args.mc_failures)
    result["sources"] = sources
    print(json.dumps(result, indent=1) if args.json else format_table(result, sources))
    if args.plot:
        try:
            plot(inputs, args.hours, args.plot)
        except PlotUnavailable as exc:
            print(f"jitckpt simulate: {exc}", file=sys.stderr)
            return 1
    return 0
