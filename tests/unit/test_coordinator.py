"""The agent's side of in-process recovery (jitckpt.launch.coordinator):
the notice, spare assignments, the deadline, kill requests, and telling a
persistent fault from a transient one."""

from __future__ import annotations

import json

import pytest
from fakes import FakeStore

from jitckpt import protocol
from jitckpt.launch import coordinator as coordinator_module
from jitckpt.launch.coordinator import MAX_SAME_FAULT_TRIES, Coordinator, in_process_refusal


def coordinator(deadline_s: float = 20.0) -> Coordinator:
    return Coordinator(FakeStore(), world_size=4, deadline_s=deadline_s)


def test_a_recovery_publishes_a_notice_for_the_next_generation() -> None:
    c = coordinator()
    assert c.begin({2: 2}) == 1
    assert c.begin({1: 1}) == 2
    notice = json.loads(c.store.get(protocol.INPROC_NOTICE_KEY.format(generation=2)))
    assert notice["generation"] == 2 and notice["dead"] == [1]
    assert c.recoveries == 2 and c.current is not None and c.current.generation == 2


def test_a_spare_is_told_its_rank_and_generation() -> None:
    c = coordinator()
    c.assign_spare("abc-1", rank=2, local_rank=2, generation=1)
    assignment = json.loads(c.store.get(protocol.INPROC_SPARE_KEY.format(spare="abc-1")))
    assert assignment == {"rank": 2, "local_rank": 2, "generation": 1}


def test_a_recovery_ends_when_every_rank_is_done() -> None:
    c = coordinator()
    generation = c.begin({2: 2})
    for rank in range(4):
        assert c.check() is None and c.current is not None
        c.store.set(protocol.INPROC_RANK_DONE_KEY.format(generation=generation, rank=rank), "1")
        c.store.add(protocol.INPROC_DONE_COUNTER.format(generation=generation), 1)
    assert c.check() is None and c.current is None


def test_the_agent_stays_busy_until_every_rank_redid_the_step_or_the_hold_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = coordinator()
    assert not c.busy()
    generation = c.begin({2: 2})
    assert c.busy()  # the recovery itself
    for _ in range(4):
        c.store.add(protocol.INPROC_DONE_COUNTER.format(generation=generation), 1)
    assert c.check() is None and c.current is None
    progressed = protocol.INPROC_PROGRESSED_COUNTER.format(generation=generation)
    for _ in range(3):
        c.store.add(progressed, 1)
        assert c.busy()  # the replacement's redo: not every rank is past it
    c.store.add(progressed, 1)
    assert not c.busy()
    # A redo that never completes holds the agent back only REDO_HOLD_S.
    generation = c.begin({1: 1})
    for _ in range(4):
        c.store.add(protocol.INPROC_DONE_COUNTER.format(generation=generation), 1)
    c.check()
    assert c.busy()
    monkeypatch.setattr(coordinator_module, "REDO_HOLD_S", 0.0)
    assert not c.busy()


def test_a_recovery_past_its_deadline_names_the_ranks_that_never_finished() -> None:
    c = coordinator(deadline_s=0.0)
    generation = c.begin({2: 2})
    for rank in (0, 2):
        c.store.set(protocol.INPROC_RANK_DONE_KEY.format(generation=generation, rank=rank), "1")
        c.store.add(protocol.INPROC_DONE_COUNTER.format(generation=generation), 1)
    reason = c.check()
    assert reason is not None
    assert f"in-process recovery {generation} not done after" in reason
    assert "rank(s) [1, 3] never finished it" in reason


def test_only_kill_requests_of_the_current_generation_count() -> None:
    c = coordinator()
    c.begin({2: 2})  # generation 1
    stale = protocol.kill_request(0, by=0)
    c.store.set(protocol.INPROC_KILL_KEY.format(rank=1), stale)
    c.store.set(protocol.INPROC_KILL_KEY.format(rank=3), protocol.kill_request(1, by=0))
    assert c.kill_requests([0, 1, 2, 3]) == [3]
    assert c.kill_requests([0, 1, 2, 3]) == [], "a request is consumed"


def test_a_malformed_kill_request_is_ignored_with_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whoever reaches the store can write the key: only a request of
    another rank of this job, in the current generation, kills."""
    c = coordinator()
    c.begin({2: 2})  # generation 1
    forged = {
        0: b"\x80not utf-8",
        1: b"1",
        2: json.dumps({"generation": 1}).encode(),  # no requester
        3: json.dumps({"generation": True, "by": 0}).encode(),
    }
    for rank, value in forged.items():
        c.store.set(protocol.INPROC_KILL_KEY.format(rank=rank), value)
    assert c.kill_requests([0, 1, 2, 3]) == []
    for value in (
        {"generation": 1, "by": 3},  # by itself
        {"generation": 1, "by": 4},  # not a rank of this job
        {"generation": 1, "by": 0, "pid": 1},  # more than a request
        {"generation": "1", "by": 0},
    ):
        c.store.set(protocol.INPROC_KILL_KEY.format(rank=3), json.dumps(value))
        assert c.kill_requests([3]) == []
    warnings = capsys.readouterr().err.splitlines()
    print("\n".join(warnings))
    assert len(warnings) == 8 and all("ignoring a malformed request to kill" in w for w in warnings)
    c.store.set(protocol.INPROC_KILL_KEY.format(rank=3), protocol.kill_request(1, by=2))
    assert c.kill_requests([3]) == [3], "a well-formed request still counts"


def test_the_same_rank_failing_again_before_its_step_completes_is_counted() -> None:
    c = coordinator()
    assert c.repeated([2]) == {2: (0, None)}  # a first failure
    generation = c.begin({2: 2})
    c.store.set(protocol.INPROC_STEP_KEY.format(generation=generation), "6")
    assert c.repeated([2]) == {2: (1, 6)}  # again at step 6
    generation = c.begin({2: 2})
    c.store.set(protocol.INPROC_STEP_KEY.format(generation=generation), "6")
    tries = c.repeated([2])
    assert tries == {2: (MAX_SAME_FAULT_TRIES, 6)}
    reason = in_process_refusal(
        failed_ranks=[2], recovering=None, replaced=set(), finished=1, workers=4, fatal=False,
        recoveries=2, not_capable=lambda: [], repeated=tries,
    )  # fmt: skip
    assert reason == (
        f"rank 2 failed again at step 6 after {MAX_SAME_FAULT_TRIES} in-process recoveries "
        "of it: a persistent fault, not a transient one"
    )


def test_a_failure_after_the_recovered_step_completed_is_a_new_fault() -> None:
    c = coordinator()
    generation = c.begin({2: 2})
    c.store.add(protocol.INPROC_PROGRESSED_COUNTER.format(generation=generation), 1)
    assert c.repeated([2]) == {2: (0, None)}
    assert c.repeated([1]) == {1: (0, None)}, "another rank is another fault"


def test_a_rank_that_finished_its_part_fails_after_the_recovery_not_during_it() -> None:
    c = coordinator()
    generation = c.begin({2: 2})
    assert c.interrupted([2]) == generation
    c.store.set(protocol.INPROC_RANK_DONE_KEY.format(generation=generation, rank=2), "1")
    assert c.interrupted([2]) is None
    assert c.interrupted([1, 2]) == generation, "rank 1 had not finished"
