"""The checkpoint payload format: a tensor archive without pickle.

A training state is a tree of dicts, lists and tuples whose leaves are
tensors and plain values. The archive stores it as::

    b"JITCKPT\\x01" | u64 header length | JSON header | padding | tensor bytes

The JSON header holds the tree with every tensor replaced by a reference to
its (dtype, shape, offset) in the data section. Why not ``torch.save``:

* Speed. A JIT save runs at the worst moment; writing each tensor's bytes
  straight into the file is one memory copy per byte, where torch.save
  first pickles into its own buffers (measured on this machine, 300 MB:
  torch.save 0.19-0.25 s, a plain write 0.09 s).
* Safety. Loading parses JSON and copies bytes: nothing in a checkpoint can
  run code, by construction rather than by a restricted unpickler.

Non-tensor leaves may be None, bool, int, float, str, bytes, numpy scalars
(stored as Python numbers) and numpy arrays (stored as tensors, returned as
arrays). Anything else is refused when the state is saved, with its path.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch

from jitckpt.errors import CheckpointError

MAGIC = b"JITCKPT\x01"
_LENGTH = struct.Struct("<Q")
_ALIGN = 64
# Largest header accepted on load: a guard against a garbled length field.
_MAX_HEADER = 1 << 28

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


@dataclass
class _Entry:
    tensor: torch.Tensor  # contiguous, on the CPU
    offset: int

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class Archive:
    """A state tree laid out for writing: the header bytes, then the tensors
    at their offsets. ``size`` is known before any byte is written, so a
    writer can report progress (and a crash test can stop it midway)."""

    def __init__(self, tree: Any, to_host: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._entries: list[_Entry] = []
        self._to_host = to_host or (lambda t: t.detach().cpu())
        self._end = 0
        encoded = self._encode(tree, "state")
        tensors = [
            {
                "dtype": str(e.tensor.dtype).removeprefix("torch."),
                "shape": list(e.tensor.shape),
                "offset": e.offset,
                "nbytes": e.nbytes,
            }
            for e in self._entries
        ]
        header = json.dumps({"tree": encoded, "tensors": tensors}, separators=(",", ":")).encode()
        start = len(MAGIC) + _LENGTH.size + len(header)
        self._data_start = -(-start // _ALIGN) * _ALIGN
        self._header = MAGIC + _LENGTH.pack(len(header)) + header
        self.size = self._data_start + self._end

    def _encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            return {"__tensor__": self._add(value, path)}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": self._add(torch.from_numpy(np.ascontiguousarray(value)), path)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, bytes):
            return {"__bytes__": base64.b64encode(value).decode()}
        if isinstance(value, dict):
            return {
                "__dict__": [
                    [self._encode(k, f"{path}.<key>"), self._encode(v, f"{path}.{k}")]
                    for k, v in value.items()
                ]
            }
        if isinstance(value, list):
            return [self._encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):  # torch.Size included
            return {"__tuple__": [self._encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        raise CheckpointError(
            f"cannot checkpoint {path}: values of type {type(value).__name__} are not supported "
            f"(tensors, numpy arrays, numbers, strings, bytes, None, and dicts/lists/tuples of "
            f"them are); return plain data from that state_dict()"
        )

    def _add(self, tensor: torch.Tensor, path: str) -> int:
        if str(tensor.dtype).removeprefix("torch.") not in _DTYPES:
            raise CheckpointError(f"cannot checkpoint {path}: unsupported dtype {tensor.dtype}")
        host = self._to_host(tensor).contiguous()
        entry = _Entry(host, self._end)
        self._entries.append(entry)
        self._end += -(-entry.nbytes // _ALIGN) * _ALIGN
        return len(self._entries) - 1

    def chunks(self) -> Any:
        """The archive's bytes, in order, as buffers (no copies)."""
        yield self._header
        position = len(self._header)
        for entry in self._entries:
            target = self._data_start + entry.offset
            if target > position:
                yield bytes(target - position)
            if entry.nbytes:
                yield _raw_bytes(entry.tensor)
            position = target + entry.nbytes
        if self.size > position:
            yield bytes(self.size - position)

    def write_to(self, handle: BinaryIO) -> None:
        for chunk in self.chunks():
            handle.write(chunk)

    def to_bytes(self) -> bytes:
        return bytes(self.to_bytearray())

    def to_bytearray(self) -> bytearray:
        """The archive in one buffer (to send it over the network)."""
        out = bytearray(self.size)
        position = 0
        for chunk in self.chunks():
            view = memoryview(chunk).cast("B")
            out[position : position + len(view)] = view
            position += len(view)
        return out


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def is_archive(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def load(data: bytearray | bytes, where: str) -> Any:
    """Decode an archive. The tensors are views of ``data`` (kept alive by
    them), so a caller that loads them into a model copies each byte once."""
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    view = memoryview(buffer)
    if not is_archive(view):
        raise CheckpointError(f"{where}: not a jitckpt archive (bad magic bytes)")
    prefix = len(MAGIC) + _LENGTH.size
    if len(view) < prefix:
        raise CheckpointError(f"{where}: archive truncated inside its header")
    (length,) = _LENGTH.unpack_from(view, len(MAGIC))
    if length > min(_MAX_HEADER, len(view) - prefix):
        raise CheckpointError(f"{where}: archive header length {length} is impossible (garbled)")
    try:
        header = json.loads(bytes(view[prefix : prefix + length]))
        tree, specs = header["tree"], header["tensors"]
        data_start = -(-(prefix + length) // _ALIGN) * _ALIGN
        tensors = [_tensor_at(buffer, data_start, spec, len(view)) for spec in specs]
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: archive header is garbled ({exc})") from None
    try:
        return _decode(tree, tensors)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{where}: archive tree is garbled ({exc})") from None


def _tensor_at(buffer: bytearray, data_start: int, spec: dict[str, Any], size: int) -> torch.Tensor:
    dtype = _DTYPES.get(spec["dtype"])
    if dtype is None:
        raise CheckpointError(f"unknown tensor dtype {spec['dtype']!r}")
    shape = [int(n) for n in spec["shape"]]
    if any(n < 0 for n in shape):
        # Two negative dimensions can multiply to the right byte count.
        raise CheckpointError(f"a tensor has a negative dimension {shape} (garbled header)")
    numel = int(np.prod(shape)) if shape else 1
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    start = data_start + int(spec["offset"])
    if nbytes != spec["nbytes"] or start < data_start or start + nbytes > size:
        raise CheckpointError("a tensor lies outside the archive (truncated or garbled)")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=start)
    return raw.view(dtype).reshape(shape)


def _decode(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if "__dict__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    raise ValueError(f"unknown node {sorted(value)[:3]}")
