"""Sharded checkpoints are read through jitckpt's DCP reader
(jitckpt.state.dcp_read): a forged ``.metadata`` or a non-tensor entry
that would run code on unpickling is refused with CheckpointError and
nothing runs; a genuine DCP checkpoint loads bitwise."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from jitckpt.errors import CheckpointError
from jitckpt.state.dcp_read import METADATA_FILE, MetadataUnpickler, read_metadata
from jitckpt.state.mesh import load_tensors, tensor_state


def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def dcp_checkpoint(directory: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = trained(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(tensor_state(model, optimizer), checkpoint_id=str(directory))
    return model, optimizer


def load_into_fresh(directory: Path) -> torch.nn.Module:
    model, optimizer = trained(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_tensors(model, optimizer, directory)
    return model


class RunsCode:
    """Unpickling this calls ``os.system``: it touches the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class TouchesThroughAllowedClass:
    """Reaches a method through an allowed class (``PosixPath.touch``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_genuine_dcp_checkpoint_loads_bitwise(tmp_path: Path) -> None:
    saved, _ = dcp_checkpoint(tmp_path)
    loaded = load_into_fresh(tmp_path)
    assert torch.equal(loaded.weight, saved.weight) and torch.equal(loaded.bias, saved.bias)


@pytest.mark.parametrize("forge", [RunsCode, TouchesThroughAllowedClass])
def test_forged_metadata_that_would_run_code_is_refused_and_nothing_runs(
    tmp_path: Path, forge: type
) -> None:
    checkpoint = tmp_path / "ckpt"
    dcp_checkpoint(checkpoint)
    marker = tmp_path / "marker"
    genuine = MetadataUnpickler(open(checkpoint / METADATA_FILE, "rb")).load()
    # The genuine metadata with one forged object inside it.
    genuine.planner_data = forge(marker)
    (checkpoint / METADATA_FILE).write_bytes(pickle.dumps(genuine))
    with pytest.raises(CheckpointError, match="restricted unpickler") as caught:
        load_into_fresh(checkpoint)
    assert str(checkpoint / METADATA_FILE) in str(caught.value)
    assert not marker.exists()
    # What DCP's own reader would have done with it: the proof the payload runs.
    pickle.loads((checkpoint / METADATA_FILE).read_bytes())
    assert marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    dcp_checkpoint(checkpoint)
    (tmp_path / "outside").write_bytes(bytes(1 << 16))
    metadata = MetadataUnpickler(open(checkpoint / METADATA_FILE, "rb")).load()
    for info in metadata.storage_data.values():
        info.relative_path = "../outside"
    (checkpoint / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="not an extent of a plain file"):
        read_metadata(checkpoint)


def test_a_fifo_in_place_of_the_metadata_is_refused_without_blocking(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    dcp_checkpoint(checkpoint)
    (checkpoint / METADATA_FILE).unlink()
    os.mkfifo(checkpoint / METADATA_FILE)
    with pytest.raises(CheckpointError, match="regular file"):
        read_metadata(checkpoint)


def test_a_non_tensor_entry_that_would_run_code_is_refused_and_nothing_runs(
    tmp_path: Path,
) -> None:
    checkpoint = tmp_path / "ckpt"
    dcp_checkpoint(checkpoint)
    marker = tmp_path / "marker"
    evil = pickle.dumps(RunsCode(marker))
    (checkpoint / "__evil.distcp").write_bytes(evil)
    metadata = MetadataUnpickler(open(checkpoint / METADATA_FILE, "rb")).load()
    for index, info in metadata.storage_data.items():
        if index.fqn.endswith(".lr"):  # a param_groups value: DCP stores it as bytes
            info.relative_path, info.offset, info.length = "__evil.distcp", 0, len(evil)
    (checkpoint / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_into_fresh(checkpoint)
    assert not marker.exists()
