"""DDP's forward-time buffer broadcast as jitckpt does it in process
(jitckpt.comm.BufferBroadcast), between two real gloo ranks: a rank that
reaches a step's forward after the others left it takes the buffers a
recovery sent it instead of broadcasting (nobody would meet it there), and
broadcasts normally from the next step on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

RANK = textwrap.dedent(
    """
    import json, sys, threading
    import torch
    import torch.distributed as dist
    from jitckpt.comm import BufferBroadcast

    rank, store_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(rank)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
        timeout=__import__("datetime").timedelta(seconds=5),
    )
    bn = torch.nn.BatchNorm1d(3)
    bn(torch.randn(8, 3) * (rank + 1))  # each rank's own statistics

    class Recovery:  # no recovery is pending in this test
        forward_buffers = None
        def pending(self): return False
        def add_waiter(self, event): pass
        def remove_waiter(self, event): pass
        def wait_notice(self, timeout): return False

    class Results:  # as jitckpt.state.buffers.BufferSnapshots
        names = ["running_mean", "running_var", "num_batches_tracked"]
        snapshot = {n: b.clone() for n, b in bn.named_buffers()}  # "step 5's broadcast"
        def of_step(self, step): return self.snapshot if step == 5 else None
        def live(self): return dict(bn.named_buffers())

    step = [5]
    hook = BufferBroadcast(Recovery(), lambda: step[0], lambda: None, Results())
    report = {"own": {n: b.tolist() for n, b in bn.named_buffers()}}
    if rank == 0:
        report["sent"] = hook.send(5, [1])
    else:
        hook.receive(5, 0)
        hook.hook(None, dict(bn.named_buffers()))  # step 5's forward: no collective
        report["step5"] = {n: b.tolist() for n, b in bn.named_buffers()}
    step[0] = 6
    bn.running_mean.add_(10.0 * (rank + 1))
    hook.hook(None, dict(bn.named_buffers()))  # step 6's forward: both broadcast
    report["step6"] = {n: b.tolist() for n, b in bn.named_buffers()}
    with open(out, "w") as handle:
        json.dump(report, handle)
    dist.barrier()  # neither ends while the other's last broadcast is in flight
    dist.destroy_process_group()
    """
)


def test_a_rank_given_the_buffers_skips_that_forwards_broadcast_then_broadcasts_again(
    tmp_path: Path,
) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(tmp_path / "store"), str(outs[r])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        logs = [proc.communicate(timeout=60)[0].decode(errors="replace") for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], logs
    zero, one = (json.loads(out.read_text()) for out in outs)
    assert zero["own"] != one["own"]
    # Rank 1's step-5 forward took rank 0's buffers, without a collective
    # (rank 0 made none: a broadcast would have timed out after 5 s).
    assert one["step5"] == zero["own"]
    assert zero["sent"] == 4 * (3 + 3) + 8
    # Step 6: an ordinary broadcast of rank 0's buffers again.
    assert one["step6"] == zero["step6"] != zero["own"]
