"""A training state (jitckpt.state.training): the model signature check,
capture -> bytes -> decode -> restore, the safe decoder, and the checks that
refuse a payload before anything is loaded."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import torch
from torch import nn

from jitckpt.errors import CheckpointError, CheckpointMismatchError
from jitckpt.state import rng
from jitckpt.state.archive import Archive
from jitckpt.state.training import TrainingState, check_signature, decode, model_signature


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


class Wrapper(nn.Module):
    """Stands for DDP: the user's model at ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class Counter:
    """A user extra with state_dict()/load_state_dict()."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def components(seed: int, lr: float) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, i: int) -> None:
    inputs = torch.randn(16, 4, generator=torch.Generator().manual_seed(100 + i))
    loss = model(inputs).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def assert_bitwise(expected: Any, actual: Any, path: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        assert torch.equal(
            actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)
        ), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(map(str, actual)) == sorted(
            map(str, expected)
        ), path
        for key in expected:
            assert_bitwise(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_bitwise(e, a, f"{path}[{i}]")
    else:
        assert actual == expected, path


# -- the model signature ----------------------------------------------------------------
def test_signature_lists_every_state_dict_tensor_and_sees_through_a_wrapper() -> None:
    model = make_model(0)
    signature = model_signature(model)
    assert set(signature) == set(model.state_dict())
    assert signature["1.num_batches_tracked"] == [[], "int64"]
    assert signature["0.weight"] == [[8, 4], "float32"]
    assert model_signature(Wrapper(model)) == signature


def test_signature_read_back_from_json_fits_the_same_model() -> None:
    model = make_model(0)
    saved = json.loads(json.dumps(model_signature(model)))
    check_signature(saved, Wrapper(make_model(1)), "ckpt-a")  # different values, same shapes


def test_changed_shape_is_refused_naming_the_parameter_and_both_shapes() -> None:
    saved = model_signature(nn.Linear(4, 3))
    with pytest.raises(CheckpointMismatchError) as caught:
        check_signature(saved, nn.Linear(4, 5), "ckpt-b")
    message = str(caught.value)
    assert "checkpoint ckpt-b" in message
    assert "'weight' has shape (3, 4) float32 in the checkpoint but (5, 4) float32" in message
    assert "'bias' has shape (3,) float32 in the checkpoint but (5,) float32" in message


def test_changed_dtype_is_refused() -> None:
    saved = model_signature(nn.Linear(4, 3))
    with pytest.raises(CheckpointMismatchError, match="float32 in the checkpoint but .* float64"):
        check_signature(saved, nn.Linear(4, 3).double(), "ckpt")


def test_a_single_difference_is_enough_to_refuse() -> None:
    saved = model_signature(make_model(0))
    saved["1.running_var"] = [[8], "float16"]
    with pytest.raises(
        CheckpointMismatchError,
        match=r"^checkpoint ckpt does not fit this model: "
        r"'1\.running_var' has shape \(8,\) float16 in the checkpoint but "
        r"\(8,\) float32 in the model\. Nothing was loaded",
    ):
        check_signature(saved, make_model(0), "ckpt")


def test_missing_and_extra_entries_are_named() -> None:
    saved = model_signature(nn.Linear(4, 3))
    del saved["bias"]
    saved["adapter.weight"] = [[2, 2], "float32"]
    with pytest.raises(CheckpointMismatchError) as caught:
        check_signature(saved, nn.Linear(4, 3), "ckpt")
    message = str(caught.value)
    assert "'adapter.weight' is in the checkpoint but not in the model" in message
    assert "'bias' is in the model but not in the checkpoint" in message
    assert "'weight'" not in message


def test_many_differences_are_summarised() -> None:
    with pytest.raises(CheckpointMismatchError, match=r"; and 6 more\."):
        check_signature({}, make_model(0), "ckpt")  # 9 entries, 3 shown


# -- capture, decode, restore -------------------------------------------------------------
def test_capture_decode_restore_gives_bitwise_equal_state_that_trains_on_identically() -> None:
    model, optimizer, scheduler = components(seed=0, lr=0.05)
    extra = Counter(41)
    for i in range(3):
        train_step(model, optimizer, scheduler, i)
    state = TrainingState(Wrapper(model), optimizer, scheduler, extras={"counter": extra})
    data = state.capture(3, rank=0, boundary={"rng": rng.capture()}).to_bytes()

    payload = decode(data, "ckpt/state.pt")
    assert payload["step"] == 3 and payload["rng"]["rank"] == 0
    fresh_model, fresh_optimizer, fresh_scheduler = components(seed=1, lr=0.9)
    fresh_extra = Counter()
    TrainingState(
        fresh_model, fresh_optimizer, fresh_scheduler, extras={"counter": fresh_extra}
    ).restore(payload, "ckpt")
    del payload, data  # the restored state must not depend on the payload's buffer staying

    assert_bitwise(model.state_dict(), fresh_model.state_dict())
    assert_bitwise(optimizer.state_dict(), fresh_optimizer.state_dict())
    assert scheduler.state_dict() == fresh_scheduler.state_dict()
    assert fresh_extra.value == 41

    for i in range(3, 5):
        train_step(model, optimizer, scheduler, i)
        train_step(fresh_model, fresh_optimizer, fresh_scheduler, i)
    assert_bitwise(model.state_dict(), fresh_model.state_dict())
    assert_bitwise(optimizer.state_dict(), fresh_optimizer.state_dict())


def test_decode_accepts_a_plain_torch_save_training_state() -> None:
    model = make_model(0)
    buffer = io.BytesIO()
    torch.save({"step": 5, "model": model.state_dict(), "optimizer": None}, buffer)
    payload = decode(buffer.getvalue(), "other-tool.pt")
    assert payload["step"] == 5
    assert_bitwise(model.state_dict(), payload["model"])


class Gadget:
    """Not a tensor or plain container: weights_only loading must refuse it."""

    def __reduce__(self) -> Any:
        return (print, ("code ran while loading a checkpoint",))


def test_decode_refuses_a_torch_save_payload_holding_an_object(
    capsys: pytest.CaptureFixture[str],
) -> None:
    buffer = io.BytesIO()
    torch.save({"step": 1, "model": {}, "hook": Gadget()}, buffer)
    with pytest.raises(CheckpointError, match=r"^evil\.pt: refused by the safe loader"):
        decode(buffer.getvalue(), "evil.pt")
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "data",
    [
        Archive({"step": 1, "optimizer": {}}).to_bytes(),  # no model
        Archive([1, 2, 3]).to_bytes(),
        Archive({"model": {}}).to_bytes(),  # no step
    ],
)
def test_decode_refuses_an_archive_that_is_not_a_training_state(data: bytes) -> None:
    with pytest.raises(CheckpointError, match="not a jitckpt training state"):
        decode(data, "x.pt")


def test_decode_refuses_a_torch_save_that_is_not_a_training_state_and_garbage() -> None:
    buffer = io.BytesIO()
    torch.save({"weights": torch.ones(2)}, buffer)
    with pytest.raises(CheckpointError, match="not a jitckpt training state"):
        decode(buffer.getvalue(), "x.pt")
    with pytest.raises(CheckpointError, match=r"^junk\.pt: "):
        decode(b"\x00" * 64, "junk.pt")


# -- refusals before anything is loaded ------------------------------------------------------
def saved_payload(**overrides: Any) -> dict[str, Any]:
    model, optimizer, scheduler = components(seed=0, lr=0.05)
    payload = TrainingState(model, optimizer, scheduler, extras={"counter": Counter(1)}).tree(
        2, 0, {}
    )
    payload.update(overrides)
    return payload


def test_missing_extras_are_refused_and_nothing_is_loaded() -> None:
    model, optimizer, scheduler = components(seed=7, lr=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = TrainingState(
        model, optimizer, scheduler, extras={"counter": Counter(), "ema": Counter()}
    )
    with pytest.raises(CheckpointMismatchError, match=r"no state for extras \['ema'\]") as caught:
        state.restore(saved_payload(), "ckpt-c")
    assert "registered ['counter']" in str(caught.value)
    assert_bitwise(before, model.state_dict())


@pytest.mark.parametrize("component", ["scheduler", "scaler"])
def test_missing_component_state_is_refused(component: str) -> None:
    model, optimizer, scheduler = components(seed=0, lr=0.05)
    registered = {"scheduler": scheduler, "scaler": Counter()}
    state = TrainingState(
        model, optimizer, extras={"counter": Counter()}, **{component: registered[component]}
    )
    with pytest.raises(CheckpointMismatchError, match=f"has no {component} state"):
        state.check(saved_payload(**{component: None}), "ckpt")
