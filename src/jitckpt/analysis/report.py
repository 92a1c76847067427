"""``jitckpt report DIR``: a run's failures (summary.py), its timeline and
goodput (timeline.py), as text, JSON or a picture."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from jitckpt import events as ev
from jitckpt.analysis.plotting import PlotUnavailable, pyplot
from jitckpt.analysis.summary import format_summary, summarize_in_process
from jitckpt.analysis.timeline import PHASES, build
from jitckpt.events import EVENTS_FILE, read_events

PHASE_COLOURS = {
    "startup": "#9e9e9e",
    "restore": "#7e57c2",
    "training kept": "#43a047",
    "training lost": "#e53935",
    "detection": "#fb8c00",
    "save": "#1e88e5",
    "restart": "#6d4c41",
    "exit": "#cfcfcf",
}


def _steps(attempt: dict[str, Any]) -> str:
    if attempt["start_step"] is None:
        return "never reached the training loop"
    first = attempt["start_step"]
    kept = attempt["kept_steps"]
    return f"from step {first}, {kept} step(s) kept" + (
        f" ({first}..{first + kept - 1})" if kept else ""
    )


def format_timeline(report: dict[str, Any]) -> str:
    t0 = report["t0"]
    lines = [
        f"timeline (seconds since the first worker process started; wall {report['wall_s']:.3f} s):"
    ]
    for attempt in report["attempts"]:
        failure = attempt["failure"]
        ended = (
            f", failure {failure + 1}: "
            + (report["failures"][failure]["fault"] or "detected failure")
            if failure is not None
            else ""
        )
        lines.append(f"  attempt {attempt['attempt']}: {_steps(attempt)}{ended}")
        for phase in attempt["phases"]:
            if phase.duration <= 0 and phase.name not in ("training kept",):
                continue
            note = ""
            if phase.name == "training lost" and failure is not None:
                lost = report["failures"][failure]["iterations_lost"]
                note = f"  ({lost} iteration(s) lost)"
            lines.append(
                f"    {phase.start - t0:9.3f} .. {phase.end - t0:9.3f}  "
                f"{phase.name:<14} {phase.duration:8.3f} s{note}"
            )
    totals = report["phase_totals_s"]
    wall = report["wall_s"]
    goodput = report["goodput"]
    lines.append(
        f"goodput {100 * goodput:.1f} %: {report['kept_training_s']:.3f} s of training on steps "
        f"that were kept / {wall:.3f} s wall (first worker start to job end)"
        if goodput is not None
        else "goodput: - (no wall time)"
    )
    shares = ", ".join(f"{name} {totals[name]:.3f} s" for name in PHASES if totals[name] > 0)
    lines.append(f"time by phase: {shares}")
    return "\n".join(lines)


def report_json(report: dict[str, Any]) -> str:
    t0 = report["t0"]
    attempts = [
        dict(
            attempt,
            phases=[
                {
                    "phase": p.name,
                    "start_s": p.start - t0,
                    "end_s": p.end - t0,
                    "duration_s": p.duration,
                }
                for p in attempt["phases"]
            ],
        )
        for attempt in report["attempts"]
    ]
    failures = [dict(f, at_s=f["failure_t"] - t0) for f in report["failures"]]
    return json.dumps(dict(report, attempts=attempts, failures=failures), indent=1)


def plot_timeline(report: dict[str, Any], title: str, path: str) -> None:
    """One bar per attempt on a shared time axis, coloured by phase, each
    failure marked by a red line across the picture."""
    plt = pyplot()
    t0 = report["t0"]
    attempts = report["attempts"]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.55 * len(attempts)))
    seen: set[str] = set()
    for row, attempt in enumerate(attempts):
        for phase in attempt["phases"]:
            if phase.duration <= 0:
                continue
            ax.broken_barh(
                [(phase.start - t0, phase.duration)],
                (row - 0.35, 0.7),
                facecolors=PHASE_COLOURS[phase.name],
                label=None if phase.name in seen else phase.name,
            )
            seen.add(phase.name)
    for number, failure in enumerate(report["failures"], 1):
        at = failure["failure_t"] - t0
        ax.axvline(at, color="#b71c1c", linewidth=1.2, linestyle="--")
        ax.annotate(
            f"failure {number}: {failure['iterations_lost']} it. lost",
            (at, len(attempts) - 0.5),
            fontsize=7,
            color="#b71c1c",
            xytext=(3, 0),
            textcoords="offset points",
        )
    ax.set_yticks(range(len(attempts)))
    ax.set_yticklabels([f"attempt {a['attempt']}" for a in attempts])
    ax.set_ylim(-0.6, len(attempts) - 0.1)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first worker process started")
    goodput = report["goodput"]
    ax.set_title(
        f"{title}: goodput {100 * goodput:.1f} %" if goodput is not None else title, fontsize=9
    )
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: PHASES.index(labels[i]))
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        fontsize=7,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        frameon=False,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jitckpt report",
        description="Failures, recovery timeline and goodput of a run, from its event log.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the timeline into this file")
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / EVENTS_FILE).is_file():
        print(
            f"jitckpt report: {args.run_dir} has no {EVENTS_FILE}; is it a jitckpt run directory?",
            file=sys.stderr,
        )
        return 2
    events = read_events(args.run_dir)
    report = build(events)
    if args.json:
        print(report_json(dict(report, in_process=summarize_in_process(events))))
    else:
        ends = [e for e in events if e["event"] == ev.JOB_END]
        print(format_summary(args.run_dir, ends[-1]["outcome"] if ends else None))
        print(format_timeline(report))
    if args.plot:
        try:
            plot_timeline(report, str(args.run_dir), args.plot)
        except PlotUnavailable as exc:
            print(f"jitckpt report: {exc}", file=sys.stderr)
            return 1
    return 0
