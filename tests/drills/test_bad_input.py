"""Bad input gets a clear error that names the problem, and nothing is lost
or overwritten."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jobs import TINY, jitckpt_run, run_tagged, show

from jitckpt.protocol import EXIT_FATAL
from jitckpt.storage import MANIFEST, PAYLOAD, checkpoints_dir
from jitckpt.storage.manifest import CHECKSUM, own_checksum


def tiny(run_dir: Path, *args: str):  # type: ignore[no-untyped-def]
    return run_tagged([sys.executable, str(TINY), "--run-dir", str(run_dir), *args], timeout=120)


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def two_checkpoints_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding valid checkpoints of steps 2 and 4, made once
    for the module (each test damages its own copy)."""
    run_dir = tmp_path_factory.mktemp("two-checkpoints") / "run"
    launch = tiny(run_dir, "--steps", "5", "--save-at", "2", "--save-at", "4")
    assert launch.returncode == 0, show(launch)
    assert len(list(checkpoints_dir(run_dir).iterdir())) == 2
    return run_dir


@pytest.fixture
def two_checkpoints(two_checkpoints_template: Path, tmp_path: Path) -> Path:
    """This test's own copy of the run directory (run id included)."""
    return Path(shutil.copytree(two_checkpoints_template, tmp_path / "run"))


def newest_payload(run_dir: Path) -> Path:
    return sorted(checkpoints_dir(run_dir).glob("step-*"))[-1] / PAYLOAD


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_refused_and_previous_used(
    two_checkpoints: Path, damage: str
) -> None:
    payload = newest_payload(two_checkpoints)
    data = bytearray(payload.read_bytes())
    if damage == "truncate":
        payload.write_bytes(bytes(data[: len(data) // 2]))
        reason = "truncated"
    else:
        data[len(data) // 2] ^= 0x01
        payload.write_bytes(bytes(data))
        reason = "checksum mismatch"
    launch = tiny(two_checkpoints, "--steps", "6")
    assert launch.returncode == 0, show(launch)
    assert f"refusing checkpoint {payload.parent}" in launch.output
    assert str(payload) in launch.output and reason in launch.output, show(launch)
    assert launch.resumed_steps() == [2], "fell back to the previous valid checkpoint"


def test_shape_mismatch_is_a_clear_error_and_nothing_is_overwritten(two_checkpoints: Path) -> None:
    before = tree_hashes(checkpoints_dir(two_checkpoints))
    launch = tiny(two_checkpoints, "--steps", "6", "--width", "32")
    assert launch.returncode == EXIT_FATAL, show(launch)
    assert "does not fit this model" in launch.output
    assert "'0.weight' has shape (16, 8)" in launch.output and "(32, 8)" in launch.output, show(
        launch
    )
    assert "start_step" not in launch.output, "training must not start"
    assert tree_hashes(checkpoints_dir(two_checkpoints)) == before


def test_shape_mismatch_under_launcher_stops_restarts(two_checkpoints: Path) -> None:
    before = tree_hashes(checkpoints_dir(two_checkpoints))
    # The single-rank checkpoints don't fit 2 ranks either; the shape is
    # checked first, so the message is about the model.
    launch = jitckpt_run(str(TINY), "--run-dir", str(two_checkpoints), "--width", "32", nproc=2)
    assert launch.returncode == EXIT_FATAL, show(launch)
    assert "jitckpt: not restarting" in launch.output and "does not fit this model" in launch.output
    assert tree_hashes(checkpoints_dir(two_checkpoints)) == before


def test_bad_inject_spec_is_a_usage_error_and_nothing_starts(tmp_path: Path) -> None:
    """The command's exit status (2) and message; every kind of bad SPEC is
    named in tests/unit/test_cli.py."""
    launch = jitckpt_run(
        "--inject", "explode@step=3,rank=0", str(TINY), "--run-dir", str(tmp_path / "run"),
        nproc=1, timeout=60,
    )  # fmt: skip
    assert launch.returncode == 2, show(launch)
    assert "usage: jitckpt run" in launch.output and "unknown kind 'explode'" in launch.output
    assert not (tmp_path / "run").exists(), "nothing may start"


def test_run_dir_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("keep me")
    launch = tiny(not_a_dir)
    assert launch.returncode == EXIT_FATAL, show(launch)
    assert f"run directory {not_a_dir} exists and is not a directory" in launch.output
    assert "start_step" not in launch.output
    assert not_a_dir.read_text() == "keep me"


def test_unwritable_run_dir_is_refused_before_training(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/sys")  # root ignores permission bits; sysfs refuses new files
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    launch = tiny(target)
    assert launch.returncode == EXIT_FATAL, show(launch)
    assert f"run directory {target} is not writable" in launch.output, show(launch)
    assert "start_step" not in launch.output


class _Payload:
    """Pickles into a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


def test_checkpoint_that_would_run_code_is_refused(two_checkpoints: Path, tmp_path: Path) -> None:
    import io
    import json

    import torch

    marker = tmp_path / "pwned"
    payload = newest_payload(two_checkpoints)
    buffer = io.BytesIO()
    torch.save({"step": 4, "model": _Payload(f"touch {marker}")}, buffer)
    evil = buffer.getvalue()
    payload.write_bytes(evil)
    # A forger can also fix the manifest: the checksum does not save us, the loader must.
    manifest_path = payload.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][PAYLOAD] = {"size": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    manifest[CHECKSUM] = own_checksum(manifest)  # the manifest's own checksum, forged too
    manifest_path.write_text(json.dumps(manifest))
    launch = tiny(two_checkpoints, "--steps", "6")
    assert launch.returncode == 0, show(launch)
    assert not marker.exists(), "code in a checkpoint ran"
    assert f"refusing checkpoint {payload.parent}" in launch.output
    assert "refused by the safe loader (weights_only)" in launch.output, show(launch)
    assert launch.resumed_steps() == [2]


def test_leaving_the_loop_early_is_not_a_failure(tmp_path: Path) -> None:
    """`break` out of ckpt.steps() then work longer than the hang timeout:
    no hang is declared and the script ends normally."""
    from jitckpt.events import read_events

    launch = jitckpt_run(
        str(TINY), "--run-dir", str(tmp_path / "run"), "--steps", "40", "--break-at", "20", "--sleep-after", "4",
        nproc=2,
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    events = read_events(tmp_path / "run")
    assert not [e for e in events if e["event"] == "detect"], "no failure after the loop"
    assert {e["step"] for e in events if e["event"] == "loop_left"} == {20}


def test_checkpoint_from_another_run_is_refused(two_checkpoints: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    launch = tiny(other, "--steps", "7", "--save-at", "6")
    assert launch.returncode == 0, show(launch)
    foreign = sorted(checkpoints_dir(other).glob("step-*"))[-1]
    copied = checkpoints_dir(two_checkpoints) / foreign.name
    shutil.copytree(foreign, copied)
    launch = tiny(two_checkpoints, "--steps", "8")
    assert launch.returncode == 0, show(launch)
    assert f"refusing checkpoint {copied}: written by another run" in launch.output, show(launch)
    assert launch.resumed_steps() == [4], "resumed from this run's own newest checkpoint"
    assert copied.is_dir(), "the foreign checkpoint is left where it is"


def test_garbled_archive_is_refused_and_previous_used(two_checkpoints: Path) -> None:
    """A payload whose archive header lies (a tensor beyond the end of the
    file), with a manifest fixed up to match: refused by the decoder."""
    import json
    import struct
    import zlib

    payload = newest_payload(two_checkpoints)
    data = payload.read_bytes()
    (length,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + length])
    last = header["tensors"][-1]
    last["offset"] = int("9" * len(str(last["offset"])))  # same length, past the end
    forged = json.dumps(header, separators=(",", ":")).encode()
    assert len(forged) <= length
    data = data[:16] + forged.ljust(length) + data[16 + length :]
    payload.write_bytes(data)
    manifest_path = payload.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][PAYLOAD] = {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    manifest[CHECKSUM] = own_checksum(manifest)
    manifest_path.write_text(json.dumps(manifest))
    launch = tiny(two_checkpoints, "--steps", "6")
    assert launch.returncode == 0, show(launch)
    assert "where the writer puts it" in launch.output, show(launch)
    assert launch.resumed_steps() == [2]


def forged_copy(run_dir: Path, step: int, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the step-4 checkpoint under the name of ``step``, its
    manifest edited and its own checksum recomputed (only the typed checks
    stand in the way)."""
    source = sorted(checkpoints_dir(run_dir).glob("step-000000004-*"))[0]
    target = source.with_name(source.name.replace("step-000000004", f"step-{step:09d}"))
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["step"] = step
    edit(manifest)
    manifest[CHECKSUM] = own_checksum(manifest)
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def test_malformed_newer_checkpoints_are_refused_and_the_job_trains_on(
    two_checkpoints: Path, tmp_path: Path
) -> None:
    """One launch over five malformed checkpoints newer than a valid one (a
    FIFO payload, a 64 GB sparse payload, two manifests with fields of the
    wrong type, a flipped bit in a model signature): each is refused with its
    reason, within seconds, and training goes on from step 2. A second
    launch with no valid checkpoint left trains from scratch."""
    spare = Path(shutil.copytree(two_checkpoints, tmp_path / "spare"))
    fifo = forged_copy(two_checkpoints, 8, lambda m: None)
    (fifo / PAYLOAD).unlink()
    os.mkfifo(fifo / PAYLOAD)
    sparse = forged_copy(two_checkpoints, 7, lambda m: None)
    with open(sparse / PAYLOAD, "r+b") as handle:
        handle.truncate(64 << 30)
    world = forged_copy(two_checkpoints, 6, lambda m: m.__setitem__("world_size", [2]))
    signature = forged_copy(
        two_checkpoints, 5, lambda m: m["model_signature"].__setitem__("0.weight", "float32")
    )
    flipped = sorted(checkpoints_dir(two_checkpoints).glob("step-000000004-*"))[0]
    manifest = json.loads((flipped / MANIFEST).read_text())
    manifest["model_signature"]["0.weight"][0][0] ^= 2  # 16 -> 18: one flipped bit
    (flipped / MANIFEST).write_text(json.dumps(manifest))  # its own checksum left stale

    launch = tiny(two_checkpoints, "--steps", "6")
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == [2], show(launch)
    for path, reason in [
        (fifo, "not a regular file (a FIFO)"),
        (sparse, "68719476736 bytes, manifest says"),
        (world, "manifest field 'world_size' is [2], not an integer >= 1"),
        (signature, "manifest field 'model_signature' is {'0.weight': 'float32'}"),
        (flipped, "manifest checksum mismatch"),
    ]:
        assert f"refusing checkpoint {path}: " in launch.output, show(launch)
        assert reason in launch.output, (reason, show(launch))
    assert launch.seconds < 60, f"took {launch.seconds:.1f} s"

    stale = sorted(checkpoints_dir(spare).glob("step-*"))
    for path in stale:
        (path / PAYLOAD).unlink()
        os.mkfifo(path / PAYLOAD)
    fresh = tiny(spare, "--steps", "3")
    assert fresh.returncode == 0, show(fresh)
    assert fresh.resumed_steps() == [], "no valid checkpoint: trained from scratch"
    for path in stale:
        assert f"refusing checkpoint {path}: " in fresh.output, show(fresh)
