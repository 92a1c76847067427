"""Random-number snapshots (jitckpt.state.rng): numpy's state is reused
while its generator has drawn nothing, and is always what
``np.random.get_state()`` would say, the cached Gaussian included."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from jitckpt.state import rng


def same_numpy_state(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and bool((a[1] == b[1]).all()) and tuple(a[2:]) == tuple(b[2:])


@pytest.fixture(autouse=True)
def restore_global_generators():
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def test_numpy_state_is_reused_until_a_draw() -> None:
    np.random.seed(5)
    first = rng.capture()["numpy"]
    assert rng.capture()["numpy"] is first  # nothing drawn: no copy
    np.random.rand()
    after_draw = rng.capture()["numpy"]
    assert after_draw is not first
    assert same_numpy_state(after_draw, np.random.get_state())
    assert not same_numpy_state(after_draw, first)


def test_a_cached_gaussian_taken_without_a_draw_is_seen() -> None:
    np.random.seed(7)
    np.random.randn()  # draws two, caches the second
    cached = rng.capture()["numpy"]
    assert cached[3] == 1
    np.random.randn()  # takes the cached one: the key and position do not move
    taken = rng.capture()["numpy"]
    assert taken[3] == 0
    assert same_numpy_state(taken, np.random.get_state())


def test_reseeding_to_the_same_seed_and_set_state_are_seen() -> None:
    np.random.seed(3)
    seeded = rng.capture()["numpy"]
    expected = np.random.get_state()
    np.random.rand(10)
    np.random.set_state(expected)
    assert same_numpy_state(rng.capture()["numpy"], seeded)
    np.random.seed(4)
    assert same_numpy_state(rng.capture()["numpy"], np.random.get_state())


def test_snapshot_restores_every_generator() -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # a cached Gaussian is part of the state
    snapshot = rng.to_checkpoint(rng.capture())
    expected = (random.random(), np.random.randn(), np.random.rand(), torch.rand(1).item())
    rng.restore(snapshot)
    assert (random.random(), np.random.randn(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.filterwarnings("ignore:get_state and legacy:RuntimeWarning")
def test_another_bit_generator_falls_back_to_get_state() -> None:
    original = np.random.get_bit_generator()
    np.random.set_bit_generator(np.random.PCG64(0))
    try:
        first = rng.capture()["numpy"]
        second = rng.capture()["numpy"]
        assert first is not second  # no key bytes to compare: never reused
    finally:
        np.random.set_bit_generator(original)
