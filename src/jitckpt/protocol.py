"""The contract between ``jitckpt run`` (jitckpt.launch) and the workers it
starts: environment variables, the launcher's control directory, the keys
of the c10d store, and exit statuses.

Both sides take these names from here and spell them nowhere else, so a
change of the contract is a change of this file. It imports only the
standard library: the launcher reads it before torch is imported, and so
does the worker bootstrap.

The store's key space, per rendezvous round and restart attempt (see
:func:`attempt_prefix`; a dead attempt's keys are never read again)::

    jitckpt/round_R/attempt_N/
      pid/RANK                      worker pid (written at start; preemption without a launcher)
      restore/choice                rank 0's choice of checkpoint, JSON {name, checksum} or {error}
      hb/RANK                       heartbeat, JSON {t, progress, completed}
      failure                       the first rank of a sharded job to enter its failure path
      jit/sharded/...               the sharded writers' agreement (jitckpt.checkpoint.sharded)
      inproc/capable/RANK           this rank can recover in process
      inproc/generation             counter: the newest recovery generation (the agent adds)
      inproc/notice/G               the agent's notice of recovery G, JSON {generation, dead, t, failure_t}
      inproc/spare/ID               the agent's assignment of spare ID, JSON {rank, local_rank, generation}
      inproc/done/G                 counter: ranks done with recovery G
      inproc/finished/G/RANK        RANK is done with recovery G (names the laggards)
      inproc/step/G                 the step recovery G resumed at (written by its source)
      inproc/progressed/G           counter: ranks that completed that step after recovery G
      inproc/kill/RANK              a survivor asks the agent to kill a hung rank, JSON {generation, by}
      gen_G/...                     the default group formed by recovery G
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

# -- environment set by torch.distributed.elastic for every worker --------------------
RANK_ENV = "RANK"
LOCAL_RANK_ENV = "LOCAL_RANK"
WORLD_SIZE_ENV = "WORLD_SIZE"
MASTER_ADDR_ENV = "MASTER_ADDR"
MASTER_PORT_ENV = "MASTER_PORT"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
RUN_ID_ENV = "TORCHELASTIC_RUN_ID"

# -- environment set by jitckpt run ---------------------------------------------------
# The launcher's private directory on this node (ControlDir below).
CONTROL_DIR_ENV = "JITCKPT_CONTROL_DIR"
# The launcher's pid: a preemption drill signals it, a node fault kills it.
AGENT_PID_ENV = "JITCKPT_AGENT_PID"
# Fault SPECs separated by ";" (jitckpt.inject); tests may set it without the launcher.
INJECT_ENV = "JITCKPT_INJECT"
# "1" when in-process recovery is on (jitckpt.inprocess).
INPROCESS_ENV = "JITCKPT_INPROCESS"
# The rendezvous round of the attempt: membership changes start workers again
# without counting a restart, so the restart count alone can repeat.
RDZV_ROUND_ENV = "JITCKPT_RDZV_ROUND"
# What a process started by the agent is (ROLES), a spare's name in the
# store, and the recovery generation a fresh replacement joins.
ROLE_ENV = "JITCKPT_ROLE"
SPARE_ID_ENV = "JITCKPT_SPARE_ID"
JOIN_GENERATION_ENV = "JITCKPT_JOIN_GENERATION"
# The warm pool's socket (jitckpt.launch.warmpool).
WARMPOOL_SOCKET_ENV = "JITCKPT_WARMPOOL_SOCKET"
# Transparent mode (`jitckpt run --transparent --run-dir DIR [--deterministic]`):
# the run directory it checkpoints to, and "1" for deterministic mode
# (jitckpt.checkpoint.transparent).
TRANSPARENT_RUN_DIR_ENV = "JITCKPT_TRANSPARENT_RUN_DIR"
DETERMINISTIC_ENV = "JITCKPT_DETERMINISTIC"

ROLE_WORKER = "worker"  # an ordinary worker (the default)
ROLE_SPARE = "spare"  # a hot spare waiting for an assignment
ROLE_REPLACEMENT = "replacement"  # a fresh process spawned for a dead rank
ROLES = (ROLE_WORKER, ROLE_SPARE, ROLE_REPLACEMENT)


def role() -> str:
    """This process's role (ROLES)."""
    return os.environ.get(ROLE_ENV, ROLE_WORKER)


def restart_count() -> int:
    """Restart attempt of this worker (0 on the first start)."""
    return int(os.environ.get(RESTART_COUNT_ENV, "0"))


def launch_id() -> str | None:
    """The rendezvous run id: the same on every node of one job."""
    return os.environ.get(RUN_ID_ENV)


# The signal the agent sends the survivors of a failure once it published
# the notice of an in-process recovery (a real-time signal: SIGUSR1/2 are the
# user's, and schedulers send them; real-time ones queue and are not used
# by Python or torch). Workers take it on their signal thread.
NOTICE_SIGNAL = signal.SIGRTMIN + 3


# -- exit statuses ---------------------------------------------------------------------
# A worker that saved (or tried to) after a failure it saw.
EXIT_AFTER_FAILURE = 1
# A worker (and ``jitckpt run``) that stopped after saving because of a
# preemption: EX_TEMPFAIL from sysexits.h, "try again later". Schedulers
# requeue on it; running the same command resumes.
EXIT_SAVED_AND_STOPPED = 75
# A worker that hit an error no restart can fix (a checkpoint that does not
# fit the model, an unusable run directory): EX_CONFIG. The launcher stops
# restarting when a worker reports one (ControlDir.report_fatal).
EXIT_FATAL = 78


# -- the store's key space -------------------------------------------------------------
def attempt_prefix(round_: object, attempt: int) -> str:
    """Keys private to one restart attempt of one rendezvous round."""
    return f"jitckpt/round_{round_}/attempt_{attempt}"


def generation_prefix(attempt_keys: str, generation: int) -> str:
    """Keys of the default group formed by in-process recovery ``generation``."""
    return f"{attempt_keys}/gen_{generation}"


PID_KEY = "pid/{rank}"
RESTORE_CHOICE_KEY = "restore/choice"
HEARTBEAT_KEY = "hb/{rank}"
# Set by the first rank of a sharded model that enters its failure path. Its
# peers may have noticed nothing (a rank that raised before any collective
# broke leaves them blocked in a healthy collective), yet the save of every
# shard needs them: their heartbeat threads watch this key.
FAILURE_KEY = "failure"
SHARDED_KEY = "jit/sharded"
INPROC_CAPABLE_KEY = "inproc/capable/{rank}"
INPROC_GENERATION_COUNTER = "inproc/generation"
INPROC_NOTICE_KEY = "inproc/notice/{generation}"
INPROC_SPARE_KEY = "inproc/spare/{spare}"
INPROC_DONE_COUNTER = "inproc/done/{generation}"
INPROC_RANK_DONE_KEY = "inproc/finished/{generation}/{rank}"
INPROC_STEP_KEY = "inproc/step/{generation}"
INPROC_PROGRESSED_COUNTER = "inproc/progressed/{generation}"
INPROC_KILL_KEY = "inproc/kill/{rank}"


def kill_request(generation: int, by: int) -> str:
    """The value of INPROC_KILL_KEY: rank ``by`` asks during ``generation``."""
    return json.dumps({"generation": generation, "by": by})


def parse_kill_request(value: bytes, rank: int, world_size: int) -> int:
    """The generation of a kill request for ``rank``; raises ValueError,
    saying why, for anything but a request made by another rank of this
    job in the format of :func:`kill_request`. Whoever reaches the store
    can write it, and the agent SIGKILLs a worker on it."""
    try:
        request = json.loads(value.decode())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not JSON: {value[:80]!r}") from None
    if not isinstance(request, dict) or set(request) != {"generation", "by"}:
        raise ValueError(f"not {{generation, by}}: {value[:80]!r}")
    generation, by = request["generation"], request["by"]
    for name, number in (("generation", generation), ("by", by)):
        if type(number) is not int or number < 0:
            raise ValueError(f"{name} is not a count: {number!r}")
    if by >= world_size or by == rank:
        raise ValueError(f"asked by rank {by}, not another rank of this job of {world_size}")
    return int(generation)


# -- the control directory -------------------------------------------------------------
class ControlDir:
    """The launcher's private directory on one node: created by ``jitckpt
    run`` (mode 0700) before any worker starts, removed when it ends.
    Workers leave small files there; the agent and the node fault read them.

    * ``run_dir``: the run directory (the first worker writes it, rank 0
      always): the agent opens the event log there.
    * ``pids/NAME``: the pid of each worker (NAME its rank) and of each
      waiting spare (``spare-ID``): a node fault kills them all.
    * ``saving/LOCAL_RANK``: present while that worker writes its JIT
      checkpoint; the agent's kill grace stretches meanwhile.
    * ``fatal-WHO``: a worker's error that no restart can fix; the agent
      stops restarting and prints it.
    * ``persisters/PID``: a persister a worker started (staging), and the
      run's staging directory: the launcher waits for it at the end of the
      job and then removes the staged copies that are persisted.
    * ``finished/LOCAL_RANK``: that worker completed its training loop; if
      it fails after that (in the script's own code after the loop, or at
      exit), the agent neither restarts nor recovers it: there is no
      training left to save or redo.
    """

    RUN_DIR_FILE = "run_dir"
    PIDS_DIR = "pids"
    SAVING_DIR = "saving"
    FINISHED_DIR = "finished"
    PERSISTERS_DIR = "persisters"
    FATAL_PREFIX = "fatal-"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def from_env(cls) -> ControlDir | None:
        """The launcher's directory, or None outside ``jitckpt run``."""
        path = os.environ.get(CONTROL_DIR_ENV)
        return cls(path) if path else None

    # -- written by workers ------------------------------------------------------------
    def record_pid(self, name: str | int, pid: int) -> None:
        # Published whole (write, then rename): a node fault may read the
        # directory at any moment.
        (self.path / self.PIDS_DIR).mkdir(exist_ok=True)
        target = self.path / self.PIDS_DIR / str(name)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        partial.write_text(str(pid))
        os.replace(partial, target)

    def forget_pid(self, name: str | int) -> None:
        (self.path / self.PIDS_DIR / str(name)).unlink(missing_ok=True)

    def record_run_dir(self, run_dir: Path, *, overwrite: bool) -> None:
        target = self.path / self.RUN_DIR_FILE
        if overwrite or not target.exists():
            target.write_text(str(run_dir.resolve()))

    def mark_saving(self, local_rank: str | int) -> None:
        (self.path / self.SAVING_DIR).mkdir(exist_ok=True)
        (self.path / self.SAVING_DIR / str(local_rank)).touch()

    def mark_finished(self, local_rank: str | int) -> None:
        (self.path / self.FINISHED_DIR).mkdir(exist_ok=True)
        (self.path / self.FINISHED_DIR / str(local_rank)).touch()

    def record_persister(self, pid: int, record: str) -> None:
        (self.path / self.PERSISTERS_DIR).mkdir(exist_ok=True)
        (self.path / self.PERSISTERS_DIR / str(pid)).write_text(record)

    def report_fatal(self, who: str | int, message: str) -> None:
        (self.path / f"{self.FATAL_PREFIX}{who}").write_text(message)

    # -- read by the launcher ----------------------------------------------------------
    def run_dir(self) -> str | None:
        target = self.path / self.RUN_DIR_FILE
        return target.read_text().strip() if target.exists() else None

    def pids(self) -> list[int]:
        found = []
        for entry in sorted((self.path / self.PIDS_DIR).glob("[!.]*")):
            try:
                found.append(int(entry.read_text()))
            except (OSError, ValueError):
                continue  # gone meanwhile (a spare that was just assigned)
        return found

    def persisters(self) -> dict[int, str]:
        """The persisters workers started, each with what its worker recorded
        of its run's staging (jitckpt.storage.staging.Staging.record)."""
        found = {}
        for entry in sorted((self.path / self.PERSISTERS_DIR).glob("[!.]*")):
            try:
                found[int(entry.name)] = entry.read_text()
            except (OSError, ValueError):
                continue
        return found

    def is_saving(self, local_rank: str | int) -> bool:
        return (self.path / self.SAVING_DIR / str(local_rank)).exists()

    def finished(self, local_rank: str | int) -> bool:
        return (self.path / self.FINISHED_DIR / str(local_rank)).exists()

    def clear_attempt_markers(self) -> None:
        """Forget the last workers' saving and finished markers (new
        workers start)."""
        import shutil

        for name in (self.SAVING_DIR, self.FINISHED_DIR):
            shutil.rmtree(self.path / name, ignore_errors=True)

    def fatal_messages(self) -> list[str]:
        return [p.read_text() for p in sorted(self.path.glob(f"{self.FATAL_PREFIX}*"))]
