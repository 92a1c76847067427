"""``jitckpt run``: torchrun's launcher (torch.distributed.elastic) with
just-in-time checkpointing.

It accepts every torchrun option and adds ``--inject SPEC`` (fault
injection), ``--term-grace`` (how long a worker may ignore SIGTERM before it
is killed) and ``--spares``. Workers start through ``jitckpt.launch.bootstrap`` so
their SIGTERM thread exists before any other thread. At the end it prints a
summary of every failure from the run's event log. Workers are forked from
a warm process that has torch imported already (jitckpt.launch.warmpool), unless
``--no-warm-pool`` is given.

Exit status: 0 when training finished; 75 when the job was preempted
(SIGTERM) and the workers saved: run the same command again to resume;
128+N when stopped by another signal N; 78 when a worker reported an error
no restart can fix; 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path

from jitckpt import compat, protocol
from jitckpt import events as ev
from jitckpt.errors import FaultSpecError
from jitckpt.inject import KINDS as INJECT_KINDS
from jitckpt.inject import PHASES as INJECT_PHASES
from jitckpt.inject import parse_spec, parse_specs
from jitckpt.launch.coordinator import RECOVERY_DEADLINE_S
from jitckpt.launch.warmpool import WarmPool, start_pool
from jitckpt.launch.wire import startup_env
from jitckpt.storage.staging import settle

# Restarts allowed by default: torchrun's default is 0, which turns the first
# failure into the end of the job. Each failure costs one restart.
DEFAULT_MAX_RESTARTS = 3
# Seconds a worker may ignore SIGTERM before SIGKILL in the restart path.
# A healthy worker saves and exits well within it (the grace stretches while
# a save is in progress, see jitckpt.launch.agent); a wedged one only delays the
# restart by it.
DEFAULT_TERM_GRACE_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "jitckpt run"
    parser.description = (
        "Launch a training script like torchrun, with just-in-time checkpointing: on a "
        "failure the survivors save the last completed step and the job resumes from it."
    )
    parser.set_defaults(max_restarts=DEFAULT_MAX_RESTARTS)
    parser.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault: KIND@step=N,rank=R[,phase=P] (repeatable); KIND in "
        f"{', '.join(INJECT_KINDS)}; phase in {', '.join(INJECT_PHASES)} "
        "(default forward). Fires once per run directory.",
    )
    parser.add_argument(
        "--term-grace",
        type=float,
        default=DEFAULT_TERM_GRACE_S,
        metavar="SECONDS",
        help=f"seconds a worker may ignore SIGTERM before it is killed when the job restarts (default {DEFAULT_TERM_GRACE_S})",
    )
    parser.add_argument(
        "--no-warm-pool",
        dest="warm_pool",
        action="store_false",
        help="start every worker as a fresh interpreter instead of forking it from a warm "
        "process that has torch imported already (see jitckpt.launch.warmpool)",
    )
    parser.add_argument(
        "--spares",
        type=int,
        default=0,
        metavar="K",
        help="hot spare processes per node for in-process recovery: each has imported torch and "
        "warmed it up, waits for a failed worker's rank, then runs the script's setup and takes "
        "its place (default 0: a fresh process is spawned instead)",
    )
    parser.add_argument(
        "--recovery-timeout",
        type=float,
        default=RECOVERY_DEADLINE_S,
        metavar="SECONDS",
        help="abandon an in-process recovery that is not done after this long for the restart "
        "path, naming the ranks that never finished it (default "
        f"{RECOVERY_DEADLINE_S:g})",
    )
    parser.add_argument(
        "--transparent",
        action="store_true",
        help="JIT checkpointing for a script that was not changed: its DDP model, optimizer, "
        "scheduler and DataLoader (with a DistributedSampler) are found as it builds them; "
        "needs --run-dir (README, 'Zero code change')",
    )
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        help="with --transparent: the directory for checkpoints and the event log",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="with --transparent: deterministic mode (a resumed run is bitwise equal to the "
        "uninterrupted one)",
    )
    parser.add_argument(
        "--recovery",
        choices=("auto", "restart"),
        default="auto",
        help="auto (default): on a failure the healthy workers keep running and only the failed "
        "one is replaced (in-process recovery), where that applies (one node, deterministic "
        "mode, DDP); otherwise, and with 'restart', every worker restarts from the JIT checkpoint",
    )
    return parser


def run(argv: list[str]) -> int:
    # The warm pool's zygote imports torch (~3 s here), and so does this
    # launcher's parser (~1.6 s): started first, the zygote's import runs
    # beside ours instead of after it.
    pool = _early_pool(argv)
    launched = False
    control_dir: Path | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            specs = [parse_spec(text) for text in args.inject]
        except FaultSpecError as exc:
            parser.error(f"--inject: {exc}")
        if args.spares < 0:
            parser.error("--spares must be 0 or more")
        if args.term_grace <= 0:
            parser.error("--term-grace must be positive")
        if args.recovery_timeout <= 0:
            parser.error("--recovery-timeout must be positive")
        if args.transparent and not args.run_dir:
            parser.error("--transparent needs --run-dir DIR (where its checkpoints go)")
        if not args.transparent and (args.run_dir or args.deterministic):
            parser.error(
                "--run-dir and --deterministic are options of --transparent; a script that "
                "makes its own JitCheckpoint takes them as its own arguments (after the script)"
            )
        if args.standalone:
            # One node: every store listens on loopback (compat.loopback_rendezvous)
            # and the workers find it there (docs/platform.md, "Where the
            # rendezvous stores listen").
            args.rdzv_backend = "c10d"
            args.rdzv_endpoint = "127.0.0.1:0"
            args.rdzv_id = str(uuid.uuid4())
            args.local_addr = "127.0.0.1"
            if "lo" in {name for _index, name in socket.if_nameindex()}:
                # gloo's sockets too, unless the user chose an interface.
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

        from torch.distributed.run import config_from_args

        config, cmd, cmd_args = config_from_args(args)
        rest: list[str] | None = None
        if args.no_python or args.run_path:
            entry_args = cmd_args
        else:
            # config_from_args gave [-u, (-m), script, args...]: run it through the bootstrap.
            rest = cmd_args[1:]
            if rest[:1] == ["-m"]:
                rest = ["--module", *rest[1:]]
            entry_args = ["-u", "-m", "jitckpt.launch.bootstrap", *rest]
        warm = rest is not None and args.warm_pool
        if pool is not None and (not warm or pool.startup != startup_env(dict(os.environ))):
            # The early guess was wrong (no pool wanted after all, or workers
            # with other start-up variables, which the zygote would refuse).
            pool.close(unused=True)
            pool = None

        control_dir = Path(tempfile.mkdtemp(prefix="jitckpt-control-"))
        os.environ[protocol.CONTROL_DIR_ENV] = str(control_dir)
        os.environ[protocol.AGENT_PID_ENV] = str(os.getpid())
        if specs:
            os.environ[protocol.INJECT_ENV] = ";".join(str(spec) for spec in specs)
        if args.transparent:
            os.environ[protocol.TRANSPARENT_RUN_DIR_ENV] = str(Path(args.run_dir).absolute())
            if args.deterministic:
                os.environ[protocol.DETERMINISTIC_ENV] = "1"
        if warm and pool is None:
            # Under the environment the workers get, so that it imports torch
            # as they would (OMP_NUM_THREADS above all).
            pool = start_pool()
        if pool is not None:
            assert rest is not None
            entry_args = pool.client_args(rest)
        inprocess = args.recovery == "auto" and config.max_nodes == 1
        if args.spares and not inprocess:
            parser.error("--spares needs in-process recovery (--recovery auto, one node)")
        # With in-process recovery, the longest the agent waits for a worker
        # to exit between its other duties (kill requests, the spare pool, a
        # recovery's progress); an exit ends the wait at once. Each round of
        # duties costs a few store round trips: at 0.02 s the agent took 60 ms
        # of CPU in the 0.3 s a replacement redoes its step (measured on 2
        # cores), so torchrun's --monitor-interval (0.1 s by default) stays.
        exit_wait_s = args.monitor_interval
        if inprocess:
            os.environ[protocol.INPROCESS_ENV] = "1"
            # The agent's poll is what notices an exit for in-process
            # recovery (torchrun's 0.1 s sleep was most of its detection
            # time): instead of sleeping, the agent waits on the workers'
            # exits themselves, up to exit_wait_s (JitAgent._monitor_apart).
            config.monitor_interval = 1e-4  # (elastic requires > 0)
        launched = True
        return _launch(
            config,
            cmd,
            entry_args,
            control_dir,
            args.term_grace,
            inprocess,
            args.spares,
            args.recovery_timeout,
            exit_wait_s,
            loopback=args.standalone,
        )
    finally:
        if pool is not None:
            pool.close(unused=not launched)
        if control_dir is not None:
            shutil.rmtree(control_dir, ignore_errors=True)


def _early_pool(argv: list[str]) -> WarmPool | None:
    """Start the warm pool before torch is imported here, when a cheap look
    at the flags says the workers will use it. The real parser decides
    later (run() closes a pool started on a wrong guess): a script argument
    that looks like a launcher flag costs at most a zygote for nothing."""
    if "-h" in argv or "--help" in argv:
        return None
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    peek.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc", default="1")
    for flag in ("--no-warm-pool", "--no-python", "--no_python", "--run-path", "--run_path"):
        peek.add_argument(flag, action="store_true")
    try:
        known, _ = peek.parse_known_args(argv)
    except argparse.ArgumentError:
        return None
    if known.no_warm_pool or known.no_python or known.run_path or not known.nproc.isdigit():
        return None
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and int(known.nproc) > 1:
        env["OMP_NUM_THREADS"] = "1"  # what torchrun's config_from_args will set
    return start_pool(env)


def _launch(  # type: ignore[no-untyped-def]
    config,
    cmd,
    entry_args,
    control_dir: Path,
    term_grace_s: float,
    inprocess: bool,
    spares: int,
    recovery_timeout_s: float,
    exit_wait_s: float,
    loopback: bool = False,
) -> int:
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    from jitckpt.analysis.summary import print_summary
    from jitckpt.launch.agent import JitAgent

    if not config.run_id:
        config.run_id = str(uuid.uuid4().int)
    rdzv_parameters = RendezvousParameters(
        backend=config.rdzv_backend,
        endpoint=config.rdzv_endpoint,
        run_id=config.run_id,
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        local_addr=config.local_addr,
        **config.rdzv_configs,
    )
    master_addr, master_port = compat.addr_and_port(rdzv_parameters)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle
    spec = WorkerSpec(
        role=config.role,
        local_world_size=config.nproc_per_node,
        entrypoint=cmd,
        args=tuple(entry_args),
        rdzv_handler=(
            compat.loopback_rendezvous(rdzv_parameters)
            if loopback
            else rdzv_registry.get_rendezvous_handler(rdzv_parameters)
        ),
        max_restarts=config.max_restarts,
        monitor_interval=config.monitor_interval,
        master_addr=master_addr,
        master_port=master_port,
        local_addr=config.local_addr,
    )
    agent = JitAgent(
        spec=spec,
        logs_specs=config.logs_specs,
        start_method=config.start_method,
        log_line_prefix_template=config.log_line_prefix_template,
        control_dir=control_dir,
        term_grace_s=term_grace_s,
        inprocess=inprocess,
        spares=spares,
        recovery_timeout_s=recovery_timeout_s,
        exit_wait_s=exit_wait_s,
        **compat.agent_config_extras(config),
    )
    status = 1
    outcome = "failed"
    shutdown_rdzv = True
    try:
        result = agent.run()
        if result.is_failed():
            outcome = "failed"
            status = protocol.EXIT_FATAL if agent.fatal_message else 1
        else:
            outcome = "finished"
            status = 0
    except SignalException as exc:
        # Preemption: the agent has forwarded the signal and the workers have
        # saved. Keep the rendezvous open so the requeued job can join it.
        shutdown_rdzv = False
        outcome = f"stopped by signal {exc.sigval.name}"
        # SIGTERM is a scheduler's preemption: the workers saved, requeue to
        # resume. Other signals (Ctrl-C) end the job the usual way.
        status = (
            protocol.EXIT_SAVED_AND_STOPPED
            if exc.sigval == signal.SIGTERM
            else 128 + int(exc.sigval)
        )
    finally:
        if shutdown_rdzv:
            spec.rdzv_handler.shutdown()
    # Staged copies the workers left (also after a preemption): wait for
    # their persisters, then free the shared memory of those persisted.
    settle(protocol.ControlDir(control_dir).persisters())
    events = agent.events()
    if events is not None:
        events.emit(ev.JOB_END, outcome=outcome, status=status)
        try:
            requested = [str(s) for s in parse_specs(os.environ.get(protocol.INJECT_ENV))]
        except FaultSpecError:
            requested = []  # the workers said what is wrong with it
        print_summary(Path(events.path).parent, outcome=outcome, requested=requested)
    if agent.fatal_message:
        print(f"jitckpt: not restarting: {agent.fatal_message}", file=sys.stderr)
    if status == protocol.EXIT_SAVED_AND_STOPPED:
        print(
            "jitckpt: job stopped after saving; run the same command again to resume",
            file=sys.stderr,
        )
    return status
