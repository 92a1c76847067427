"""When the launcher recovers in process and when it restarts every worker
(jitckpt.launch.agent.in_process_refusal): the reason it prints."""

from __future__ import annotations

from typing import Any

from jitckpt.launch.coordinator import MAX_INPROCESS_RECOVERIES, in_process_refusal


def refusal(**changes: Any) -> str | None:
    asked: list[bool] = []
    settings: dict[str, Any] = {
        "failed_ranks": [2],
        "recovering": None,
        "replaced": set(),
        "finished": 1,
        "workers": 4,
        "fatal": False,
        "recoveries": 0,
        "not_capable": lambda: asked.append(True) or [],
    }
    settings.update(changes)
    return in_process_refusal(**settings)


def test_a_single_failure_of_capable_ranks_is_recovered_in_process() -> None:
    assert refusal() is None


def test_a_failure_during_a_recovery_names_the_rank_and_its_part() -> None:
    reason = refusal(failed_ranks=[3, 2], recovering=5, replaced={2})
    assert reason == (
        "rank 2 (its replacement), rank 3 (a survivor) failed during in-process recovery 5"
    )


def test_no_survivor_left() -> None:
    assert refusal(finished=4) == "no surviving worker"


def test_a_fatal_error_is_never_recovered() -> None:
    assert refusal(fatal=True) == "a worker reported a fatal error"


def test_a_failure_that_strikes_every_replacement_ends_in_the_restart_path() -> None:
    reason = refusal(recoveries=MAX_INPROCESS_RECOVERIES)
    assert reason == f"{MAX_INPROCESS_RECOVERIES} in-process recoveries in this attempt"


def test_ranks_that_cannot_recover_in_process_are_named() -> None:
    reason = refusal(not_capable=lambda: [0, 1, 2, 3])
    assert reason is not None and reason.startswith("rank(s) [0, 1, 2, 3] not ready for it")


def test_the_store_is_asked_only_when_nothing_else_refuses() -> None:
    def not_capable() -> list[int]:
        raise AssertionError("the store must not be read")

    assert refusal(fatal=True, not_capable=not_capable) == "a worker reported a fatal error"
