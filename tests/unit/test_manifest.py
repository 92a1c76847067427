"""The checkpoint manifest (jitckpt.storage.manifest): its JSON form, the
directory name it gives, and the refusal of anything this version did not
write, naming the file and the field."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jitckpt.errors import CheckpointError
from jitckpt.storage import MANIFEST, PAYLOAD, DirectoryStorage, FileEntry, Manifest
from jitckpt.storage.manifest import read_manifest

WHERE = "/runs/x/checkpoints/step-000000007-jit-a1-r2/manifest.json"


def full_manifest() -> Manifest:
    """A manifest with every field set to something other than its default."""
    return Manifest(
        kind="jit",
        step=7,
        world_size=4,
        writer_rank=2,
        attempt=1,
        layout={"type": "hsdp", "mesh_shape": [2, 2], "mesh_dim_names": ["replicate", "shard"]},
        model_signature={"fc.weight": [[3, 4], "float32"], "fc.bias": [[3], "float32"]},
        run_id="0123abcd",
        created=1700000000.25,
        torch_version="2.13.0",
        jitckpt_version="0.1.0",
        reason="hang",
        writer_ranks=[0, 1],
        files={
            PAYLOAD: FileEntry(123, crc32="0badcafe"),
            "__0_0.distcp": FileEntry(0, sha256="ab" * 32),
        },
    )


def valid_json() -> dict[str, Any]:
    return json.loads(full_manifest().to_bytes())


def test_manifest_round_trips_through_json_text() -> None:
    original = full_manifest()
    parsed = Manifest.from_json(json.loads(original.to_bytes().decode()), WHERE)
    assert parsed == original
    assert parsed.payload_checksum == "crc32:0badcafe"
    assert parsed.files["__0_0.distcp"].checksum == "sha256:" + "ab" * 32
    assert parsed.size == 123


def test_manifest_defaults_survive_a_round_trip() -> None:
    minimal = Manifest(kind="periodic", step=0, world_size=1)
    assert Manifest.from_json(json.loads(minimal.to_bytes()), WHERE) == minimal


def test_directory_name_names_step_kind_attempt_and_writer_and_sorts_by_step() -> None:
    manifest = Manifest(kind="periodic", step=42, world_size=8, writer_rank=5, attempt=3)
    assert manifest.name == "step-000000042-periodic-a3-r5"
    names = [Manifest(kind="jit", step=s, world_size=1).name for s in (10, 9, 100, 0)]
    assert sorted(names) == [
        Manifest(kind="jit", step=s, world_size=1).name for s in (0, 9, 10, 100)
    ]


def _named(name: str, garble: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    garble.__name__ = name  # the test id
    return garble


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return _named(f"no-{key}", lambda data: data.pop(key))


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return _named(f"{key}={value!r}", lambda data: data.__setitem__(key, value))


def _set_file(**entry: Any) -> Callable[[dict[str, Any]], None]:
    return _named(f"file={entry!r}", lambda data: data["files"].__setitem__(PAYLOAD, entry))


@pytest.mark.parametrize(
    ("garble", "named"),
    [
        (_drop("kind"), "'kind'"),
        (_drop("step"), "'step'"),
        (_drop("world_size"), "'world_size'"),
        (_drop("files"), "'files'"),
        (_drop("format"), "format=None"),
        (_set("format", "jitckpt/2"), "format='jitckpt/2'"),
        (_set("kind", 3), "'kind'"),
        (_set("step", "7"), "'step'"),
        (_set("step", -1), "'step'"),
        (_set("step", True), "'step'"),
        (_set("step", 7.0), "'step'"),
        (_set("world_size", 0), "'world_size'"),
        (_set("writer_rank", -2), "'writer_rank'"),
        (_set("attempt", False), "'attempt'"),
        (_set("writer_ranks", [0, "1"]), "'writer_ranks'"),
        (_set("writer_ranks", [0, True]), "'writer_ranks'"),
        (_set("writer_ranks", {"0": 1}), "'writer_ranks'"),
        (_set("layout", ["ddp"]), "'layout'"),
        (_set("run_id", 17), "'run_id'"),
        (_set("created", "yesterday"), "'created'"),
        (_set("files", [PAYLOAD]), "'files'"),
        (_set_file(size=123), repr(PAYLOAD)),
        (_set_file(size=-1, crc32="0badcafe"), repr(PAYLOAD)),
        (_set_file(size=True, crc32="0badcafe"), repr(PAYLOAD)),
        (_set_file(size="123", crc32="0badcafe"), repr(PAYLOAD)),
    ],
)
def test_garbled_manifest_is_refused_naming_file_and_field(
    garble: Callable[[dict[str, Any]], None], named: str
) -> None:
    data = valid_json()
    garble(data)
    with pytest.raises(CheckpointError) as caught:
        Manifest.from_json(data, WHERE)
    message = str(caught.value)
    assert message.startswith(WHERE + ":")
    assert named in message


@pytest.mark.parametrize("data", [None, [], "jitckpt/1", 7])
def test_manifest_that_is_not_an_object_is_refused(data: Any) -> None:
    with pytest.raises(CheckpointError, match="not a jitckpt/1 manifest"):
        Manifest.from_json(data, WHERE)


def test_read_manifest_refuses_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="manifest missing") as caught:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(caught.value)

    (tmp_path / MANIFEST).write_text('{"format": "jitckpt/1", "step": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(tmp_path)

    (tmp_path / MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_manifest_written_by_directory_storage_reads_back_with_the_same_fields(
    tmp_path: Path,
) -> None:
    written = full_manifest().replace(files={})
    payload = b"\x00\x01payload" * 50
    path = DirectoryStorage(tmp_path).write(written, payload)
    assert path.name == written.name
    read = read_manifest(path)
    assert read.replace(files={}) == written
    assert read.files == {PAYLOAD: FileEntry(len(payload), f"{zlib.crc32(payload):08x}")}
