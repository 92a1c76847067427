"""The data position of a plain DataLoader (jitckpt.state.passes): a resume
skips the consumed batches without loading them, with or without worker
processes, and continues the same order."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from jitckpt.errors import CheckpointMismatchError, UsageError
from jitckpt.state.data import ElasticDistributedSampler
from jitckpt.state.passes import PassPosition, skipping


class Counted(Dataset):  # type: ignore[type-arg]
    """Items are their index; every load is counted (across workers)."""

    def __init__(self, size: int, loads: object) -> None:
        self.size, self.loads = size, loads

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        with self.loads.get_lock():  # type: ignore[attr-defined]
            self.loads.value += 1  # type: ignore[attr-defined]
        return index


def loader_over(
    size: int, *, rank: int = 0, world: int = 2, workers: int = 0, cls=DistributedSampler
):  # type: ignore[no-untyped-def]
    loads = multiprocessing.Value("i", 0)
    sampler = cls(Counted(size, loads), num_replicas=world, rank=rank, shuffle=True, seed=3)
    loader = DataLoader(sampler.dataset, batch_size=4, sampler=sampler, num_workers=workers)
    return loader, loads


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_skips_consumed_batches_without_loading_them(workers: int) -> None:
    loader, loads = loader_over(64, workers=workers)
    loader.sampler.set_epoch(5)
    whole = [batch.tolist() for batch in loader]
    loads.value = 0
    rest = [batch.tolist() for batch in skipping(loader, 3)]
    assert rest == whole[3:]
    assert loads.value == sum(len(b) for b in whole[3:])  # nothing of the first 3 loaded


def test_skipping_zero_is_the_loader_itself_and_all_is_empty() -> None:
    loader, _ = loader_over(32)
    assert [b.tolist() for b in skipping(loader, 0)] == [b.tolist() for b in loader]
    assert list(skipping(loader, len(loader))) == []


def saved_at(position: PassPosition, pass_index: int, consumed: int) -> dict:
    assert position.begin_pass(pass_index) == 0
    position.consumed(consumed)
    return position.state_dict()


def test_passes_before_the_saved_one_are_fast_forwarded_then_its_batches_skipped() -> None:
    loader, _ = loader_over(64)
    state = saved_at(PassPosition(loader), 2, 5)
    resumed = PassPosition(loader)
    resumed.check(state, "step-7")
    resumed.load_state_dict(state)
    assert resumed.resume_pass() == 2
    assert [resumed.begin_pass() for _ in range(4)] == [None, None, 5, 0]


def test_an_epoch_loop_starts_at_the_saved_pass() -> None:
    loader, _ = loader_over(64)
    resumed = PassPosition(loader)
    resumed.load_state_dict(saved_at(PassPosition(loader), 3, 1))
    assert resumed.begin_pass(3) == 1
    assert resumed.state_dict()["pass"] == 3 and resumed.state_dict()["consumed"] == 1
    assert resumed.begin_pass(4) == 0


def test_a_position_saved_before_any_batch_resumes_nothing() -> None:
    loader, _ = loader_over(64)
    resumed = PassPosition(loader)
    resumed.load_state_dict(PassPosition(loader).state_dict())
    assert resumed.resume_pass() is None and resumed.begin_pass() == 0


def test_another_world_size_needs_the_elastic_sampler_and_keeps_the_order() -> None:
    plain, _ = loader_over(64, world=2)
    state = saved_at(PassPosition(plain), 0, 2)
    bigger, _ = loader_over(64, world=4)
    with pytest.raises(CheckpointMismatchError, match="ElasticDistributedSampler"):
        PassPosition(bigger).check(state, "step-2")

    old = [loader_over(64, rank=r, world=2, cls=ElasticDistributedSampler)[0] for r in range(2)]
    state = saved_at(PassPosition(old[0]), 0, 2)
    consumed = {i for loader in old for batch in list(loader)[:2] for i in batch.tolist()}
    new = [loader_over(64, rank=r, world=4, cls=ElasticDistributedSampler)[0] for r in range(4)]
    rest: list[int] = []
    for loader in new:
        position = PassPosition(loader)
        position.check(state, "step-2")
        position.load_state_dict(state)
        assert position.begin_pass(0) == 0  # the elastic sampler starts after the consumed
        rest += [i for batch in loader for i in batch.tolist()]
    assert sorted(rest) == sorted(set(range(64)) - consumed)


def test_a_stateful_loaders_position_or_a_foreign_loader_is_refused() -> None:
    loader, _ = loader_over(32)
    with pytest.raises(CheckpointMismatchError, match="stateful loader"):
        PassPosition(loader).check({"epoch": 0, "loader": {}}, "step-3")
    with pytest.raises(UsageError, match="torch DataLoader"):
        PassPosition([torch.zeros(2)])
    with pytest.raises(UsageError, match="RandomSampler"):
        PassPosition(DataLoader(list(range(8)), batch_size=2, shuffle=True))
    position = PassPosition(loader)
    with pytest.raises(UsageError, match="one training loader"):
        position.bind(loader_over(32)[0])
