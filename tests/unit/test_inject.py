"""Fault SPEC parsing (jitckpt.inject)."""

from __future__ import annotations

import pytest

from jitckpt.errors import FaultSpecError
from jitckpt.inject import FaultSpec, parse_spec, parse_specs


def test_parse_spec_defaults_and_fields() -> None:
    assert parse_spec("kill@step=5,rank=2") == FaultSpec("kill", 5, 2, "forward")
    assert parse_spec(" term@rank=0,step=7,phase=optimizer ") == FaultSpec(
        "term", 7, 0, "optimizer"
    )
    assert [str(s) for s in parse_specs("kill@step=1,rank=0;raise@step=2,rank=1,phase=data")] == [
        "kill@step=1,rank=0,phase=forward",
        "raise@step=2,rank=1,phase=data",
    ]


@pytest.mark.parametrize(
    "bad",
    ["kill", "kill@", "kill@step=1,rank=0,step=2", "kill@step=-1,rank=0", "kill@step=1,rank=0,"],
)
def test_parse_spec_rejects(bad: str) -> None:
    with pytest.raises(FaultSpecError, match=repr(bad.strip())[1:-1].replace("[", r"\[")):
        parse_spec(bad)
