"""The launcher-worker contract (jitckpt.protocol): the control directory,
the store's key space, and that it stays importable without torch."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jitckpt import protocol
from jitckpt.protocol import ControlDir

SRC = Path(protocol.__file__).resolve().parents[1]


def test_pids_are_recorded_replaced_and_forgotten(tmp_path: Path) -> None:
    control = ControlDir(tmp_path)
    assert control.pids() == []  # before any worker wrote one
    control.record_pid(0, 1111)
    control.record_pid("spare-3", 3333)
    control.record_pid(1, 2222)
    assert sorted(control.pids()) == [1111, 2222, 3333]
    control.record_pid(1, 4444)  # rank 1 restarted
    assert sorted(control.pids()) == [1111, 3333, 4444]
    control.forget_pid("spare-3")
    control.forget_pid("spare-9")  # never recorded: not an error
    assert sorted(control.pids()) == [1111, 4444]


def test_run_dir_is_recorded_once_unless_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = ControlDir(tmp_path / "control")
    control.path.mkdir()
    assert control.run_dir() is None
    monkeypatch.chdir(tmp_path)
    control.record_run_dir(Path("first"), overwrite=False)
    assert control.run_dir() == str(
        tmp_path.resolve() / "first"
    )  # absolute: the agent has another cwd
    control.record_run_dir(Path("second"), overwrite=False)  # a later worker
    assert control.run_dir() == str(tmp_path.resolve() / "first")
    control.record_run_dir(tmp_path / "third", overwrite=True)  # rank 0
    assert control.run_dir() == str(tmp_path.resolve() / "third")


def test_saving_and_finished_marks_are_per_local_rank_and_cleared_together(
    tmp_path: Path,
) -> None:
    control = ControlDir(tmp_path)
    assert not control.is_saving(0)
    control.mark_saving(0)
    control.mark_saving("2")
    control.mark_finished(1)
    assert control.is_saving("0") and control.is_saving(2)
    assert not control.is_saving(1)
    assert control.finished("1") and not control.finished(0)
    control.clear_attempt_markers()
    assert not any(control.is_saving(r) or control.finished(r) for r in range(3))
    control.clear_attempt_markers()  # nothing to clear: not an error


def test_fatal_reports_are_collected_from_every_worker(tmp_path: Path) -> None:
    control = ControlDir(tmp_path)
    assert control.fatal_messages() == []
    control.report_fatal(1, "checkpoint does not fit the model")
    control.report_fatal("launcher", "run directory is a file")
    control.record_pid(0, 1)  # other files in the directory are not fatal reports
    control.mark_saving(0)
    assert sorted(control.fatal_messages()) == [
        "checkpoint does not fit the model",
        "run directory is a file",
    ]


def test_from_env_finds_the_launchers_directory_only_under_jitckpt_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(protocol.CONTROL_DIR_ENV, raising=False)
    assert ControlDir.from_env() is None
    monkeypatch.setenv(protocol.CONTROL_DIR_ENV, "")
    assert ControlDir.from_env() is None
    monkeypatch.setenv(protocol.CONTROL_DIR_ENV, str(tmp_path))
    control = ControlDir.from_env()
    assert control is not None and control.path == tmp_path
    control.report_fatal(0, "seen by the launcher")
    assert ControlDir(tmp_path).fatal_messages() == ["seen by the launcher"]


def test_key_spaces_of_rounds_attempts_and_generations_never_overlap() -> None:
    attempts = [
        protocol.attempt_prefix(round_, attempt)
        for round_, attempt in itertools.product([0, 1, 10, "na"], [0, 1, 10, 11])
    ]
    generations = [protocol.generation_prefix(a, g) for a in attempts for g in (1, 2, 12)]
    prefixes = attempts + generations
    assert len(set(prefixes)) == len(prefixes)
    for a, b in itertools.permutations(attempts, 2):
        # Keys are "<prefix>/<key>": no attempt's key space contains another's.
        assert not (b + "/").startswith(a + "/"), (a, b)
    for attempt in attempts:
        for generation in (1, 2, 12):
            assert protocol.generation_prefix(attempt, generation).startswith(attempt + "/")


def test_restart_count_and_role_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(protocol.RESTART_COUNT_ENV, raising=False)
    monkeypatch.delenv(protocol.ROLE_ENV, raising=False)
    assert protocol.restart_count() == 0 and protocol.role() == protocol.ROLE_WORKER
    monkeypatch.setenv(protocol.RESTART_COUNT_ENV, "3")
    monkeypatch.setenv(protocol.ROLE_ENV, protocol.ROLE_SPARE)
    assert protocol.restart_count() == 3 and protocol.role() == protocol.ROLE_SPARE


def first_importer(modules: list[str], of: str = "torch") -> str:
    """Import ``modules`` in order in a fresh interpreter; the first after
    which module ``of`` is loaded, or "none"."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"    if {of!r} in sys.modules:\n"
        "        print(name); break\n"
        "else:\n"
        "    print('none')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_protocol_imports_without_torch() -> None:
    assert first_importer(["jitckpt.protocol"]) == "none"


def test_import_probe_names_the_module_that_pulled_the_import_in() -> None:
    # jitckpt.protocol stands for torch here: json does not import it, errors does.
    assert first_importer(["json", "jitckpt.errors", "jitckpt.events"], of="jitckpt.protocol") == (
        "jitckpt.errors"
    )


def test_what_runs_before_torch_in_a_worker_imports_without_torch() -> None:
    modules = [
        "jitckpt.errors",
        "jitckpt.events",
        "jitckpt.inject",
        "jitckpt.tracker",
        "jitckpt.detect.signals",
        "jitckpt.detect.watchdog",
        "jitckpt.launch.bootstrap",
        "jitckpt.launch.warmclient",
    ]
    assert first_importer(modules) == "none"
