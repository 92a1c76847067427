"""One replica group of the torchft peer benchmark (benchmarks/drills_torchft.py).

The example GPT (examples/train_gpt_plain.py's model and data), AdamW and
the example's LR schedule, trained data-parallel across replica groups with
torchft 0.2.0 (the optional `peers` install: benchmarks/install_peers.sh).
Each replica group is a one-rank torchrun job, launched by the benchmark as

    TORCHFT_LIGHTHOUSE=http://127.0.0.1:PORT python -m torch.distributed.run \\
        --standalone --nproc-per-node 1 --max-restarts N \\
        benchmarks/torchft_train.py --steps S --run-dir DIR --group G --groups 2

torchft's way of surviving a replica's death: every step starts a quorum
(``Manager.start_quorum``) with the lighthouse, gradients are averaged over
the replica groups in the quorum, and the optimizer steps only if
``Manager.should_commit()`` says every participant's step went well. A
group that died is restarted by its torchrun and heals: it fetches the
live state from a peer (here over the gloo group, PGTransport) and joins
the next quorum. No checkpoint is written.

Gradients (``--grads``): ``ddp`` (default) is torchft's DistributedDataParallel
wrapper, whose comm hook calls ``Manager.allreduce`` per bucket; ``allreduce``
skips DDP and, after backward, calls ``Manager.allreduce`` on every gradient
and waits for all of them (torchft's other documented way). Both leave a
failed all-reduce to the manager, which then refuses the commit.

Every step appends ``step`` (the manager's step after it, whether it
committed, the participants) to ``RUN_DIR/torchft.jsonl`` (the format of
benchmarks/periodic_baseline.py's log), so the benchmark can time the
survivor's stall and the restarted group's return.
"""

from __future__ import annotations

import argparse
import socket
from datetime import timedelta
from pathlib import Path

from periodic_baseline import BATCH_SIZE, LR, load_model_module, lr_lambda, start_log

LOG_FILE = "torchft.jsonl"
# Bound of one gloo collective between replica groups. A peer killed
# mid-allreduce resets the connection at once (2 groups: every survivor is
# its ring neighbour), so this only bounds a peer that hangs.
PG_TIMEOUT = timedelta(seconds=10)
# Bound of quorum, should_commit and healing RPCs.
MANAGER_TIMEOUT = timedelta(seconds=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--group", type=int, required=True, help="this replica group's index")
    parser.add_argument("--groups", type=int, required=True, help="replica groups in the job")
    parser.add_argument("--grads", choices=("ddp", "allreduce"), default="ddp")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchft import DistributedDataParallel, DistributedSampler, Manager, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    torch.set_num_threads(1)
    log = start_log(args.run_dir, LOG_FILE, group=args.group)
    example = load_model_module()
    torch.manual_seed(0)
    dataset = example.BigramSequences(vocab=256, length=64, size=4096)
    # Each group reads its own shard; a restarted group starts its shard over
    # (torchft heals model and optimizer, not the loader).
    sampler = DistributedSampler(
        dataset,
        replica_rank=args.group,
        num_replica_groups=args.groups,
        group_rank=0,
        num_replicas=1,
        shuffle=True,
        seed=0,
    )
    loader = StatefulDataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
    model = example.GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps))

    def state_dict() -> dict[str, object]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }

    def load_state_dict(state: dict[str, object]) -> None:
        model.load_state_dict(state["model"])  # type: ignore[arg-type]
        optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]

    pg = ProcessGroupGloo(timeout=PG_TIMEOUT)
    manager = Manager(
        pg=pg,
        min_replica_size=1,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=f"group{args.group}",
        timeout=MANAGER_TIMEOUT,
        hostname="127.0.0.1",
        checkpoint_transport=PGTransport(pg, timeout=MANAGER_TIMEOUT, device=torch.device("cpu")),
    )
    forward = DistributedDataParallel(manager, model) if args.grads == "ddp" else model
    log.emit("ready", host=socket.gethostname())

    batches = example.endless(loader)
    while manager.current_step() < args.steps:
        inputs, targets = next(batches)
        # What torchft.optim.OptimizerWrapper does, spelled out so the log
        # can say whether the step committed.
        manager.start_quorum()
        optimizer.zero_grad(set_to_none=True)
        logits = forward(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        loss.backward()
        if args.grads == "allreduce":
            works = [manager.allreduce(p.grad) for p in model.parameters() if p.grad is not None]
            for work in works:
                work.wait()  # an error is the manager's: should_commit() says no
        committed = manager.should_commit()
        if committed:
            optimizer.step()
            scheduler.step()
        log.emit(
            "step",
            step=manager.current_step(),
            committed=committed,
            participants=manager.num_participants(),
        )
    log.emit("finish", step=manager.current_step())
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
