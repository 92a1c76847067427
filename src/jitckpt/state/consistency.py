"""Whether a decoded payload agrees with its own manifest and with the
structure jitckpt writes, before anything of it is loaded.

The archive's checks (jitckpt.state.archive) make sure a payload decodes to
plain values and tensors; the manifest's (jitckpt.storage.manifest) that
every field has its type. What remains is agreement: the payload's step is
the manifest's, the model tensors it holds have the shapes and dtypes the
manifest's ``model_signature`` records, a DDP payload carries the model and
a sharded one does not, the optimizer state names the parameters of the
model it was saved with. A payload that disagrees is corrupt (or forged),
not foreign: :func:`check_payload` raises CheckpointError, the restorer
refuses it and takes the next candidate. Only a checkpoint that agrees with
itself and not with this job is a genuine mismatch (jitckpt.state.training
.check_signature, exit 78).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from jitckpt.errors import CheckpointError


def check_payload(
    payload: Mapping[str, Any],
    step: int,
    signature: Mapping[str, list[Any]],
    sharded: bool,
    where: str,
) -> None:
    """Raise CheckpointError naming ``where`` and what disagrees."""
    refuse = _refuser(where)

    saved_step = payload.get("step")
    if not isinstance(saved_step, int) or isinstance(saved_step, bool) or saved_step != step:
        raise refuse(f"the payload holds step {saved_step!r}, its manifest says {step}")
    model = payload.get("model")
    if sharded != (model is None):
        raise refuse(
            "the manifest's layout is "
            + ("sharded but the payload holds the model" if sharded else "DDP but no model")
        )
    if model is not None:
        if not isinstance(model, dict) or not all(
            isinstance(v, torch.Tensor) for v in model.values()
        ):
            raise refuse("the payload's model is not a map of names to tensors")
        held = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.items()}
        if held != {k: [list(v[0]), v[1]] for k, v in signature.items()}:
            differ = sorted(set(held) ^ set(signature)) or sorted(
                k for k in held if held[k] != list(signature[k])
            )
            raise refuse(
                f"the manifest's model signature disagrees with the payload's model "
                f"(first: {differ[0]!r})"
            )
    rng = payload.get("rng")
    if rng is not None and not (
        isinstance(rng, dict) and isinstance(rng.get("rank"), int) and "state" in rng
    ):
        raise refuse("the payload's RNG state is not a rank and a state")


def _refuser(where: str) -> Callable[[str], CheckpointError]:
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: {what}: the checkpoint is corrupt (or forged) and is refused; an older "
            f"one is used if one is valid"
        )

    return refuse


def check_optimizer(
    payload: Mapping[str, Any], optimizer: torch.optim.Optimizer, where: str
) -> None:
    """A DDP payload's optimizer state has the groups and parameters of the
    live optimizer, and each per-parameter tensor the shape of its parameter
    (or none, like AdamW's step). Called once the model signature was found
    to fit this model, so the live parameters have the saved shapes."""
    if payload.get("model") is None:
        return
    refuse = _refuser(where)
    saved = payload.get("optimizer")
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("state"), dict)
        and isinstance(saved.get("param_groups"), list)
        and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"]
        )
    ):
        raise refuse("the payload's optimizer state is not a state and param_groups")
    groups = saved["param_groups"]
    live = optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in live]:
        raise refuse("the payload's optimizer groups do not hold the model's parameters")
    shapes: dict[Any, torch.Size] = {}
    for group, live_group in zip(groups, live, strict=True):
        for pid, param in zip(group["params"], live_group["params"], strict=True):
            shapes[pid] = param.shape
    for pid, entry in saved["state"].items():
        if pid not in shapes or not isinstance(entry, dict):
            raise refuse(f"the payload's optimizer state names parameter {pid!r} it does not hold")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != shapes[pid]:
                raise refuse(
                    f"the payload's optimizer state {name!r} of parameter {pid!r} has shape "
                    f"{tuple(value.shape)}, its parameter {tuple(shapes[pid])}"
                )
