"""Node loss: two `jitckpt run` agents of 2 ranks each (--nnodes=1:2, c10d
rendezvous on 127.0.0.1); one node (its agent and workers) is SIGKILLed and
the other resumes at world size 2 from the JIT checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from jobs import TINY, two_nodes

from jitckpt.analysis.summary import summarize
from jitckpt.events import read_events


def test_node_loss_resumes_at_smaller_world_with_exact_data_position(tmp_path: Path) -> None:
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    codes, text = two_nodes(
        "node@step=2,rank=2,phase=forward",
        str(TINY), "--run-dir", str(run_dir), "--steps", "6", "--log-samples", "--digest", str(digest),
    )  # fmt: skip
    assert codes == [-9, 0], (codes, text)

    events = read_events(run_dir)
    first_world = {e["world_size"] for e in events if e["event"] == "start" and e["attempt"] == 0}
    assert first_world == {4}, f"both nodes must have joined the first round: {first_world}"
    restores = [e for e in events if e["event"] == "restore"]
    assert restores and {e["saved_world_size"] for e in restores} == {4}
    last_world = {
        e["world_size"]
        for e in events
        if e["event"] == "start" and e["attempt"] == max(x["attempt"] for x in restores)
    }
    assert last_world == {2}
    # The state loaded is bitwise the state that was saved.
    saves = {e["path"]: e["digest"] for e in events if e["event"] == "save"}
    for restore in restores:
        assert restore["digest"] == saves[restore["path"]]
    resumed = restores[0]["step"]
    assert resumed == 2
    (failure,) = summarize(events)
    assert failure["iterations_lost"] is not None and failure["iterations_lost"] <= 1, failure
    assert digest.exists(), "training completed at world size 2"

    # Data position rule: the epoch's 64 samples are each trained on exactly
    # once across the world-size change (steps 0-1 at 4 ranks x 4, steps 2-5
    # at 2 ranks x 4, batch 4 per rank).
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    kept = [
        r
        for r in records
        if (r["world"] == 4 and r["step"] < resumed) or (r["world"] == 2 and r["step"] >= resumed)
    ]
    counts = Counter(i for r in kept for i in r["indices"])
    assert sorted(counts) == list(range(64)) and set(counts.values()) == {1}, counts
