"""Everything that reads a checkpoint directory refuses what the writer
never produces (jitckpt.storage.files, .manifest, .directory): a FIFO,
symlink, device or sparse giant in place of a file, file names that leave
the checkpoint directory, a manifest with a flipped bit; and the writer's
side of the same promise: a step saved twice is never absent, and pruning
counts only checkpoints that verify."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from jitckpt import storage
from jitckpt.errors import CheckpointError
from jitckpt.storage import MANIFEST, PAYLOAD, DirectoryStorage
from jitckpt.storage.manifest import CHECKSUM, own_checksum, read_manifest


def manifest(step: int, kind: str = "jit") -> storage.Manifest:
    return storage.Manifest(kind=kind, step=step, world_size=1)


def written(tmp_path: Path, step: int = 3, payload: bytes = b"payload" * 100) -> Path:
    return DirectoryStorage(tmp_path).write(manifest(step), payload)


def refusal(tmp_path: Path) -> str:
    (candidate,) = DirectoryStorage(tmp_path).candidates()
    if candidate.problem is not None:
        return candidate.problem
    with pytest.raises(CheckpointError) as caught:
        DirectoryStorage(tmp_path).read_verified(candidate)
    return str(caught.value)


def test_a_fifo_in_place_of_the_payload_is_refused_at_once(tmp_path: Path) -> None:
    path = written(tmp_path)
    (path / PAYLOAD).unlink()
    os.mkfifo(path / PAYLOAD)
    started = time.monotonic()
    assert "FIFO" in refusal(tmp_path) or "regular file" in refusal(tmp_path)
    store = DirectoryStorage(tmp_path)
    (candidate,) = store.candidates()
    for check in (store.check_sizes, store.verify_files):
        with pytest.raises(CheckpointError, match="regular file"):
            check(candidate)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("target", ["/dev/zero", "/etc/hostname"])
def test_a_symlink_in_place_of_the_payload_is_not_followed(tmp_path: Path, target: str) -> None:
    path = written(tmp_path)
    (path / PAYLOAD).unlink()
    (path / PAYLOAD).symlink_to(target)
    assert "regular file" in refusal(tmp_path)


def test_a_sparse_giant_payload_is_refused_by_its_size_before_any_read(tmp_path: Path) -> None:
    path = written(tmp_path)
    with open(path / PAYLOAD, "r+b") as handle:
        handle.truncate(64 << 30)  # 64 GB, no block allocated
    started = time.monotonic()
    assert "truncated or padded" in refusal(tmp_path)
    assert time.monotonic() - started < 2


def test_a_manifest_replaced_by_a_fifo_or_a_giant_is_refused(tmp_path: Path) -> None:
    path = written(tmp_path)
    (path / MANIFEST).unlink()
    os.mkfifo(path / MANIFEST)
    assert "regular file" in refusal(tmp_path)
    (path / MANIFEST).unlink()
    with open(path / MANIFEST, "wb") as handle:
        handle.truncate(1 << 40)
    assert "more than" in refusal(tmp_path)


def test_a_symlinked_checkpoint_directory_is_not_a_candidate(tmp_path: Path) -> None:
    elsewhere = written(tmp_path / "elsewhere")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / elsewhere.name).symlink_to(elsewhere)
    assert DirectoryStorage(tmp_path / "run").candidates() == []
    assert DirectoryStorage(tmp_path / "run").find(elsewhere.name) is None


def edit_manifest(path: Path, edit: object, *, recompute: bool) -> None:
    data = json.loads((path / MANIFEST).read_text())
    edit(data)  # type: ignore[operator]
    if recompute:
        data[CHECKSUM] = own_checksum(data)
    (path / MANIFEST).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name", ["../state.pt", "/dev/zero", "/etc/passwd", "..", ".", "", "a/b", "x\0y"]
)
def test_file_names_that_leave_the_checkpoint_directory_are_refused(
    tmp_path: Path, name: str
) -> None:
    path = written(tmp_path)
    edit_manifest(
        path,
        lambda d: d["files"].__setitem__(name, {"size": 0, "crc32": "00000000"}),
        recompute=True,
    )
    assert "not a plain name inside the checkpoint directory" in refusal(tmp_path)


def test_a_flipped_bit_anywhere_in_a_manifest_is_refused_by_its_checksum(
    tmp_path: Path,
) -> None:
    m = manifest(3).replace(model_signature={"w": [[64, 4], "float32"]})
    path = DirectoryStorage(tmp_path).write(m, b"p")
    text = (path / MANIFEST).read_bytes()
    position = text.index(b"64")
    (path / MANIFEST).write_bytes(text[:position] + b"66" + text[position + 2 :])
    with pytest.raises(CheckpointError, match="manifest checksum mismatch"):
        read_manifest(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_signature", {"w": [[64, "4"], "float32"]}),
        ("model_signature", {"w": [[64, -4], "float32"]}),
        ("model_signature", {"w": [[64, 4], 32]}),
        ("model_signature", {"w": "float32"}),
        ("model_signature", ["w"]),
        ("layout", {"type": 1}),
        ("layout", {"type": "fsdp", "mesh_shape": [2, True]}),
        ("layout", {"type": "hsdp", "mesh_shape": [2, 2], "mesh_dim_names": [1, 2]}),
        ("kind", "jot"),
        ("exact_buffers", "yes"),
        ("files", {PAYLOAD: {"size": 1, "crc32": "xyz"}}),
        ("files", {PAYLOAD: {"size": 1, "crc32": "00000000", "extra": 1}}),
    ],
)
def test_fields_of_the_wrong_type_are_refused_naming_the_field(
    tmp_path: Path, field: str, value: object
) -> None:
    path = written(tmp_path)
    edit_manifest(path, lambda d: d.__setitem__(field, value), recompute=True)
    problem = refusal(tmp_path)
    assert str(path / MANIFEST) in problem
    assert f"manifest field '{field}'" in problem


def test_saving_a_step_again_keeps_a_complete_copy_at_every_point(tmp_path: Path) -> None:
    store = DirectoryStorage(tmp_path)
    store.write(manifest(5), b"old copy")
    seen: list[list[bytes]] = []
    real_rename = os.rename

    def watching_rename(src: object, dst: object) -> None:
        seen.append([store.read_verified(c) for c in store.candidates()])
        real_rename(src, dst)  # type: ignore[arg-type]
        seen.append([store.read_verified(c) for c in store.candidates()])

    os.rename = watching_rename  # type: ignore[assignment]
    try:
        store.write(manifest(5), b"new copy")
    finally:
        os.rename = real_rename
    assert all(copies for copies in seen), seen
    assert [store.read_verified(c) for c in store.candidates()] == [b"new copy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [manifest(5).name]


def test_pruning_keeps_the_newest_steps_that_verify(tmp_path: Path) -> None:
    store = DirectoryStorage(tmp_path)
    for step in (1, 2, 3):
        store.write(manifest(step), b"payload of %d" % step)
    newest = tmp_path / manifest(3).name / PAYLOAD
    newest.write_bytes(b"payload of 9")  # same size, another checksum
    assert store.prune("jit", keep=2) == []  # step 3 does not verify: 2 and 1 are kept
    assert sorted(c.step for c in store.candidates()) == [1, 2, 3]
    (tmp_path / manifest(3).name / PAYLOAD).write_bytes(b"payload of 3")
    assert [p.name for p in store.prune("jit", keep=2)] == [manifest(1).name]


def test_pruning_reads_only_what_this_process_has_not_written_or_verified(
    tmp_path: Path,
) -> None:
    for step in (1, 2, 3):
        DirectoryStorage(tmp_path).write(manifest(step), b"payload of %d" % step)
    store = DirectoryStorage(tmp_path)  # another process: nothing known
    store.write(manifest(4), b"payload of 4")
    read: list[str] = []
    verify = store.verify_files

    def counting(candidate: storage.Candidate) -> None:
        read.append(candidate.name)
        verify(candidate)

    store.verify_files = counting  # type: ignore[method-assign]
    assert [p.name for p in store.prune("jit", keep=2)] == [manifest(2).name, manifest(1).name]
    assert read == [manifest(3).name]  # step 4 was written here
    read.clear()
    store.write(manifest(5), b"payload of 5")
    assert [p.name for p in store.prune("jit", keep=2)] == [manifest(3).name]
    assert read == []  # 5 written here, 4 too: nothing read again
