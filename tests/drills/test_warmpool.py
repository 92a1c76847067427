"""The warm process pool (jitckpt.launch.warmpool): a client runs a script through a
zygote and behaves, to whoever started it, like the worker itself: same
output, exit status, death by signal, signals passed on; the worker dies with
its client; without a zygote the client starts the script itself.

One zygote serves the whole module. Every process these tests start carries
a JITCKPT_TEST_TAG (forked workers show the zygote's environment, which has
it), so teardown can check that nothing was left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobs import TAG_VAR, TINY, jitckpt_run, kill_tagged, show

from jitckpt.launch import warmpool
from jitckpt.protocol import WARMPOOL_SOCKET_ENV
from jitckpt.testing import proctag

FALLBACK_LINE = "without the warm pool"
# A worker's first line arrives within this many seconds (the module's
# zygote may still be importing torch when the first test runs).
READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def tag() -> Iterator[str]:
    value = uuid.uuid4().hex
    yield value
    kill_tagged(value)


@pytest.fixture(scope="module")
def pool(tag: str) -> Iterator[warmpool.WarmPool]:
    with pytest.MonkeyPatch.context() as patch:
        # The zygote inherits these, as it inherits the launcher's environment.
        patch.setenv("JITCKPT_TEST_TAG", tag)
        patch.setenv("OMP_NUM_THREADS", "1")
        started = warmpool.start_pool()
        assert started is not None
        try:
            yield started
        finally:
            started.close()
    assert not os.path.exists(started.directory)
    assert started.process.returncode == 0
    assert proctag.tagged_pids(TAG_VAR, tag) == [], "the pool left processes behind"


@pytest.fixture
def script(tmp_path: Path) -> Iterator[object]:
    def write(body: str) -> Path:
        path = tmp_path / f"script_{uuid.uuid4().hex[:8]}.py"
        path.write_text(textwrap.dedent(body))
        return path

    yield write


def client_env(pool: warmpool.WarmPool | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(WARMPOOL_SOCKET_ENV, None)
    if pool is not None:
        env[WARMPOOL_SOCKET_ENV] = pool.socket_path
    env.update(extra)
    return env


def start_client(
    pool: warmpool.WarmPool | None, argv: list[str], **kwargs: object
) -> subprocess.Popen[str]:
    env = kwargs.pop("env", None) or client_env(pool)
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, *warmpool.WarmPool.client_args(argv)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # As elastic starts workers: its own session, signalled with killpg.
        start_new_session=True,
        **kwargs,
    )


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


EXITS = {
    "exit0": ("raise SystemExit(0)", 0),
    "exit3": ("raise SystemExit(3)", 3),
    "sigkill": ("os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
    "sigusr1": ("os.kill(os.getpid(), signal.SIGUSR1)", -signal.SIGUSR1),
    "exception": ("raise RuntimeError('boom')", 1),
}


@pytest.mark.parametrize("case", sorted(EXITS))
def test_exit_status_is_mirrored(pool: warmpool.WarmPool, script, case: str) -> None:  # type: ignore[no-untyped-def]
    statement, expected = EXITS[case]
    path = script(f"import os, signal\nprint('before', flush=True)\n{statement}\n")
    proc = start_client(pool, [str(path)])
    out, err = proc.communicate(timeout=READY_TIMEOUT_S)
    assert proc.returncode == expected, err
    assert out == "before\n"
    assert FALLBACK_LINE not in err
    if case == "exception":
        assert "RuntimeError: boom" in err


def test_worker_gets_the_clients_stdio_env_cwd_and_argv(
    pool: warmpool.WarmPool,
    script,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    path = script(
        """
        import json, os, sys
        from jitckpt.detect import signals
        line = sys.stdin.readline()
        print("stderr line", file=sys.stderr)
        umask = os.umask(0)
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        json.dump({
            "stdin": line, "env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv,
            "path0": sys.path[0], "umask": umask, "mechanism": signals.mechanism(),
            "threads": len(os.listdir("/proc/self/task")), "pid": os.getpid(),
            "pgid": os.getpgid(0), "sid": os.getsid(0), "fds": fds,
        }, sys.stdout)
        """
    )
    env = client_env(
        pool,
        RANK="2",
        WORLD_SIZE="4",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29555",
        TORCHELASTIC_RESTART_COUNT="1",
        ODD_VALUE="a b\tc=d ü",
    )
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    proc = start_client(
        pool, [str(path), "--flag", "x y"], env=env, cwd=workdir, umask=0o027, stdin=subprocess.PIPE
    )
    out, err = proc.communicate("hello\n", timeout=READY_TIMEOUT_S)
    assert proc.returncode == 0, err
    seen = json.loads(out)
    assert seen["stdin"] == "hello\n"
    assert err == "stderr line\n"
    # Exactly the client's environment, plus what torch's import sets in a
    # cold worker too (TORCHINDUCTOR_CACHE_DIR).
    assert {key: seen["env"].get(key) for key in env} == env
    assert all(key.startswith("TORCH") for key in seen["env"].keys() - env.keys())
    assert seen["cwd"] == str(workdir)
    assert seen["argv"] == [str(path), "--flag", "x y"]
    assert seen["path0"] == str(path.parent)
    assert seen["umask"] == 0o027
    # The bootstrap ran in the one-threaded child: the preferred mechanism.
    assert seen["mechanism"] == "sigwait" and seen["threads"] == 2
    # A worker of its own, not the client: own session, like elastic's workers.
    assert seen["pid"] != proc.pid and seen["sid"] == seen["pid"] == seen["pgid"]
    # None of the zygote's sockets, pipes, epoll or pidfds leaked into the worker.
    leaked = {
        fd: target
        for fd, target in seen["fds"].items()
        if int(fd) > 2 and target.startswith(("socket:", "pipe:", "anon_inode:"))
    }
    assert leaked == {}


def test_sigterm_to_the_client_reaches_the_worker(
    pool: warmpool.WarmPool,
    script,  # type: ignore[no-untyped-def]
) -> None:
    path = script(
        """
        import os, sys, time
        from jitckpt.detect import signals
        def on_term(signum):
            print("worker got", signum, flush=True)
            os._exit(42)
        signals.set_callback(on_term)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = start_client(pool, [str(path)])
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    os.killpg(proc.pid, signal.SIGTERM)  # what elastic's SubprocessHandler.close does
    out, err = proc.communicate(timeout=30)
    assert out == f"worker got {int(signal.SIGTERM)}\n", err
    assert proc.returncode == 42


def test_killing_the_client_kills_the_worker(
    pool: warmpool.WarmPool,
    script,  # type: ignore[no-untyped-def]
) -> None:
    path = script(
        """
        import os, time
        from jitckpt.detect import signals
        signals.set_callback(lambda signum: None)  # ignores SIGTERM, like a wedged rank
        print(os.getpid(), flush=True)
        time.sleep(60)
        """
    )
    proc = start_client(pool, [str(path)])
    assert proc.stdout is not None
    worker = int(proc.stdout.readline())
    os.killpg(proc.pid, signal.SIGKILL)  # the agent, after the grace
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert wait_gone(worker), f"worker {worker} outlived its client"


def test_fallback_without_a_zygote(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = script(
        """
        import sys
        from jitckpt.detect import signals
        print("cold", signals.mechanism(), sys.argv[1:], flush=True)
        raise SystemExit(5)
        """
    )
    for env in (
        client_env(None, **{WARMPOOL_SOCKET_ENV: str(tmp_path / "missing.sock")}),
        client_env(None),
    ):
        proc = start_client(None, [str(path), "a"], env=env)
        out, err = proc.communicate(timeout=READY_TIMEOUT_S)
        assert proc.returncode == 5, err
        assert out == "cold sigwait ['a']\n"
        assert err.count(FALLBACK_LINE) == 1, err


def test_refused_when_the_start_up_environment_differs(
    pool: warmpool.WarmPool,
    script,  # type: ignore[no-untyped-def]
) -> None:
    path = script("print('ran')\n")
    proc = start_client(pool, [str(path)], env=client_env(pool, PYTHONHASHSEED="123"))
    out, err = proc.communicate(timeout=READY_TIMEOUT_S)
    assert proc.returncode == 0, err
    assert out == "ran\n"
    assert "PYTHONHASHSEED" in err and FALLBACK_LINE in err


def test_the_client_imports_no_torch(pool: warmpool.WarmPool, script) -> None:  # type: ignore[no-untyped-def]
    path = script("print('ok')\n")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *warmpool.WarmPool.client_args([str(path)])],
        env=client_env(pool),
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
    assert "jitckpt" in imported and "socket" in imported  # (warmpool itself runs as __main__)
    heavy = [name for name in imported if name.split(".")[0] in ("torch", "numpy", "torchdata")]
    assert heavy == [] and "jitckpt.checkpoint.jit_checkpoint" not in imported


def test_many_concurrent_workers(pool: warmpool.WarmPool, script) -> None:  # type: ignore[no-untyped-def]
    """Forks from a zygote with torch imported stay reliable, and each worker
    gets its own numpy stream as a cold process would."""
    path = script(
        """
        import numpy as np, torch
        print(float((torch.ones(8, 8) @ torch.ones(8, 8)).sum()), np.random.randint(1 << 62))
        """
    )
    procs = [start_client(pool, [str(path)]) for _ in range(8)]
    outputs = [proc.communicate(timeout=READY_TIMEOUT_S) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, outputs
    draws = [out.split() for out, _ in outputs]
    assert {d[0] for d in draws} == {"512.0"}
    assert len({d[1] for d in draws}) == 8
    # The zygote itself never runs a second thread (fork copies only one).
    assert len(os.listdir(f"/proc/{pool.process.pid}/task")) == 1


def test_zygote_exits_when_the_launcher_dies(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex
    worker_script = script("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n")
    launcher = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from jitckpt.launch import warmpool
        pool = warmpool.start_pool()
        client = subprocess.Popen(
            [sys.executable, *pool.client_args([{str(worker_script)!r}])],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        print(pool.process.pid, client.pid, client.stdout.readline().strip(), pool.directory,
              flush=True)
        time.sleep(60)
        """
    )
    env = client_env(None, JITCKPT_TEST_TAG=tag, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        *pids, directory = proc.stdout.readline().split()
        zygote, client, worker = (int(x) for x in pids)
        proc.kill()  # the launcher dies without cleaning up
        proc.wait()
        # Lifeline EOF: the zygote kills its worker and exits; the client,
        # orphaned like elastic's workers would be, mirrors the worker's death.
        assert wait_gone(zygote) and wait_gone(worker) and wait_gone(client)
        assert proctag.tagged_pids(TAG_VAR, tag) == []
        assert not os.path.exists(directory)  # the zygote removed its socket dir
    finally:
        kill_tagged(tag)
        proc.wait()


def test_a_launch_through_the_pool_leaves_no_process(tmp_path: Path) -> None:
    """A 2-rank job with a kill (so restarted workers are forked too) uses the
    pool and leaves nothing running: the zygote and every worker carry the
    launcher's tag, and all are gone when the launcher returns."""
    launch = jitckpt_run(
        "--recovery", "restart", "--inject", "kill@step=3,rank=1", str(TINY), "--steps", "5", "--run-dir", str(tmp_path / "run"),
        nproc=2, env=client_env(None),
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    assert "resumed from step 3" in launch.output, show(launch)
    assert FALLBACK_LINE not in launch.output
    assert launch.leftovers == [], "the launcher returned while its processes still ran"


@pytest.mark.parametrize("flag", [[], ["--no-warm-pool"]], ids=["pool", "no-pool"])
def test_launcher_flag_chooses_how_workers_start(
    script,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    flag: list[str],
) -> None:
    # A forked worker's /proc/self/cmdline is the zygote's, a cold one's its own.
    path = script(
        """
        with open("/proc/self/cmdline") as handle:
            print("cmdline", handle.read().split("\\0")[1:5], flush=True)
        """
    )
    launch = jitckpt_run(*flag, str(path), nproc=1, timeout=120)
    assert launch.returncode == 0, show(launch)
    expected = "jitckpt.launch.bootstrap" if flag else "jitckpt.launch.warmpool"
    assert f"'-m', '{expected}'" in launch.output, show(launch)
    assert FALLBACK_LINE not in launch.output


def test_a_deep_tmpdir_still_gets_a_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Unix socket's path is limited to 107 bytes: under a TMPDIR too deep
    for it the pool binds its socket in /tmp instead of starting cold."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    started = warmpool.start_pool()
    assert started is not None
    try:
        assert len(os.fsencode(started.socket_path)) <= warmpool.MAX_SOCKET_PATH
        assert os.path.exists(started.socket_path)
    finally:
        started.close()
    assert not os.path.exists(started.directory)
