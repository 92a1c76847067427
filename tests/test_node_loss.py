"""Node loss: two `jitckpt run` agents of 2 ranks each (--nnodes=1:2, c10d
rendezvous on 127.0.0.1); one node (its agent and workers) is SIGKILLed and
the other resumes at world size 2 from the JIT checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from jobs import REPO, TINY, kill_tagged

from jitckpt.events import read_events
from jitckpt.summary import summarize

NODE_TIMEOUT_S = 240


def test_node_loss_resumes_at_smaller_world_with_exact_data_position(tmp_path: Path) -> None:
    # The rendezvous store lives outside both agents (is_host=false), like a
    # head node's: the test hosts it, so either node may be the one to die.
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    tag = uuid.uuid4().hex
    env = dict(os.environ, JITCKPT_TEST_TAG=tag, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "jitckpt", "run",
        "--nnodes", "1:2", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-id", tag,
        "--rdzv-conf", "is_host=false,keep_alive_interval=1,keep_alive_max_attempt=2,last_call_timeout=3",
        "--inject", "node@step=2,rank=2,phase=forward",
        str(TINY), "--run-dir", str(run_dir), "--steps", "6", "--log-samples", "--digest", str(digest),
    ]  # fmt: skip
    agents = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=NODE_TIMEOUT_S)
            outputs.append(out.decode(errors="replace"))
    finally:
        kill_tagged(tag)
    codes = sorted(agent.returncode for agent in agents)
    text = "\n".join(o[-4000:] for o in outputs)
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
