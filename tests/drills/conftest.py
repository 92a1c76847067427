"""Failure-free reference runs shared by every drill file whose run has the
same configuration: each costs a launch (~10 s here), and the state a
failure-free run ends in does not depend on the recovery path, the log
interval or the periodic backstop."""

from __future__ import annotations

import pytest
from jobs import cnn_args, default_mode_example_args, example_args, jitckpt_run, show


@pytest.fixture(scope="session")
def example_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final digest of the failure-free example GPT run (4 ranks,
    deterministic, EXAMPLE_STEPS steps) that its drills must end equal to."""
    base = tmp_path_factory.mktemp("example-reference")
    launch = jitckpt_run(*example_args(base / "run", base / "digest"))
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == []
    return (base / "digest").read_text().strip()


@pytest.fixture(scope="session")
def default_mode_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The output of the failure-free example GPT run in the default
    (non-deterministic) mode, EXAMPLE_STEPS steps: default-mode drills
    compare their logged losses with it (jobs.assert_loss_continues)."""
    base = tmp_path_factory.mktemp("default-mode-reference")
    args = default_mode_example_args(base / "run", base / "digest")
    launch = jitckpt_run(*args)
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == []
    return launch.output


@pytest.fixture(scope="session")
def cnn_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final digest of the failure-free CNN run (4 ranks, deterministic,
    CNN_STEPS steps): BatchNorm statistics included."""
    base = tmp_path_factory.mktemp("cnn-reference")
    launch = jitckpt_run(*cnn_args(base / "run", base / "digest"))
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == []
    return (base / "digest").read_text().strip()
