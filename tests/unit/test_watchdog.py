"""Hang detection (jitckpt.detect.watchdog): suspects named from heartbeats
in the store, the stall that counts as a hang, and the watchdog thread."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fakes import FakeStore

from jitckpt import protocol
from jitckpt.detect import watchdog
from jitckpt.detect.watchdog import Heartbeat, Watchdog, hang_timeout, read_suspects
from jitckpt.tracker import StepTracker


def beat(store: FakeStore, rank: int, completed: int, progress: int, age_s: float = 0.0) -> None:
    record = {"t": time.time() - age_s, "completed": completed, "progress": progress}
    store.set(protocol.HEARTBEAT_KEY.format(rank=rank), json.dumps(record))


# -- suspects -----------------------------------------------------------------------------
def test_suspects_stale_and_missing_are_dead_live_but_behind_is_hung() -> None:
    store = FakeStore()
    beat(store, 0, completed=5, progress=10)  # the front
    beat(store, 1, completed=5, progress=10)  # level with it
    beat(store, 2, completed=5, progress=10, age_s=watchdog.STALE_AFTER_S + 2)
    # rank 3 never published
    beat(store, 4, completed=5, progress=3)  # stuck inside step 5
    beat(store, 5, completed=4, progress=99)  # a step behind, whatever its progress
    beat(store, 6, completed=6, progress=0, age_s=5)  # ahead, but stale: not the front
    assert read_suspects(store, world_size=7, own_rank=0) == {
        2: "dead",
        3: "dead",
        4: "hung",
        5: "hung",
        6: "dead",
    }


def test_ranks_level_with_each_other_are_healthy() -> None:
    store = FakeStore()
    for rank in range(4):
        beat(store, rank, completed=9, progress=4, age_s=watchdog.STALE_AFTER_S / 2)
    assert read_suspects(store, world_size=4, own_rank=2) == {}


def test_unreadable_heartbeats_and_a_lost_store_count_as_dead() -> None:
    store = FakeStore()
    beat(store, 0, completed=1, progress=1)
    store.set(protocol.HEARTBEAT_KEY.format(rank=1), b"\x00not json")
    assert read_suspects(store, world_size=2, own_rank=0) == {1: "dead"}

    class LostStore(FakeStore):
        def check(self, keys: list[str]) -> bool:
            raise ConnectionResetError("store host gone")

    assert read_suspects(LostStore(), world_size=3, own_rank=0) == {0: "dead", 1: "dead", 2: "dead"}


def test_heartbeat_publishes_what_read_suspects_reads_and_reports_a_peer_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watchdog, "HEARTBEAT_INTERVAL_S", 0.01)
    store = FakeStore()
    ahead, behind = StepTracker(), StepTracker()
    for tracker, steps in ((ahead, 3), (behind, 2)):
        for step in range(steps + 1):
            tracker.boundary(step)
    failures: list[tuple[str, str]] = []
    called = threading.Event()

    def on_failure(who: str) -> None:
        failures.append((who, threading.current_thread().name))
        called.set()

    beats = [Heartbeat(store, 0, ahead, on_peer_failure=on_failure), Heartbeat(store, 1, behind)]
    for hb in beats:
        hb.start()
    try:
        deadline = time.monotonic() + 2
        while not store.check([protocol.HEARTBEAT_KEY.format(rank=r) for r in (0, 1)]):
            assert time.monotonic() < deadline, "no heartbeat published"
            time.sleep(0.01)
        assert read_suspects(store, world_size=2, own_rank=0) == {1: "hung"}
        store.set(protocol.FAILURE_KEY, "1")
        assert called.wait(2)
        time.sleep(0.05)  # a few more heartbeats: the callback must not run again
    finally:
        for hb in beats:
            hb.stop()
    assert failures == [("1", "jitckpt-peer-failure")]


# -- the timeout ----------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def tracker_with_steps(monkeypatch: pytest.MonkeyPatch, step_times: list[float]) -> StepTracker:
    """A tracker whose steps took ``step_times`` seconds (by a fake clock)."""
    clock = Clock()
    monkeypatch.setattr("jitckpt.tracker.time", clock)
    tracker = StepTracker()
    tracker.boundary(0)
    for step, seconds in enumerate(step_times, start=1):
        clock.now += seconds
        tracker.boundary(step)
    return tracker


def test_timeout_before_the_first_step_is_the_first_step_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert hang_timeout(tracker_with_steps(monkeypatch, []), None) == watchdog.FIRST_STEP_TIMEOUT_S


def test_timeout_is_a_multiple_of_the_median_step_time_but_never_below_the_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = tracker_with_steps(monkeypatch, [0.01, 0.02, 0.01])
    assert hang_timeout(fast, None) == watchdog.HANG_TIMEOUT_FLOOR_S
    slow = tracker_with_steps(monkeypatch, [60.0, 2.0, 2.5, 2.0])  # a slow first step
    assert hang_timeout(slow, None) == pytest.approx(watchdog.HANG_TIMEOUT_STEPS * 2.25)


def test_timeout_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hang_timeout(tracker_with_steps(monkeypatch, [2.0]), 0.2) == 0.2
    assert hang_timeout(tracker_with_steps(monkeypatch, []), 7.0) == 7.0


# -- the watchdog thread -----------------------------------------------------------------------
TIMEOUT_S = 0.1


@pytest.fixture
def fast_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog, "CHECK_INTERVAL_S", 0.01)


class Hangs:
    """on_hang that records each call; returns ``keep_watching`` answers in turn."""

    def __init__(self, *keep_watching: bool) -> None:
        self.calls: list[tuple[float, float, float, str]] = []
        self.answers = list(keep_watching)
        self.event = threading.Event()

    def __call__(self, stalled_s: float, timeout_s: float) -> bool:
        self.calls.append((time.monotonic(), stalled_s, timeout_s, threading.current_thread().name))
        self.event.set()
        return self.answers.pop(0) if self.answers else False


@pytest.mark.usefixtures("fast_checks")
def test_watchdog_reports_a_stall_from_its_own_thread_and_stops() -> None:
    tracker, hangs = StepTracker(), Hangs(False)
    tracker.boundary(0)
    dog = Watchdog(tracker, hangs, timeout_override=TIMEOUT_S)
    started = time.monotonic()
    dog.start()
    assert hangs.event.wait(2)
    dog._thread.join(1)
    assert not dog._thread.is_alive(), "on_hang returned False: the watchdog stops"
    ((when, stalled, timeout, thread),) = hangs.calls
    assert timeout == TIMEOUT_S and stalled > TIMEOUT_S and when - started > TIMEOUT_S
    assert thread == "jitckpt-watchdog"


@pytest.mark.usefixtures("fast_checks")
def test_watchdog_is_quiet_while_progress_moves() -> None:
    tracker, hangs = StepTracker(), Hangs()
    dog = Watchdog(tracker, hangs, timeout_override=3 * TIMEOUT_S)
    dog.start()
    try:
        for step in range(20):  # 0.2 s of steps, each far under the timeout
            tracker.boundary(step)
            time.sleep(0.01)
        assert hangs.calls == []
        assert hangs.event.wait(2), "once progress stops, the stall is reported"
    finally:
        dog.stop()


@pytest.mark.usefixtures("fast_checks")
def test_watchdog_is_quiet_while_paused_and_counts_the_stall_from_the_resume() -> None:
    tracker, hangs = StepTracker(), Hangs()
    dog = Watchdog(tracker, hangs, timeout_override=TIMEOUT_S)
    dog.pause()
    dog.start()
    try:
        time.sleep(3 * TIMEOUT_S)
        assert hangs.calls == []
        resumed = time.monotonic()
        dog.resume()
        assert hangs.event.wait(2)
        assert hangs.calls[0][0] - resumed >= TIMEOUT_S - 0.02
    finally:
        dog.stop()


def test_watchdog_a_pause_between_two_checks_still_restarts_the_stall_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watchdog, "CHECK_INTERVAL_S", 0.05)
    tracker, hangs = StepTracker(), Hangs()
    dog = Watchdog(tracker, hangs, timeout_override=0.2)
    dog.start()
    try:
        time.sleep(0.15)
        paused = time.monotonic()
        dog.pause()
        dog.resume()  # far shorter than a check interval
        assert hangs.event.wait(2)
        assert hangs.calls[0][0] - paused >= 0.2
    finally:
        dog.stop()


@pytest.mark.usefixtures("fast_checks")
def test_watchdog_keeps_watching_from_zero_when_on_hang_says_so() -> None:
    tracker, hangs = StepTracker(), Hangs(True, False)
    dog = Watchdog(tracker, hangs, timeout_override=TIMEOUT_S)
    dog.start()
    dog._thread.join(2)
    assert not dog._thread.is_alive()
    first, second = hangs.calls
    assert second[0] - first[0] > TIMEOUT_S, "the second stall is counted from zero"
