"""Who sends what after an in-process recovery re-formed the group
(jitckpt.inprocess.recovery.plan_transfer)."""

from __future__ import annotations

import pytest

from jitckpt.inprocess.recovery import NO_STATE, plan_transfer


def test_the_replacement_gets_the_state_from_the_lowest_rank_at_the_newest_step() -> None:
    plan = plan_transfer([6, 6, NO_STATE, 6])
    assert (plan.step, plan.source, plan.replacements, plan.behind) == (6, 0, [2], [])
    assert [plan.role(r) for r in range(4)] == ["source", "survivor", "replacement", "survivor"]


def test_a_rank_one_all_reduce_behind_gets_the_reduced_gradient() -> None:
    # Rank 0 was still waiting in step 6's all-reduce; ranks 1 and 3 had it
    # and wait in step 7's: step 7 wins, rank 1 sends.
    plan = plan_transfer([6, 7, NO_STATE, 7])
    assert (plan.step, plan.source, plan.replacements, plan.behind) == (7, 1, [2], [0])
    assert [plan.role(r) for r in range(4)] == ["behind", "source", "replacement", "survivor"]


def test_several_replacements_are_all_sent_the_state() -> None:
    plan = plan_transfer([NO_STATE, 3, NO_STATE, 3])
    assert plan.source == 1 and plan.replacements == [0, 2] and plan.behind == []


def test_no_rank_with_a_state_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no rank has a state"):
        plan_transfer([NO_STATE, NO_STATE])


def test_every_survivor_at_the_same_step_needs_no_transfer() -> None:
    plan = plan_transfer([4, 4, 4])
    assert plan.replacements == [] and plan.behind == [] and plan.source == 0
