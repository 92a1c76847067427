"""The pickle-free payload format (jitckpt.state.archive): what goes in
comes out bit for bit, what it cannot hold is refused with its path, and a
damaged archive is refused with CheckpointError instead of being misread."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from jitckpt.errors import CheckpointError
from jitckpt.state.archive import MAGIC, Archive, is_archive, load

_LENGTH = struct.Struct("<Q")


def nested_state() -> dict[Any, Any]:
    generator = torch.Generator().manual_seed(3)
    return {
        "model": {
            "w32": torch.randn(3, 5, generator=generator),
            "w64": torch.randn(4, generator=generator, dtype=torch.float64),
            "half": torch.randn(2, 3, generator=generator).half(),
            "bf16": torch.randn(7, generator=generator).bfloat16(),
            "mask": torch.tensor([True, False, True]),
            "count": torch.tensor(12345678901, dtype=torch.int64),  # 0-dim
            "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
            "u8": torch.arange(250, 256, dtype=torch.uint8),
            "cplx": torch.randn(2, generator=generator, dtype=torch.complex64),
            "empty": torch.empty(0, 4),
            "empty_bool": torch.empty(0, dtype=torch.bool),
            "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3, 5)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "fused": None}],
        },
        "numpy": np.arange(6, dtype=np.int32).reshape(2, 3),
        "np_scalars": [np.float64(2.5), np.int64(-3), np.bool_(True)],
        "blob": b"\x00\xff\x10 raw",
        "flags": (True, False, None),
        "text": "ünïcode",
        "big": 2**70,
        "inf": float("-inf"),
        (1, "tuple-key"): "tuple keys survive",
        7: "int keys survive",
    }


def assert_same(expected: Any, actual: Any, path: str = "state") -> None:
    """Equal in structure, types and bits (a tensor's dtype, shape and bytes)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), path
        assert torch.equal(
            actual.contiguous().view(-1).view(torch.uint8),
            expected.contiguous().view(-1).view(torch.uint8),
        ), path
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and actual.dtype == expected.dtype, path
        assert np.array_equal(actual, expected), path
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected.item()) and actual == expected.item(), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), path
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}[{i}]")
    else:
        assert type(actual) is type(expected) and actual == expected, path


def test_nested_state_round_trips_bit_for_bit() -> None:
    state = nested_state()
    archive = Archive(state)
    data = archive.to_bytes()
    assert len(data) == archive.size and is_archive(data)
    assert_same(state, load(data, "mem"))


def test_chunks_write_the_same_bytes_as_to_bytes() -> None:
    archive = Archive(nested_state())
    assert b"".join(bytes(memoryview(c).cast("B")) for c in archive.chunks()) == archive.to_bytes()


def test_nan_payload_bits_are_kept() -> None:
    # Bitwise, not numerically equal: a NaN with a payload and -0.0 survive.
    bits = torch.tensor([0x7FC00001, 0x80000000, 0xFFFFFFFF], dtype=torch.int64).to(torch.int32)
    floats = bits.view(torch.float32)
    loaded = load(Archive({"x": floats}).to_bytes(), "mem")["x"]
    assert torch.equal(loaded.view(torch.int32), bits)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"model": {"layer": Opaque()}}, "state.model.layer"),
        ({"extras": [1, {"when": {1, 2}}]}, "state.extras[1].when"),
        ({"sched": (0.1, object())}, "state.sched[1]"),
        ({"u16": torch.zeros(2, dtype=torch.uint16)}, "state.u16"),
    ],
)
def test_unsupported_values_are_refused_with_their_path(state: Any, path: str) -> None:
    with pytest.raises(CheckpointError, match=f"cannot checkpoint {re.escape(path)}:"):
        Archive(state)


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    return json.loads(data[start : start + length]), start + length


def _with_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The archive with its header edited and the data section kept in place."""
    header, end = _header(data)
    edit(header)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    data_start = -(-end // 64) * 64
    new_end = len(MAGIC) + _LENGTH.size + len(encoded)
    assert new_end <= data_start, "edit must not grow the header past the padding"
    return (
        MAGIC
        + _LENGTH.pack(len(encoded))
        + encoded
        + bytes(data_start - new_end)
        + data[data_start:]
    )


def small_archive() -> bytes:
    return Archive({"a": torch.arange(16, dtype=torch.float32), "b": torch.ones(4)}).to_bytes()


def test_header_editing_helper_keeps_a_valid_archive_valid() -> None:
    data = small_archive()
    same = _with_header(data, lambda header: None)
    assert torch.equal(load(same, "mem")["a"], torch.arange(16, dtype=torch.float32))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: d[:5], "bad magic"),
        (lambda d: b"", "bad magic"),
        (lambda d: b"PK\x03\x04" + d[4:], "bad magic"),
        (lambda d: d[: len(MAGIC) + 3], "truncated inside its header"),
        (lambda d: d[: len(MAGIC) + _LENGTH.size + 10], "impossible"),
        (lambda d: MAGIC + _LENGTH.pack(1 << 40) + d[len(MAGIC) + _LENGTH.size :], "impossible"),
        (lambda d: d[: len(d) - 64 - 8], "outside the archive"),  # cut into tensor "a"
        (
            lambda d: d[: len(MAGIC) + _LENGTH.size] + b"[" + d[len(MAGIC) + _LENGTH.size + 1 :],
            "garbled",
        ),
    ],
)
def test_damaged_archive_is_refused(damage: Callable[[bytes], bytes], reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason) as caught:
        load(damage(small_archive()), "/ckpt/state.pt")
    assert str(caught.value).startswith("/ckpt/state.pt:")


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["tensors"][0].update(offset=1 << 20),
        lambda h: h["tensors"][0].update(offset=-64),
        lambda h: h["tensors"][1].update(shape=[400]),
        lambda h: h["tensors"][0].update(nbytes=8),
        lambda h: h["tensors"][0].update(dtype="float8"),
        lambda h: h["tree"]["__dict__"][0][1].update(__tensor__=5),
        lambda h: h.pop("tensors"),
    ],
)
def test_header_pointing_outside_the_data_is_refused(edit: Callable[[dict], None]) -> None:
    with pytest.raises(CheckpointError):
        load(_with_header(small_archive(), edit), "mem")


def test_negative_dimension_in_header_is_refused_with_checkpoint_error() -> None:
    # -1 x -16 elements = 16 elements = the true byte count of tensor "a".
    damaged = _with_header(small_archive(), lambda h: h["tensors"][0].update(shape=[-1, -16]))
    with pytest.raises(CheckpointError):
        load(damaged, "mem")


def two_moments_archive() -> bytes:
    """Two equal-size buffers, like AdamW's exp_avg and exp_avg_sq."""
    return Archive({"exp_avg": torch.zeros(16), "exp_avg_sq": torch.ones(16)}).to_bytes()


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        # Overlapping extents: the second tensor pointed at the first's bytes.
        (lambda h: h["tensors"][1].update(offset=0), "offset 0 is not 64"),
        (lambda h: h["tensors"][0].update(offset=64), "offset 64 is not 0"),
        (lambda h: h["tensors"][0].update(offset=0.0), "not an integer"),
        (lambda h: h["tensors"][0].update(offset=True), "not an integer"),
        (lambda h: h["tensors"][0].update(nbytes="64"), "not an integer"),
        (lambda h: h["tensors"][0].update(shape=[16.0]), "non-negative integers"),
        (lambda h: h["tensors"][0].update(shape=[True, 16]), "non-negative integers"),
        (lambda h: h["tensors"][0].update(shape="16"), "non-negative integers"),
        (lambda h: h["tensors"][0].update(dtype=["float32"]), "unknown tensor dtype"),
        (lambda h: h["tensors"][0].update(extra=1), "dtype, shape, offset and nbytes"),
        (lambda h: h.update(more=1), "not {tree, tensors}"),
        (lambda h: h.update(tensors={}), "not a list"),
        (lambda h: h["tree"]["__dict__"][1][1].update(__tensor__=0), "twice"),
        (lambda h: h["tree"]["__dict__"][1][1].update(__tensor__=-1), "references tensor -1"),
        (lambda h: h["tree"]["__dict__"][1][1].update(__tensor__=True), "references tensor True"),
        (lambda h: h["tree"]["__dict__"][1][1].update(__tensor__=1.0), "references tensor 1.0"),
        (lambda h: h["tree"]["__dict__"][1].__setitem__(1, None), "never references"),
        (lambda h: h["tree"]["__dict__"][1][1].update(x=1), "never makes"),
        (lambda h: h["tree"]["__dict__"][1].append(3), r"not \[key, value\]"),
        (lambda h: h["tree"]["__dict__"].append([["k"], 1]), "key"),
        (lambda h: h["tree"]["__dict__"][1].__setitem__(1, {"__tuple__": "x"}), "not a list"),
        (lambda h: h["tree"]["__dict__"].append([{"__bytes__": "!!"}, 1]), "not base64"),
        (lambda h: h["tree"]["__dict__"].append([{"__bytes__": 3}, 1]), "not a string"),
    ],
)
def test_headers_the_writer_never_produces_are_refused(
    edit: Callable[[dict], None], reason: str
) -> None:
    with pytest.raises(CheckpointError, match=reason) as caught:
        load(_with_header(two_moments_archive(), edit), "/ckpt/state.pt")
    assert str(caught.value).startswith("/ckpt/state.pt:")


def test_loaded_tensors_never_share_memory() -> None:
    state = load(two_moments_archive(), "mem")
    state["exp_avg"].add_(1)
    assert torch.equal(state["exp_avg_sq"], torch.ones(16))


def test_padding_after_the_last_tensor_is_refused() -> None:
    with pytest.raises(CheckpointError, match="truncated or padded"):
        load(two_moments_archive() + bytes(64), "mem")


def test_a_bfloat16_numpy_array_is_refused_not_crashed() -> None:
    data = Archive({"a": torch.zeros(2, dtype=torch.bfloat16)}).to_bytes()
    forged = _with_header(
        data, lambda h: h["tree"]["__dict__"][0].__setitem__(1, {"__ndarray__": 0})
    )
    with pytest.raises(CheckpointError, match="bfloat16"):
        load(forged, "mem")


def test_a_deeply_nested_tree_is_refused() -> None:
    data = Archive({"a": 1}).to_bytes()
    header, end = _header(data)
    deep = "[" * 100_000 + "]" * 100_000
    encoded = json.dumps({"tree": None, "tensors": []}).replace("null", deep).encode()
    forged = MAGIC + _LENGTH.pack(len(encoded)) + encoded
    forged += bytes(-(-len(forged) // 64) * 64 - len(forged))
    with pytest.raises(CheckpointError, match="nested too deeply|not JSON"):
        load(forged, "mem")


def test_decode_says_which_loader_refused_a_payload() -> None:
    from jitckpt.state.training import decode

    with pytest.raises(CheckpointError, match="neither a jitckpt archive nor a readable"):
        decode(b"garbage that is no zip", "/ckpt/state.pt")
    import io
    import pickle

    buffer = io.BytesIO()
    torch.save({"model": {}, "step": 1, "evil": pickle.loads}, buffer)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        decode(buffer.getvalue(), "/ckpt/state.pt")
