"""Restorer: on start, find the newest checkpoint every rank can load, and
load it.

Rank 0 ranks the candidates of every source (shared-memory staging first,
then the run directory), verifies them newest first and refuses, with the
file and the reason, any that is partial, corrupt, written by another run
or that does not fit the model (docs/promises.md, P3). Its choice reaches
the other ranks through the store as a name and a checksum: each finds that
very checkpoint in its own sources (a copy staged on another node appears
in the run directory once its persister is done). After the first step of
the resumed run, older JIT copies are pruned.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from jitckpt import attempt, protocol
from jitckpt import events as ev
from jitckpt.checkpoint.context import RankContext
from jitckpt.checkpoint.layout import Layout, check
from jitckpt.errors import CheckpointError, CheckpointMismatchError, JitckptError
from jitckpt.state import rng
from jitckpt.state.consistency import check_optimizer, check_payload
from jitckpt.state.dcp_read import read_metadata
from jitckpt.state.mesh import SHARDED_TYPES
from jitckpt.state.training import check_signature, decode
from jitckpt.storage.base import Candidate, Storage
from jitckpt.storage.manifest import PAYLOAD, Manifest

# How long ranks other than 0 wait for rank 0 to choose the checkpoint to
# restore (it reads and verifies candidates newest first).
RESTORE_CHOICE_TIMEOUT = timedelta(seconds=300)
# How long a rank waits for a checkpoint staged on another node to reach
# durable storage (its persister is copying it).
PERSIST_WAIT_S = 120.0


@dataclass(frozen=True)
class Ranked:
    """A candidate checkpoint and the source it was found in."""

    candidate: Candidate
    source: Storage
    preference: int  # the source's rank: 0 is preferred (staging)


def rank_candidates(sources: list[Storage]) -> list[Ranked]:
    """Every candidate of every source, best first: newest step, a JIT copy
    before a periodic one, newest attempt, lowest writer rank; a copy in a
    preferred source (staging) before the same checkpoint elsewhere."""
    ranked = [
        Ranked(candidate, source, preference)
        for preference, source in enumerate(sources)
        for candidate in source.candidates()
    ]
    return sorted(ranked, key=lambda r: (r.candidate.sort_key(), r.preference))


def foreign_run(manifest: Manifest, run_id: str, strict: bool = False) -> str | None:
    """Why a checkpoint written by another run must not be loaded, or None.
    Durable checkpoints of older versions carry no run id and pass; a staged
    copy (``strict``) always carries one, so one without is refused."""
    if manifest.run_id == run_id or (manifest.run_id is None and not strict):
        return None
    if manifest.run_id is None:
        return "carries no run id (a staged copy always does): not written by this run"
    return (
        f"written by another run (run id {manifest.run_id}; this run directory's is "
        f"{run_id}): copied in from elsewhere? Not loaded. To continue that "
        f"run, use its own run directory (or a full copy of it)"
    )


def decode_checked(data: bytearray, candidate: Candidate) -> dict[str, Any]:
    """The payload decoded and checked against its own manifest (a
    disagreement is corruption: CheckpointError, the candidate refused);
    for a sharded checkpoint, its DCP metadata read with the restricted
    unpickler too. Nothing of it runs code. ``jitckpt inspect --verify``
    uses it as well."""
    manifest = candidate.manifest
    assert manifest is not None
    where = str(candidate.path / PAYLOAD)
    payload = decode(data, where)
    sharded = manifest.layout.get("type") in SHARDED_TYPES
    check_payload(payload, manifest.step, manifest.model_signature, sharded, where)
    if sharded:
        read_metadata(candidate.path)
    return payload


class Restorer:
    """Chooses and loads the checkpoint a (re)started rank resumes from.

    Args:
        ctx: the rank's shared context.
        layout: checks a checkpoint's layout and loads it.
        keep_jit: JIT checkpoints kept once the resumed run made progress.
    """

    def __init__(self, ctx: RankContext, layout: Layout, keep_jit: int) -> None:
        self.ctx = ctx
        self.layout = layout
        self.keep_jit = keep_jit
        self.pruning: threading.Thread | None = None
        # Loads the restored payload once more (model, optimizer, scheduler,
        # extras, RNG; not the data position): a loop that fast-forwards
        # through the script's own code asks for it (jitckpt.checkpoint.loop).
        self.load_again: Callable[[], None] | None = None

    def sources(self) -> list[Storage]:
        """Where checkpoints are looked for, preferred first."""
        staging = self.ctx.staging
        return [*([staging.storage] if staging is not None else []), self.ctx.storage]

    def restore(self) -> int:
        """Load the chosen checkpoint; returns the step to resume from (0 for
        a fresh start). Raises CheckpointError when no checkpoint can be
        chosen, CheckpointMismatchError when the newest valid one does not
        fit this job (nothing is loaded then)."""
        ctx = self.ctx
        started = time.monotonic()
        chosen, payload = self._choose()
        if chosen is None:
            ctx.events.emit(ev.FRESH_START)
            return 0
        path, manifest = chosen.path, chosen.manifest
        assert manifest is not None
        if payload is None:
            # Chosen by rank 0, which checked it fits its own model.
            self._check_fits(manifest, path)
        ctx.injector.at("restore", manifest.step)
        if payload is None:
            payload = self._decode(ctx.storage.read_verified(chosen), chosen)
            check_optimizer(payload, ctx.state.optimizer, str(path / PAYLOAD))
        try:
            self.layout.load(payload, path)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a torch load error, made actionable
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointMismatchError(
                f"checkpoint {path} could not be loaded into this job's components "
                f"({type(exc).__name__}: {first}). "
                f"Pass the same optimizer, scheduler, loader and extras as the run that "
                f"wrote it, or start a new run with a different --run-dir. Nothing on disk "
                f"was changed."
            ) from None
        self._restore_rng(payload, manifest.step)

        def load_again() -> None:
            ctx.state.restore(payload, str(path), data=False)
            self._restore_rng(payload, manifest.step)

        self.load_again = load_again
        step = int(payload["step"])
        ctx.events.emit(
            ev.RESTORE,
            step=step,
            kind=manifest.kind,
            path=str(path),
            source=self._source_name(chosen),
            duration=time.monotonic() - started,
            saved_world_size=manifest.world_size,
            digest=self.layout.audit_digest(),
        )
        if ctx.rank == 0:
            print(
                f"jitckpt: resumed from step {step} ({manifest.kind} checkpoint, {path})",
                flush=True,
            )
        return step

    def _restore_rng(self, payload: dict[str, Any], step: int) -> None:
        ctx = self.ctx
        if ctx.deterministic:
            return
        saved_rng = payload.get("rng")
        if saved_rng and saved_rng["rank"] == ctx.rank:
            rng.restore(saved_rng["state"])
        else:
            # Another rank's generator state must not be copied here (two
            # ranks would draw the same dropout masks): derive a fresh one.
            rng.reseed(torch.initial_seed(), step, ctx.rank)

    def after_first_step(self, resumed_at: int) -> None:
        """The resumed run completed a step: older JIT copies and persisted
        staged copies are no longer needed."""
        ctx = self.ctx
        if ctx.rank == 0:
            # On a thread: pruning verifies (reads) the copies it keeps that
            # this process has not read already, which must not stall the
            # loop. It removes only steps older than the one restored, which
            # no save of this run writes.
            self.pruning = threading.Thread(
                target=ctx.storage.prune,
                args=("jit", self.keep_jit),
                kwargs={"keep_from_step": resumed_at},
                name="jitckpt-prune",
                daemon=True,
            )
            self.pruning.start()
        if ctx.staging is not None and os.environ.get(protocol.LOCAL_RANK_ENV, "0") == "0":
            ctx.staging.remove_persisted()

    def _check_fits(self, manifest: Manifest, path: Path) -> None:
        check(self.layout, manifest.layout, str(path))
        check_signature(manifest.model_signature, self.ctx.state.model, str(path))

    def _decode(self, data: bytearray, candidate: Candidate) -> dict[str, Any]:
        return decode_checked(data, candidate)

    def _source_name(self, candidate: Candidate) -> str:
        staging = self.ctx.staging
        staged = staging is not None and candidate.path.parent == staging.storage.root
        return "staged" if staged else "durable"

    def _choose(self) -> tuple[Candidate | None, dict[str, Any] | None]:
        """Rank 0 picks the newest valid checkpoint and tells the others
        through the store, so every rank loads the same one."""
        ctx = self.ctx
        key = protocol.RESTORE_CHOICE_KEY
        if ctx.rank != 0 and ctx.uses_store:
            store = attempt.store()
            store.wait([key], RESTORE_CHOICE_TIMEOUT)
            choice = json.loads(store.get(key).decode())
            if "error" in choice:
                raise CheckpointError(f"rank 0 could not choose a checkpoint: {choice['error']}")
            if not choice["name"]:
                return None, None
            return self._resolve(choice["name"], choice["checksum"]), None
        try:
            chosen, payload = self._newest_valid()
        except JitckptError as exc:
            if ctx.uses_store:
                attempt.store().set(key, json.dumps({"error": str(exc)}))
            raise
        if ctx.uses_store:
            choice = {
                "name": chosen.name if chosen else None,
                "checksum": chosen.checksum if chosen else None,
            }
            attempt.store().set(key, json.dumps(choice))
        ctx.storage.remove_stale_temporaries()
        return chosen, payload

    def _resolve(self, name: str, checksum: str) -> Candidate:
        """Rank 0's choice, found in this rank's own storage. Only a name
        travels: each rank checks it holds the very checkpoint rank 0
        verified. A copy staged on another node appears in durable storage
        once its persister is done, so it is waited for, bounded."""
        deadline = time.monotonic() + PERSIST_WAIT_S
        while True:
            for source in self.sources():
                found = source.find(name)
                if found is not None and found.checksum == checksum:
                    return found
                if found is not None and found.manifest is not None:
                    raise CheckpointError(
                        f"{found.path}: differs from the checkpoint rank 0 chose (another "
                        f"checksum); do all ranks see the same --run-dir?"
                    )
            if self.ctx.staging is None or time.monotonic() > deadline:
                raise CheckpointError(
                    f"{self.ctx.storage.root / name}: chosen by rank 0 but not present on this "
                    f"rank; do all ranks see the same --run-dir (a shared filesystem at the "
                    f"same path)?"
                )
            time.sleep(0.05)

    def _newest_valid(self) -> tuple[Candidate | None, dict[str, Any] | None]:
        """The newest checkpoint that verifies and decodes safely, decoded.
        Staged copies come first among copies of the same step. A valid
        checkpoint that does not fit the job stops the search (raises):
        resuming from an older one would silently lose work."""
        ctx = self.ctx
        for entry in rank_candidates(self.sources()):
            candidate, source = entry.candidate, entry.source
            problem, payload = candidate.problem, None
            manifest = candidate.manifest
            if problem is None and manifest is not None:
                problem = foreign_run(manifest, ctx.run_id, strict=source is not ctx.storage)
            if problem is None and manifest is not None:
                try:
                    payload = self._decode(source.read_verified(candidate), candidate)
                    if len(manifest.files) > 1:
                        # Sharded: DCP reads the tensor files without checking them.
                        source.verify_files(candidate)
                except CheckpointError as exc:
                    problem = str(exc)
            if problem is not None or manifest is None or payload is None:
                self._refused(candidate, problem)
                continue
            self._check_fits(manifest, candidate.path)
            try:
                check_optimizer(payload, ctx.state.optimizer, str(candidate.path / PAYLOAD))
            except CheckpointError as exc:
                self._refused(candidate, str(exc))
                continue
            return candidate, payload
        return None, None

    def _refused(self, candidate: Candidate, problem: str | None) -> None:
        self.ctx.events.emit(ev.CHECKPOINT_REFUSED, path=str(candidate.path), reason=problem)
        print(
            f"jitckpt: refusing checkpoint {candidate.path}: {problem}",
            file=sys.stderr,
            flush=True,
        )
