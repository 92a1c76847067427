"""Monte-Carlo replay of a recovery strategy, to check the closed forms of
costmodel.py against the process they describe rather than against algebra.

Failures arrive as a Poisson process in wall time, also during saves and
recoveries. The job runs segment after segment (``segment_h`` of wall time
each, ending at a safe point: a periodic checkpoint written, or a JIT
iteration boundary); a failure throws away the segment in progress, and
the job then pays its recovery, which a further failure restarts. Between
two failures every segment that fits completes, so the replay jumps over
them in one step instead of looping per iteration; the result is the same.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from jitckpt.analysis.costmodel import ClusterInputs, Strategy

# Failures drawn per strategy by default: the waste is a sum over failures,
# so its relative standard error falls as 1/sqrt(failures); 20,000 keeps it
# under 1 % for the inputs in docs/cost-model.md and runs in well under 1 s.
DEFAULT_FAILURES = 20_000
# Independent replicas the failures are split over: their spread gives the
# standard error that is reported with the mean.
REPLICAS = 10


@dataclass(frozen=True)
class MonteCarloResult:
    waste_gpu_h: float  # mean over replicas, scaled to the requested hours
    stderr_gpu_h: float
    failures: int  # failures drawn in all replicas together
    mean_lost_work_h: float  # work thrown away per failure that struck a segment


def replay(
    strategy: Strategy, rate: float, work_h: float, rng: random.Random
) -> tuple[float, int, int, float]:
    """Wall time to finish ``work_h`` hours of work; failures seen in all,
    and those that struck a segment (not a recovery); the work they threw
    away."""
    target = max(1, math.ceil(work_h / strategy.work_h))  # segments to complete
    done = 0
    clock = 0.0
    failures = 0
    in_segment = 0
    lost = 0.0
    next_failure = rng.expovariate(rate)
    while True:
        fit = int((next_failure - clock) // strategy.segment_h)
        if done + fit >= target:
            clock += (target - done) * strategy.segment_h
            return clock, failures, in_segment, lost
        done += fit
        clock += fit * strategy.segment_h
        lost += min(next_failure - clock, strategy.work_h)  # the interrupted segment's work
        clock = next_failure
        failures += 1
        in_segment += 1
        # Recovery: needs recovery_h without a failure; each failure during
        # it starts it over (and counts as a failure).
        while True:
            next_failure = clock + rng.expovariate(rate)
            if next_failure - clock >= strategy.recovery_h:
                clock += strategy.recovery_h
                break
            clock = next_failure
            failures += 1
        # next_failure stays: by memorylessness it is a valid draw of the
        # next failure after the recovery.


def simulate(
    strategy: Strategy,
    inputs: ClusterInputs,
    hours: float,
    seed: int = 0,
    failures: int = DEFAULT_FAILURES,
) -> MonteCarloResult:
    """Wasted GPU-hours for ``hours`` of training, estimated by replaying
    enough work that about ``failures`` failures happen in total."""
    rate = inputs.job_failure_rate
    rng = random.Random(seed)
    work_per_replica = max(hours, failures / REPLICAS / rate)
    wastes: list[float] = []
    seen = 0
    struck_segments = 0
    lost_total = 0.0
    for _ in range(REPLICAS):
        wall, count, in_segment, lost = replay(strategy, rate, work_per_replica, rng)
        done = math.ceil(work_per_replica / strategy.work_h) * strategy.work_h
        per_work = wall / done
        wastes.append((inputs.gpus * (per_work - 1.0) + strategy.idle_gpus * per_work) * hours)
        seen += count
        struck_segments += in_segment
        lost_total += lost
    return MonteCarloResult(
        waste_gpu_h=statistics.fmean(wastes),
        stderr_gpu_h=statistics.stdev(wastes) / math.sqrt(REPLICAS),
        failures=seen,
        mean_lost_work_h=lost_total / struck_segments if struck_segments else 0.0,
    )
