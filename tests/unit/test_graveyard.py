"""The graveyard (jitckpt.inprocess.graveyard): abandoned groups are dropped
on a background thread after a delay, never on the thread that kept them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jitckpt.inprocess import graveyard
from jitckpt.inprocess.graveyard import Graveyard, resource_counts

DELAY_S = 0.05


@pytest.fixture(autouse=True)
def short_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graveyard, "RELEASE_DELAY_S", DELAY_S)


class Group:
    """Stands for an abandoned process group: records where and when it is
    destroyed, and may block in its destructor like a gloo group does."""

    def __init__(self, log: list[tuple[str, float, str]], name: str, block_s: float = 0.0):
        self.log = log
        self.name = name
        self.block_s = block_s

    def __del__(self) -> None:
        time.sleep(self.block_s)
        self.log.append((self.name, time.monotonic(), threading.current_thread().name))


def test_items_are_dropped_on_the_background_thread_after_the_delay() -> None:
    log: list[tuple[str, float, str]] = []
    yard = Graveyard()
    kept = time.monotonic()
    yard.keep(Group(log, "g1"))
    assert log == [] and len(yard) == 1, "not dropped on the caller's thread"
    assert yard.join(2)
    ((name, dropped, thread),) = log
    assert name == "g1"
    assert thread == "jitckpt-graveyard" and thread != threading.current_thread().name
    assert dropped - kept >= DELAY_S
    assert len(yard) == 0


def test_on_release_reports_what_how_long_held_and_how_long_the_drop_blocked() -> None:
    log: list[tuple[str, float, str]] = []
    reports: list[tuple[str, float, float]] = []
    yard = Graveyard(on_release=lambda what, held_s, drop_s: reports.append((what, held_s, drop_s)))
    yard.keep((Group(log, "slow", block_s=0.5), "pending work"))
    yard.keep(Group(log, "fast"))
    assert yard.join(2)
    # A drop that blocks does not hold up the next one.
    assert [name for name, _, _ in log] == ["fast", "slow"]
    # Reported as each drop ends: the fast one first.
    (fast_what, fast_held, fast_drop), (slow_what, slow_held, slow_drop) = reports
    assert slow_what == "Group" and fast_what == "Group"  # a tuple is named by its first item
    assert slow_drop >= 0.5 and slow_held >= DELAY_S + 0.5
    assert 0 <= fast_drop < 0.5 and fast_held >= DELAY_S


def test_join_is_false_while_something_is_held_and_true_once_empty() -> None:
    assert Graveyard().join(0.01), "nothing kept: nothing to wait for"
    log: list[tuple[str, float, str]] = []
    yard = Graveyard()
    yard.keep(Group(log, "g"))
    assert not yard.join(0.001)
    assert yard.join(2) and len(log) == 1


def test_failing_report_does_not_stop_later_releases() -> None:
    log: list[tuple[str, float, str]] = []
    reports: list[str] = []

    def on_release(what: str, held_s: float, drop_s: float) -> None:
        reports.append(what)
        if len(reports) == 1:
            raise RuntimeError("event log closed")

    yard = Graveyard(on_release=on_release)
    yard.keep(Group(log, "a"))
    yard.keep(Group(log, "b"))
    assert yard.join(2)
    # Each drops on its own thread: in either order.
    assert sorted(name for name, _, _ in log) == ["a", "b"] and reports == ["Group", "Group"]


def test_items_kept_after_the_thread_ended_are_still_dropped() -> None:
    log: list[tuple[str, float, str]] = []
    yard = Graveyard()
    yard.keep(Group(log, "first"))
    assert yard.join(2)
    yard.keep(Group(log, "second"))
    assert yard.join(2)
    assert [(name, thread) for name, _, thread in log] == [
        ("first", "jitckpt-graveyard"),
        ("second", "jitckpt-graveyard"),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_resource_counts_see_threads_and_file_descriptors(tmp_path: Path) -> None:
    before = resource_counts()
    assert all(isinstance(v, int) and v > 0 for v in before.values()), before
    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(3)]
    files = [open(tmp_path / f"f{i}", "w") for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        during = resource_counts()
    finally:
        release.set()
        for thread in threads:
            thread.join()
        for handle in files:
            handle.close()
    # Three more of each; one stray thread of an earlier test may end meanwhile.
    assert during["threads"] >= before["threads"] + 2, (before, during)
    assert during["fds"] >= before["fds"] + 2, (before, during)


QUIET_A_GLOO_GROUP = """
import os, time, torch.distributed as dist
from jitckpt.inprocess.graveyard import GLOO_LOOP_THREAD, quiet_abandoned_loops

def loops():
    found = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as handle:
            stat = handle.read()
        if stat[stat.index("(") + 1 : stat.rindex(")")] == GLOO_LOOP_THREAD:
            found[tid] = int(stat[stat.rindex(")") + 2 :].split()[38])  # policy
    return found

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
# The loop thread names itself once it runs: under load, a moment later.
deadline = time.monotonic() + 10
while not loops() and time.monotonic() < deadline:
    time.sleep(0.01)
before = loops()
quieted = quiet_abandoned_loops()
print(sorted(before.values()), quieted, sorted(loops().values()))
"""


def test_a_gloo_groups_event_loop_is_found_by_name_and_set_to_sched_idle() -> None:
    """The name quiet_abandoned_loops looks for is the one torch's gloo gives
    its loop thread: a real group's loop goes from SCHED_OTHER (0) to
    SCHED_IDLE (5)."""
    result = subprocess.run(
        [sys.executable, "-c", QUIET_A_GLOO_GROUP],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # One loop, at the ordinary policy before; quieted; SCHED_IDLE after.
    assert result.stdout.strip() == f"[0] 1 [{os.SCHED_IDLE}]", result.stdout
