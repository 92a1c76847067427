"""The command line's usage errors (jitckpt.cli, jitckpt.launch.launcher):
each bad flag is named, with the usage, before anything starts."""

from __future__ import annotations

import pytest

from jitckpt.cli import main


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("explode@step=3,rank=0", "unknown kind 'explode'"),
        ("kill@step=x,rank=0", "step='x'"),
        ("kill@step=3,rank=0,phase=lunch", "unknown phase 'lunch'"),
        ("kill@step=3,rank=0,color=red", "unknown key 'color'"),
        ("kill@step=3", "missing rank="),
        ("kill:step=3", "expected KIND@step=N,rank=R"),
    ],
)
def test_bad_inject_spec_is_a_usage_error(
    spec: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--inject", spec, "train.py"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: jitckpt run" in err and named in err, err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--spares", "-1"], "--spares must be 0 or more"),
        (["--term-grace", "0"], "--term-grace must be positive"),
        (["--recovery", "maybe"], "invalid choice: 'maybe'"),
    ],
)
def test_bad_launcher_flags_are_usage_errors(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", *flags, "train.py"])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_unknown_command_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "run [torchrun options]" in capsys.readouterr().out
    assert main([]) == 2
