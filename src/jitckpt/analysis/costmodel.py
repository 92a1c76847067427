"""Wasted GPU time of a training job under failures, for three recovery
strategies: periodic checkpointing at its optimal interval, JIT with a job
restart, and JIT with in-process recovery (Gupta et al., EuroSys'24).

Every strategy is the same renewal process: the job alternates between
*segments* (the work between two safe points, plus any steady-state cost)
and, after each failure, a *recovery* (detection, save, restart...). A
failure loses the work since the last safe point. Two closed forms follow:
the paper's first-order one (each failure costs its recovery plus half a
segment) and the exact expectation of the renewal process (Daly 2006), which
also counts failures during saves and recoveries. docs/cost-model.md derives
both. Inputs are in seconds; the formulas work in hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOUR_S = 3600.0


@dataclass(frozen=True)
class ClusterInputs:
    """The job and its cluster. Durations in seconds.

    Args:
        gpus: N, GPUs in the job (all of them wait while one recovers).
        failure_rate: f, failures per GPU-hour; the job fails N*f times an hour.
        checkpoint_s: o, time one periodic checkpoint stalls training.
        restart_s: r, restart of the whole job after a failure: processes,
            group init, loading the checkpoint, until training resumes.
        detection_s: d, failure until the job notices (a crash: seconds; a
            hang: the hang timeout). The issue's lines omit it; both
            strategies pay it.
        iteration_s: m, one training iteration.
        jit_save_s: s, a survivor writing the JIT checkpoint.
        inprocess_recovery_s: x, in-process recovery: new group formed and the
            replacement given the state by a peer; survivors do not restart.
        jit_overhead: o_jit, steady-state slowdown of JIT as a fraction of
            the iteration time (0.01 = 1 %).
        spares: K, idle hot-spare GPUs kept for in-process recovery.
        interval_s: periodic checkpoint interval; None = the optimum 1/c*.
    """

    gpus: int
    failure_rate: float
    checkpoint_s: float
    restart_s: float
    detection_s: float
    iteration_s: float
    jit_save_s: float
    inprocess_recovery_s: float
    jit_overhead: float = 0.0
    spares: int = 0
    interval_s: float | None = None

    @property
    def job_failure_rate(self) -> float:
        """lambda = N f: failures of the whole job per hour."""
        return self.gpus * self.failure_rate

    def optimal_checkpoints_per_hour(self) -> float:
        """c* = sqrt(N f / (2 o)), o in hours: minimises c o + N f / (2c)."""
        return math.sqrt(self.job_failure_rate / (2.0 * self.checkpoint_s / HOUR_S))

    def checkpoints_per_hour(self) -> float:
        if self.interval_s is not None:
            return HOUR_S / self.interval_s
        return self.optimal_checkpoints_per_hour()


@dataclass(frozen=True)
class Strategy:
    """One recovery strategy as a renewal process. Hours.

    Args:
        name: shown in tables.
        work_h: work between two safe points (1/c periodic, m for JIT).
        segment_h: wall time of a failure-free segment: work_h plus the
            steady cost paid per segment (a periodic save; JIT's overhead).
        recovery_h: wall time from a failure until training resumes, not
            counting the work redone.
        idle_gpus: GPUs held but not training (hot spares).
    """

    name: str
    work_h: float
    segment_h: float
    recovery_h: float
    idle_gpus: int = 0


def strategies(inputs: ClusterInputs) -> list[Strategy]:
    m = inputs.iteration_s / HOUR_S
    d = inputs.detection_s / HOUR_S
    interval = 1.0 / inputs.checkpoints_per_hour()
    jit_segment = m * (1.0 + inputs.jit_overhead)
    return [
        Strategy(
            "periodic",
            work_h=interval,
            segment_h=interval + inputs.checkpoint_s / HOUR_S,
            recovery_h=d + inputs.restart_s / HOUR_S,
        ),
        Strategy(
            "jit-restart",
            work_h=m,
            segment_h=jit_segment,
            recovery_h=d + (inputs.jit_save_s + inputs.restart_s) / HOUR_S,
        ),
        Strategy(
            "jit-inprocess",
            work_h=m,
            segment_h=jit_segment,
            recovery_h=d + inputs.inprocess_recovery_s / HOUR_S,
            idle_gpus=inputs.spares,
        ),
    ]


def first_order_waste(strategy: Strategy, inputs: ClusterInputs, hours: float) -> float:
    """Wasted GPU-hours for ``hours`` of failure-free training, to first order
    (the paper's form): W = N t (steady + N f (recovery + work/2)) + K t.
    Periodic: steady = c o, work/2 = 1/(2c). JIT: steady = o_jit, work/2 = m/2."""
    steady = (strategy.segment_h - strategy.work_h) / strategy.work_h
    per_failure = strategy.recovery_h + strategy.work_h / 2.0
    fraction = steady + inputs.job_failure_rate * per_failure
    return inputs.gpus * hours * fraction + strategy.idle_gpus * hours


def expected_wall_per_work(strategy: Strategy, rate: float) -> float:
    """Exact expected wall time per hour of work of the renewal process with
    Poisson failures at ``rate`` per hour, failures also striking during
    saves and recoveries (a failed recovery starts over). Per segment:
    E = e^(rate R) (e^(rate X) - 1) / rate (Daly 2006), divided by its work."""
    if rate == 0.0:
        return strategy.segment_h / strategy.work_h
    per_segment = (
        math.exp(rate * strategy.recovery_h) * math.expm1(rate * strategy.segment_h) / rate
    )
    return per_segment / strategy.work_h


def exact_waste(strategy: Strategy, inputs: ClusterInputs, hours: float) -> float:
    """Wasted GPU-hours for ``hours`` of training, from the exact expectation:
    N (T - t) + K T, with T the expected wall time."""
    wall = hours * expected_wall_per_work(strategy, inputs.job_failure_rate)
    return inputs.gpus * (wall - hours) + strategy.idle_gpus * wall
