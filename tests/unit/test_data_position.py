"""The data position (jitckpt.state.data): ElasticDistributedSampler is a
DistributedSampler until told otherwise, a loader resumes at the exact
batch, and a resume at another world size continues the epoch with no
sample skipped or repeated beyond DistributedSampler's padding."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from jitckpt.errors import CheckpointMismatchError, UsageError
from jitckpt.state.data import DataPosition, ElasticDistributedSampler

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

SEED = 11


def loader(
    dataset: list[int],
    world: int,
    rank: int,
    batch_size: int = 2,
    sampler_class: type[DistributedSampler] = ElasticDistributedSampler,  # type: ignore[type-arg]
) -> StatefulDataLoader:
    sampler = sampler_class(dataset, num_replicas=world, rank=rank, shuffle=True, seed=SEED)
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler)


def take(batches: Any, n: int) -> list[int]:
    return [i for _ in range(n) for i in next(batches).tolist()]


@pytest.mark.parametrize(
    ("size", "world", "shuffle", "drop_last"),
    [
        (37, 4, True, False),
        (37, 4, True, True),
        (10, 3, False, False),
        (8, 4, True, False),
        (3, 4, True, False),
        (3, 4, False, True),
    ],
)
def test_elastic_sampler_is_distributed_sampler_while_start_is_zero(
    size: int, world: int, shuffle: bool, drop_last: bool
) -> None:
    dataset = list(range(size))
    for rank in range(world):
        kwargs = dict(num_replicas=world, rank=rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        elastic = ElasticDistributedSampler(dataset, **kwargs)
        plain = DistributedSampler(dataset, **kwargs)
        for epoch in range(3):
            elastic.set_epoch(epoch)
            plain.set_epoch(epoch)
            assert list(elastic) == list(plain), (rank, epoch)
            assert len(elastic) == len(plain), (rank, epoch)


def test_set_epoch_starts_the_new_epoch_from_its_beginning() -> None:
    sampler = ElasticDistributedSampler(list(range(20)), num_replicas=2, rank=0, seed=1)
    sampler.start = 9
    assert len(sampler) == 6  # 11 left, padded to 12, split in two
    sampler.set_epoch(1)
    assert sampler.start == 0 and len(sampler) == 10


@pytest.mark.parametrize("epoch", [0, 2])
def test_position_resumes_at_the_same_batch_and_epoch(epoch: int) -> None:
    dataset = list(range(41))
    original = loader(dataset, world=2, rank=1)
    original.sampler.set_epoch(epoch)
    batches = iter(original)
    take(batches, 3)
    state = DataPosition(original).state_dict()
    expected = [b.tolist() for b in batches]
    assert expected, "the epoch must not be over yet"

    fresh = loader(dataset, world=2, rank=1)  # epoch 0 until the position says otherwise
    DataPosition(fresh).load_state_dict(state)
    assert [b.tolist() for b in fresh] == expected


def resume_elsewhere(
    size: int, old_world: int, new_world: int, batches: int, batch_size: int = 2
) -> tuple[list[int], dict[int, list[int]], list[int]]:
    """Run ``batches`` batches on every rank of ``old_world``, save rank 0's
    position, and run the rest of the epoch on ``new_world`` fresh ranks."""
    dataset = list(range(size))
    old = [loader(dataset, old_world, r, batch_size) for r in range(old_world)]
    for sampler in (ld.sampler for ld in old):
        sampler.set_epoch(1)
    before = [i for ld in old for i in take(iter(ld), batches)]
    state = DataPosition(old[0]).state_dict()
    after = {}
    for rank in range(new_world):
        new = loader(dataset, new_world, rank, batch_size)
        position = DataPosition(new)
        position.check(state, "ckpt")
        position.load_state_dict(state)
        after[rank] = [i for batch in new for i in batch.tolist()]
    return before, after, old[0].sampler.epoch_order()


@pytest.mark.parametrize(
    ("size", "old_world", "new_world", "batches"),
    [(37, 4, 2, 3), (40, 4, 2, 2), (37, 2, 3, 4), (50, 3, 5, 1)],
)
def test_world_size_change_continues_the_epoch_without_skipping_or_repeating(
    size: int, old_world: int, new_world: int, batches: int
) -> None:
    before, after, order = resume_elsewhere(size, old_world, new_world, batches)
    consumed = batches * 2 * old_world
    assert sorted(before) == sorted(order[:consumed])
    left = size - consumed
    padding = -left % new_world
    seen = Counter(before + [i for part in after.values() for i in part])
    assert set(seen) == set(range(size)), "no sample of the epoch is skipped"
    assert sum(seen.values()) == size + padding, "repeats only as DistributedSampler pads"
    assert {len(part) for part in after.values()} == {(left + padding) // new_world}
    # The new ranks split the rest of the same order the way DistributedSampler would.
    rest = order[consumed:] + order[consumed:][:padding]
    assert after == {r: rest[r::new_world] for r in range(new_world)}


def test_a_second_resume_at_the_new_world_size_keeps_the_shifted_start() -> None:
    dataset = list(range(37))
    old = [loader(dataset, 4, r) for r in range(4)]
    before = [i for ld in old for i in take(iter(ld), 3)]  # 24 samples
    shrunk = [loader(dataset, 2, r) for r in range(2)]
    for ld in shrunk:
        DataPosition(ld).load_state_dict(DataPosition(old[0]).state_dict())
    middle = [i for ld in shrunk for i in take(iter(ld), 2)]  # 8 more
    state = DataPosition(shrunk[1]).state_dict()
    assert state["start"] == 24
    again = [loader(dataset, 2, r) for r in range(2)]
    rest = []
    for ld in again:
        DataPosition(ld).load_state_dict(state)
        rest += [i for batch in ld for i in batch.tolist()]
    seen = Counter(before + middle + rest)
    assert set(seen) == set(range(37)) and sum(seen.values()) == 37 + 1  # 13 left, 1 pad


def test_plain_distributed_sampler_at_another_world_size_is_refused() -> None:
    dataset = list(range(30))
    old = loader(dataset, 4, 0, sampler_class=DistributedSampler)
    take(iter(old), 2)
    state = DataPosition(old).state_dict()
    with pytest.raises(CheckpointMismatchError) as caught:
        DataPosition(loader(dataset, 2, 0, sampler_class=DistributedSampler)).check(state, "ck")
    message = str(caught.value)
    assert "world size 4, this job has 2" in message
    assert "DistributedSampler cannot continue" in message
    assert "ElasticDistributedSampler" in message
    DataPosition(loader(dataset, 4, 3, sampler_class=DistributedSampler)).check(state, "ck")


def test_batch_size_change_at_another_world_size_is_refused() -> None:
    dataset = list(range(30))
    state = DataPosition(loader(dataset, 4, 0, batch_size=2)).state_dict()
    with pytest.raises(CheckpointMismatchError, match="batch size 2 per rank"):
        DataPosition(loader(dataset, 2, 0, batch_size=4)).check(state, "ck")


def test_loader_without_state_dict_is_refused_naming_stateful_data_loader() -> None:
    plain = DataLoader(list(range(8)), batch_size=2)
    # A UsageError (the launcher stops instead of restarting), still a TypeError.
    with pytest.raises(UsageError, match="StatefulDataLoader") as caught:
        DataPosition(plain)
    assert isinstance(caught.value, TypeError)
    assert "DataLoader" in str(caught.value)
