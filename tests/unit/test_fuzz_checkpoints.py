"""Fuzzing what reads a checkpoint: hundreds of generated mutations of real
checkpoints (written by jitckpt's own writer for a small model with AdamW)
go through the restore a restarted rank runs. The payload's bytes flipped,
cut or extended, its archive header edited; manifest fields changed in type
and value or dropped, bits flipped in its text, file names that leave the
directory; files replaced by a FIFO, a symlink (to /dev/zero or out of the
run directory), a directory or a sparse 64 GB file; each with the checksums
left stale and recomputed. Every case must end in one of two ways:

* refused with a named reason, and the previous checkpoint (step 3) loaded
  exactly, as the restore ranking chooses it;
* the mutated checkpoint (step 4) loaded exactly: the model and optimizer
  hold bit for bit what the mutated file holds.

Nothing may raise another exception, hang (a per-case timer), allocate more
than the files' real size (tracemalloc's peak, bounded), or open a file
outside the run directory (an audit hook watches every open). The counts
are printed (``pytest -s``) and in the test's report section.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shutil
import signal
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from forgery import reseal
from test_restorer import rank_context, restore, save_at, tiny_model

from jitckpt import storage
from jitckpt.errors import CheckpointError
from jitckpt.events import read_events
from jitckpt.state.archive import _LENGTH, MAGIC
from jitckpt.state.training import decode
from jitckpt.storage import MANIFEST, PAYLOAD

CASES = 260
CASE_TIMEOUT_S = 10.0
SEED = 16

Mutation = Callable[[Path, random.Random], str]  # edits checkpoint dir, returns its name


# -- the mutations ---------------------------------------------------------------------
def _payload(path: Path) -> bytes:
    return (path / PAYLOAD).read_bytes()


def _header_span(data: bytes) -> tuple[int, int]:
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    return start, start + length


def flip_bits(path: Path, rnd: random.Random, recompute: bool) -> str:
    data = bytearray(_payload(path))
    start, end = _header_span(bytes(data))
    where = rnd.choice(["magic", "length", "header", "data"])
    lo, hi = {"magic": (0, 8), "length": (8, 16), "header": (start, end), "data": (end, len(data))}[
        where
    ]
    for _ in range(rnd.choice([1, 1, 2, 8])):
        data[rnd.randrange(lo, hi)] ^= 1 << rnd.randrange(8)
    reseal(path, bytes(data), recompute=recompute)
    return f"payload bits flipped in the {where}"


def truncate(path: Path, rnd: random.Random, recompute: bool) -> str:
    data = _payload(path)
    reseal(path, data[: rnd.randrange(0, len(data))], recompute=recompute)
    return "payload truncated"


def extend(path: Path, rnd: random.Random, recompute: bool) -> str:
    extra = rnd.choice([b"\0" * 64, rnd.randbytes(rnd.randrange(1, 300)), _payload(path)[:64]])
    reseal(path, _payload(path) + extra, recompute=recompute)
    return "payload extended"


_ODD_VALUES: list[Any] = [
    -1,
    -64,
    0,
    1,
    64,
    True,
    False,
    1.5,
    2.0,
    None,
    "x",
    "7",
    [],
    [1],
    [-1, -16],
    {},
    {"a": 1},
    1 << 62,
    -(1 << 62),
    float("nan"),
]


def edit_header(path: Path, rnd: random.Random, recompute: bool) -> str:
    """A field of the archive's JSON header set to an odd value (the header
    rewritten, the data section kept in place: a forger's edit)."""
    data = _payload(path)
    start, end = _header_span(data)
    header = json.loads(data[start:end])
    spec = rnd.choice(header["tensors"])
    choice = rnd.randrange(4)
    if choice == 0:
        key = rnd.choice(["dtype", "shape", "offset", "nbytes"])
        spec[key] = rnd.choice(_ODD_VALUES)
        what = f"header tensor {key}"
    elif choice == 1:  # overlap: one tensor pointed at another's bytes
        other = rnd.choice(header["tensors"])
        spec["offset"] = other["offset"]
        what = "header tensors overlapping"
    elif choice == 2:  # a reference in the tree replaced
        text = json.dumps(header["tree"])
        refs = [m.start() for m in re.finditer(r'"__tensor__": \d+', text)]
        at = rnd.choice(refs)
        number = re.match(r'"__tensor__": (\d+)', text[at:])
        assert number is not None
        value = json.dumps(rnd.choice([-1, 0, True, 1.0, "0", 10_000, None]))
        text = text[:at] + f'"__tensor__": {value}' + text[at + len(number.group(0)) :]
        header["tree"] = json.loads(text)
        what = "header tensor reference"
    else:
        key = rnd.choice(["tree", "tensors"])
        header[key] = rnd.choice(_ODD_VALUES)
        what = f"header {key}"
    encoded = json.dumps(header, separators=(",", ":")).encode()
    data_start = -(-end // 64) * 64
    new_start = -(-(start + len(encoded)) // 64) * 64
    body = data[data_start:]
    forged = MAGIC + _LENGTH.pack(len(encoded)) + encoded + bytes(new_start - start - len(encoded))
    reseal(path, forged + body, recompute=recompute)
    return what


_FIELDS = [
    "kind",
    "step",
    "world_size",
    "writer_rank",
    "attempt",
    "layout",
    "model_signature",
    "run_id",
    "created",
    "torch_version",
    "reason",
    "writer_ranks",
    "exact_buffers",
    "files",
    "format",
]


def edit_manifest(path: Path, rnd: random.Random, recompute: bool) -> str:
    field = rnd.choice(_FIELDS)
    action = rnd.randrange(5)

    def edit(data: dict[str, Any]) -> None:
        if action == 0:
            data.pop(field, None)
        elif action == 1 and field == "model_signature":  # one digit of a shape
            name = rnd.choice(sorted(data[field]))
            data[field][name][0] = [n + rnd.choice([1, 2, -1]) for n in data[field][name][0]]
        elif action == 1 and field == "layout":
            data[field] = rnd.choice(
                [{"type": "fsdp", "mesh_shape": [2]}, {"type": "dpp"}, {"type": "ddp", "x": 1}]
            )
        elif action == 1 and field == "files":
            name = rnd.choice(["../state.pt", "/dev/zero", "..", "a/b", ".metadata", "state.pt"])
            size = rnd.choice([0, 1, 1 << 36, data["files"][PAYLOAD]["size"]])
            data["files"][name] = {"size": size, "crc32": "00000000"}
        elif action == 1 and field in ("step", "world_size", "writer_rank", "attempt"):
            data[field] = data.get(field, 0) + rnd.choice([1, -1, 1 << 40])
        elif action == 1 and field == "kind":
            data[field] = rnd.choice(["periodic", "jot", "JIT"])
        else:
            data[field] = rnd.choice(_ODD_VALUES)

    reseal(path, edit=edit, recompute=recompute)
    return f"manifest {field} {'dropped' if action == 0 else 'changed'}"


def flip_manifest_text(path: Path, rnd: random.Random, recompute: bool) -> str:
    text = bytearray((path / MANIFEST).read_bytes())
    text[rnd.randrange(len(text))] ^= 1 << rnd.randrange(8)
    (path / MANIFEST).write_bytes(bytes(text))
    if recompute:
        try:
            reseal(path)
        except (ValueError, UnicodeDecodeError):
            pass  # no longer JSON: stays as flipped
    return "manifest bit flipped"


def replace_file(path: Path, rnd: random.Random, outside: Path) -> str:
    name = rnd.choice([PAYLOAD, PAYLOAD, MANIFEST])
    target = path / name
    size = target.stat().st_size
    target.unlink()
    kind = rnd.choice(["fifo", "dev_zero", "outside", "dir", "sparse", "empty", "hardlink"])
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev_zero":
        target.symlink_to("/dev/zero")
    elif kind == "outside":
        target.symlink_to(outside)
    elif kind == "dir":
        target.mkdir()
    elif kind == "sparse":
        with open(target, "wb") as handle:
            handle.truncate(rnd.choice([64 << 30, size + 1, 1 << 40]))
    elif kind == "empty":
        target.write_bytes(b"")
    else:  # a hard link to a file outside: a regular file, but its CRC is not the payload's
        os.link(outside, target)
    return f"{name} replaced by {kind}"


def mutations(rnd: random.Random, outside: Path) -> Iterator[tuple[str, Mutation]]:
    """(label, mutation) pairs, forever."""
    kinds: list[tuple[str, Callable[[Path, random.Random, bool], str]]] = [
        ("bits", flip_bits),
        ("truncate", truncate),
        ("extend", extend),
        ("header", edit_header),
        ("header", edit_header),
        ("manifest", edit_manifest),
        ("manifest", edit_manifest),
        ("manifest-text", flip_manifest_text),
    ]
    while True:
        if rnd.random() < 0.15:
            yield "file", lambda path, r: replace_file(path, r, outside)
            continue
        label, mutate = rnd.choice(kinds)
        recompute = rnd.random() < 0.5

        def apply(path: Path, r: random.Random, m: Any = mutate, c: bool = recompute) -> str:
            return m(path, r, c) + (" (checksums recomputed)" if c else " (checksums stale)")

        yield label, apply


# -- watching a case ----------------------------------------------------------------------
class Watch:
    """Every file opened while ``active``: an audit hook (it stays installed;
    it records only while a case runs)."""

    def __init__(self) -> None:
        self.active = False
        self.opened: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.active and event == "open" and isinstance(args[0], (str, bytes, Path)):
            self.opened.append(os.fsdecode(args[0]))


class CaseTimeout(BaseException):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise CaseTimeout


REASONS = [
    ("not a regular file", r"regular file|not a regular|more than the"),
    ("size differs from the manifest", r"truncated or padded|changed size"),
    ("payload checksum mismatch", r"state\.pt: checksum mismatch"),
    ("manifest checksum mismatch", r"manifest checksum mismatch"),
    ("manifest not JSON / not a manifest", r"not valid JSON|not a jitckpt/1 manifest"),
    ("manifest lacks a field", r"manifest lacks"),
    ("manifest field of the wrong type or value", r"manifest field|not a plain name"),
    ("manifest file missing", r"manifest missing|file missing"),
    ("archive header refused", r"archive|tensor \d|bad magic"),
    ("payload disagrees with its manifest", r"disagrees|holds step|layout is|payload's"),
    ("not a training state / not decodable", r"not a jitckpt training state|neither a jitckpt"),
    ("written by another run", r"another run"),
]


def reason_of(text: str) -> str:
    for name, pattern in REASONS:
        if re.search(pattern, text):
            return name
    return "OTHER: " + text


def tensor_bytes(value: Any) -> Any:
    """A state tree with tensors as (dtype, shape, bytes): NaN-safe equality."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().contiguous().reshape(-1)
        return (str(value.dtype), tuple(value.shape), flat.view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return {k: tensor_bytes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tensor_bytes(v) for v in value]
    return value


def loaded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    return tensor_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


# -- the test -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Path]:
    """A run directory with the checkpoints of steps 3 and 4 (jitckpt's
    writer, a small MLP with AdamW), the state saved at step 3, and a file
    outside the run directory."""
    root = tmp_path_factory.mktemp("fuzz")
    model, optimizer = tiny_model(0)
    ctx = rank_context(root / "run", model, optimizer)
    save_at(ctx, 3)
    at_three = loaded_state(model, optimizer)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    save_at(ctx, 4)
    outside = root / "outside.bin"
    outside.write_bytes(os.urandom(4096))
    return root / "run", at_three, outside


def test_mutated_checkpoints_are_refused_with_a_reason_or_loaded_exactly(
    template: tuple[Path, Any, Path], tmp_path: Path, record_property: Any
) -> None:
    run_template, at_three, outside = template
    rnd = random.Random(SEED)
    watch = Watch()
    outcomes: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    labels: collections.Counter[str] = collections.Counter()
    checksums: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    real_size = sum(p.stat().st_size for p in run_template.rglob("*") if p.is_file())
    # Model, optimizer, one decoded payload and Python's own: far below what
    # a 64 GB sparse file or /dev/zero would take if read.
    memory_bound = 64 * real_size + (32 << 20)
    previous = signal.signal(signal.SIGALRM, _alarm)
    generated = mutations(rnd, outside)
    try:
        for case in range(CASES):
            label, mutate = next(generated)
            run = tmp_path / f"case-{case}"
            shutil.copytree(run_template, run, symlinks=True)
            newest = storage.run_storage(run).candidates()[0].path
            assert newest.name.startswith("step-000000004")
            what = mutate(newest, rnd)
            labels[label] += 1
            checksums[what[what.rfind("(") :] if what.endswith(")") else "(file replaced)"] += 1
            model, optimizer = tiny_model(1)
            watch.opened.clear()
            tracemalloc.start()
            signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
            watch.active = True
            try:
                ctx = rank_context(run, model, optimizer)
                step = restore(ctx)
                error = None
            except CaseTimeout:
                step, error = -1, f"hung for {CASE_TIMEOUT_S} s"
            except CheckpointError as exc:
                step, error = -1, f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
                step, error = -1, f"crashed with {type(exc).__name__}: {exc}"
            finally:
                watch.active = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
            name = f"case {case} ({what})"
            escaped = [
                p
                for p in watch.opened
                if p in (str(outside), "/dev/zero")
                or (p.startswith(str(tmp_path)) and not p.startswith(str(run)))
            ]
            if escaped:
                failures.append(f"{name}: opened {escaped}")
            if peak > memory_bound:
                failures.append(f"{name}: allocated {peak} bytes (bound {memory_bound})")
            if error is not None:
                failures.append(f"{name}: {error}")
                continue
            if step == 4:
                expected = decode(bytearray((newest / PAYLOAD).read_bytes()), "x")
                want = tensor_bytes(
                    {"model": expected["model"], "optimizer": expected["optimizer"]}
                )
                if loaded_state(model, optimizer) != want:
                    failures.append(f"{name}: loaded step 4 but not exactly what the file holds")
                outcomes["loaded exactly (step 4)"] += 1
            elif step == 3:
                if loaded_state(model, optimizer) != at_three:
                    failures.append(f"{name}: fell back to step 3 but did not load it exactly")
                events = read_events(run)
                reasons = [
                    e["reason"]
                    for e in events
                    if e["event"] == "checkpoint_refused" and e["path"] == str(newest)
                ]
                if not reasons:  # a manifest refused ranks last: never reached
                    (candidate,) = [
                        c for c in storage.run_storage(run).candidates() if c.path == newest
                    ]
                    reasons = [candidate.problem] if candidate.problem else []
                if not reasons:
                    failures.append(f"{name}: step 3 loaded but step 4 was not refused")
                    continue
                refused[reason_of(reasons[0])] += 1
                outcomes["refused, previous checkpoint loaded exactly (step 3)"] += 1
            else:
                failures.append(f"{name}: restored step {step}")
            shutil.rmtree(run, ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    lines = [f"fuzz: {CASES} mutations of real checkpoints (seed {SEED})"]
    lines += [f"  {n:4d} {k}" for k, n in sorted(labels.items())]
    lines += [f"  {n:4d} {k}" for k, n in sorted(checksums.items())]
    lines += [f"  {n:4d} {k}" for k, n in sorted(outcomes.items())]
    lines += ["  refused, by reason:"] + [f"    {n:4d} {k}" for k, n in refused.most_common()]
    summary = "\n".join(lines)
    print("\n" + summary)
    record_property("fuzz_summary", summary)
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:20])
    assert not any(k.startswith("OTHER") for k in refused), refused
    assert sum(outcomes.values()) == CASES
