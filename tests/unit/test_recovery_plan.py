"""Who sends what after an in-process recovery re-formed the group
(jitckpt.inprocess.plan.plan_transfer). A position is where a rank
waits (jitckpt.comm.position): the forward of a step (DDP's buffer
broadcast) or the reduction of its gradients."""

from __future__ import annotations

import pytest

from jitckpt.comm import at_reduce, position, step_of
from jitckpt.inprocess.plan import NO_STATE, plan_transfer


def reduce(step: int) -> int:
    return position(step, reduce=True)


def forward(step: int) -> int:
    return position(step, reduce=False)


def test_positions_order_the_forward_of_a_step_before_its_reduction() -> None:
    assert forward(6) < reduce(6) < forward(7)
    assert (step_of(reduce(6)), at_reduce(reduce(6))) == (6, True)
    assert (step_of(forward(6)), at_reduce(forward(6))) == (6, False)
    assert NO_STATE < forward(0)


def test_the_replacement_gets_the_state_from_the_lowest_rank_at_the_newest_position() -> None:
    plan = plan_transfer([reduce(6), reduce(6), NO_STATE, reduce(6)])
    assert (plan.step, plan.at_reduce, plan.source) == (6, True, 0)
    assert (plan.replacements, plan.behind) == ([2], [])
    assert [plan.role(r) for r in range(4)] == ["source", "survivor", "replacement", "survivor"]


def test_a_rank_one_all_reduce_behind_gets_the_reduced_gradient() -> None:
    # Rank 0 was still waiting in step 6's all-reduce; ranks 1 and 3 had it
    # and wait in step 7's: step 7 wins, rank 1 sends.
    plan = plan_transfer([reduce(6), reduce(7), NO_STATE, reduce(7)])
    assert (plan.step, plan.source, plan.replacements, plan.behind) == (7, 1, [2], [0])
    assert [plan.role(r) for r in range(4)] == ["behind", "source", "replacement", "survivor"]


def test_survivors_in_the_next_forward_are_ahead_of_one_still_reducing() -> None:
    # Ranks 1 and 3 finished step 6 and wait in step 7's buffer broadcast;
    # rank 0 still waits in step 6's all-reduce: it gets the gradient.
    plan = plan_transfer([reduce(6), forward(7), NO_STATE, forward(7)])
    assert (plan.step, plan.at_reduce, plan.source, plan.behind) == (7, False, 1, [0])


def test_a_failure_before_the_forward_broadcast_recovers_at_the_forward() -> None:
    plan = plan_transfer([forward(5), NO_STATE, forward(5), forward(5)])
    assert (plan.step, plan.at_reduce, plan.source, plan.replacements) == (5, False, 0, [1])


def test_several_replacements_are_all_sent_the_state() -> None:
    plan = plan_transfer([NO_STATE, reduce(3), NO_STATE, reduce(3)])
    assert plan.source == 1 and plan.replacements == [0, 2] and plan.behind == []


def test_no_rank_with_a_state_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no rank has a state"):
        plan_transfer([NO_STATE, NO_STATE])


def test_a_rank_behind_the_broadcast_root_gets_the_gradient_and_the_forward_buffers() -> None:
    # Rank 2 died in step 5's backward. Ranks 0 (the broadcast's root) and 1
    # passed step 5's buffer broadcast and wait in its reduction; rank 3 had
    # not read the last bytes of step 4's all-reduce when rank 2's connection
    # reset. Rank 3 needs step 4's gradient, then step 5's broadcast buffers:
    # at its forward nobody broadcasts any more.
    plan = plan_transfer([reduce(5), reduce(5), NO_STATE, reduce(4)])
    assert (plan.step, plan.at_reduce, plan.source, plan.behind) == (5, True, 0, [3])
    assert (plan.gradient_to, plan.buffers_to) == ([3], [3])


def test_a_rank_still_in_the_forward_gets_only_the_buffers() -> None:
    plan = plan_transfer([reduce(5), forward(5), NO_STATE, reduce(5)])
    assert (plan.source, plan.behind, plan.gradient_to, plan.buffers_to) == (0, [1], [], [1])


def test_when_the_others_wait_in_the_forward_a_rank_behind_broadcasts_with_them() -> None:
    plan = plan_transfer([reduce(6), forward(7), NO_STATE, forward(7)])
    assert (plan.gradient_to, plan.buffers_to) == ([0], [])
