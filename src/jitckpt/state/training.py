"""What a training state is, and how to capture and restore it.

A state is the model (the module inside DDP, so checkpoints load into any
wrapper), the optimizer, and optionally an LR scheduler, a GradScaler, the
data position, RNG states and user extras: anything with
``state_dict()``/``load_state_dict()``. The data position and RNG are taken
at the step boundary (they move during the step); everything else is read
when the saver runs, while the step tracker holds the loop still.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from jitckpt.errors import CheckpointError, CheckpointMismatchError
from jitckpt.state import archive, rng
from jitckpt.state.archive import Archive

# How a refusal by torch.load(weights_only=True) is worded (the sharded
# reader, jitckpt.state.dcp_read, says it the same way; mesh looks for it).
SAFE_REFUSAL = "refused by the safe loader (weights_only)"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP (or a similar ``.module`` wrapper)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def model_signature(model: torch.nn.Module) -> dict[str, list[Any]]:
    """Name -> [shape, dtype] of every entry of the model's state dict."""
    return {
        name: [list(value.shape), str(value.dtype).removeprefix("torch.")]
        for name, value in unwrap(model).state_dict().items()
        if isinstance(value, torch.Tensor)
    }


def check_signature(saved: Mapping[str, list[Any]], model: torch.nn.Module, where: str) -> None:
    """Raise CheckpointMismatchError naming the first differences."""
    current = model_signature(model)
    problems = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            problems.append(f"'{name}' is in the checkpoint but not in the model")
        elif name not in saved:
            problems.append(f"'{name}' is in the model but not in the checkpoint")
        elif list(saved[name]) != list(current[name]):
            problems.append(
                f"'{name}' has shape {tuple(saved[name][0])} {saved[name][1]} in the checkpoint "
                f"but {tuple(current[name][0])} {current[name][1]} in the model"
            )
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise CheckpointMismatchError(
            f"checkpoint {where} does not fit this model: {shown}. Nothing was loaded or "
            f"overwritten. Resume with the model definition that wrote it, or start a new "
            f"run with a different --run-dir."
        )


@dataclass
class TrainingState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Stateful | None = None
    scaler: Stateful | None = None
    data: Stateful | None = None
    extras: dict[str, Stateful] = field(default_factory=dict)
    # The model buffers a capture of (step, rank) saves instead of the live
    # ones, if any (jitckpt.state.buffers.BufferSnapshots.for_step).
    saved_buffers: Callable[[int, int], Mapping[str, torch.Tensor] | None] | None = None

    def capture(
        self,
        step: int,
        rank: int,
        boundary: Mapping[str, Any],
        buffers: Mapping[str, torch.Tensor] | None = None,
    ) -> Archive:
        """The state of ``step`` (completed iterations), laid out for writing
        straight from the live tensors. ``boundary`` holds what was
        snapshotted at that step's boundary, ``buffers`` the model buffers
        to save instead of the live ones (default: ``saved_buffers``)."""
        if buffers is None and self.saved_buffers is not None:
            buffers = self.saved_buffers(step, rank)
        return Archive(self.tree(step, rank, boundary, buffers=buffers))

    def updated_by_optimizer(self) -> set[int]:
        """Storage addresses of the parameters and optimizer state: tensors
        that change only in optimizer.step(), so a copy of them may be taken
        while the next forward and backward run."""
        addresses = {p.untyped_storage().data_ptr() for p in unwrap(self.model).parameters()}
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    addresses.add(value.untyped_storage().data_ptr())
        return addresses

    def tree(
        self,
        step: int,
        rank: int,
        boundary: Mapping[str, Any],
        components: Mapping[str, Any] | None = None,
        *,
        tensors: bool = True,
        buffers: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """The state as nested containers of live tensors and plain values.
        ``components`` replaces the live model/optimizer/... part (a view
        taken earlier: jitckpt.checkpoint.gpu). ``tensors=False`` leaves out the model
        and optimizer (a sharded checkpoint stores them with
        torch.distributed.checkpoint). ``buffers`` replaces the model's
        buffers of those names (the step's snapshot: jitckpt.state.buffers)."""
        parts = dict(components if components is not None else self.components(tensors=tensors))
        if buffers and parts.get("model") is not None:
            parts["model"] = {**parts["model"], **buffers}
        return {
            "step": step,
            **parts,
            "data": boundary.get("data"),
            "rng": (
                {"rank": rank, "state": rng.to_checkpoint(boundary["rng"])}
                if boundary.get("rng")
                else None
            ),
        }

    def components(self, *, tensors: bool = True) -> dict[str, Any]:
        """The model, optimizer, scheduler, scaler and extras state dicts
        (model and optimizer None without ``tensors``)."""
        return {
            "model": unwrap(self.model).state_dict() if tensors else None,
            "optimizer": self.optimizer.state_dict() if tensors else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "extras": {name: obj.state_dict() for name, obj in self.extras.items()},
        }

    def restore(
        self, payload: Mapping[str, Any], where: str, *, tensors: bool = True, data: bool = True
    ) -> None:
        """Load a decoded payload. Checks everything that can be checked
        before the first component is touched. ``tensors=False``: the model
        and optimizer were loaded already (jitckpt.checkpoint.sharded);
        ``data=False``: the data position is left as it is."""
        self.check(payload, where)
        if tensors:
            unwrap(self.model).load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(payload["scaler"])
        if self.data is not None and data:
            self.data.load_state_dict(payload["data"])
        for name, obj in self.extras.items():
            obj.load_state_dict(payload["extras"][name])

    def check(self, payload: Mapping[str, Any], where: str) -> None:
        """Raise CheckpointMismatchError if ``payload`` lacks a component this
        state has, or its data position cannot be used here."""
        missing = [name for name in self.extras if name not in payload.get("extras", {})]
        if missing:
            raise CheckpointMismatchError(
                f"checkpoint {where} has no state for extras {missing}; it was written by a "
                f"script that registered {sorted(payload.get('extras', {}))}."
            )
        for name, component in (
            ("scheduler", self.scheduler),
            ("scaler", self.scaler),
            ("data", self.data),
        ):
            if component is not None and payload.get(name) is None:
                raise CheckpointMismatchError(
                    f"checkpoint {where} has no {name} state but this script registers one; "
                    f"pass the same components to JitCheckpoint as the run that wrote it."
                )
        if self.data is not None and hasattr(self.data, "check"):
            self.data.check(payload["data"], where)


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def clone_tensors(
    value: Any,
    only: Callable[[torch.Tensor], bool] = lambda _t: True,
    copy: Callable[[torch.Tensor], torch.Tensor] = _clone,
) -> Any:
    """A copy of a state tree with the tensors selected by ``only`` copied
    by ``copy`` (the others shared), visited in a fixed order."""
    if isinstance(value, torch.Tensor):
        return copy(value) if only(value) else value
    if isinstance(value, dict):
        return {key: clone_tensors(item, only, copy) for key, item in value.items()}
    if isinstance(value, list):
        return [clone_tensors(item, only, copy) for item in value]
    if isinstance(value, tuple):
        return tuple(clone_tensors(item, only, copy) for item in value)
    return value


def decode(data: bytes | bytearray, where: str) -> dict[str, Any]:
    """Decode a payload without running any code from it: a jitckpt archive
    is JSON plus raw tensor bytes; a torch.save payload (written by other
    tools or copied in) goes through weights_only loading, which refuses
    every object other than tensors and plain containers. Every failure is
    a CheckpointError that says which of the two refused it and why."""
    if archive.is_archive(data):
        try:
            payload = archive.load(data, where)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a hole in the archive's checks
            raise CheckpointError(
                f"{where}: the jitckpt archive could not be decoded "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from None
    else:
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any decoding failure means "unusable"
            # A zip (torch.save) or pickle stream that weights_only's unpickler
            # stopped was refused by it; anything else was never a torch.save file.
            looks_saved = bytes(data[:4]) == b"PK\x03\x04" or bytes(data[:1]) == b"\x80"
            if isinstance(exc, pickle.UnpicklingError) and looks_saved:
                raise CheckpointError(f"{where}: {SAFE_REFUSAL}: {_telling_line(exc)}") from None
            raise CheckpointError(
                f"{where}: neither a jitckpt archive nor a readable torch.save file "
                f"({type(exc).__name__}: {_telling_line(exc)})"
            ) from None
    if not isinstance(payload, dict) or "model" not in payload or "step" not in payload:
        raise CheckpointError(f"{where}: not a jitckpt training state")
    return payload


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _telling_line(exc: BaseException) -> str:
    """The line of torch.load's long message that says what it refused."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()
    return first_line(exc)
