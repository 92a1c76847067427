"""Who writes a sharded JIT checkpoint (jitckpt.checkpoint.writers.choose_writers)."""

from __future__ import annotations

from jitckpt.checkpoint.writers import choose_writers
from jitckpt.state.mesh import MeshLayout

GRID_2X2 = MeshLayout(((0, 1), (2, 3)), ("replicate", "shard"))
GRID_1D = MeshLayout(((0, 1, 2, 3),), ("shard",))


def test_writers_one_intact_replica_preferred() -> None:
    decision = choose_writers(GRID_2X2, {0: 6, 1: 6, 2: 6})
    assert (decision.step, decision.writers) == (6, [0, 1])


def test_writers_mix_replicas_when_no_replica_is_whole() -> None:
    # Rank 1 (replica 0, shard 1) and rank 2 (replica 1, shard 0) are gone.
    decision = choose_writers(GRID_2X2, {0: 6, 3: 6})
    assert (decision.step, decision.writers) == (6, [0, 3])


def test_writers_take_the_newest_step_every_shard_has() -> None:
    decision = choose_writers(GRID_2X2, {0: 7, 1: 7, 2: 6, 3: 6})
    assert (decision.step, decision.writers) == (7, [0, 1])


def test_lost_shard_is_named() -> None:
    decision = choose_writers(GRID_1D, {0: 5, 1: 5, 3: 5})
    assert decision.step is None and decision.lost_shard == 2
    assert decision.reason == "no surviving replica of shard 2"


def test_shards_at_different_steps_cannot_be_combined() -> None:
    decision = choose_writers(GRID_2X2, {0: 6, 1: 7, 3: 7})
    assert decision.step is None and decision.lost_shard is None
    assert "different steps" in str(decision.reason)
