"""jitckpt.process_exit through the worker bootstrap: a worker ends as the
script would have (exit status, atexit handlers, non-daemon threads, flushed
output and open files), only without Python's finalization, unless
JITCKPT_FINALIZE=1 asks for it and no registered check says it is unsafe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = """
import atexit, os, sys, threading, time
from jitckpt import process_exit

unsafe = sys.argv[1] == "unsafe"
process_exit.register(lambda: unsafe)
atexit.register(lambda: print("atexit ran", flush=True))

def late():
    time.sleep(0.2)
    print("thread finished")

threading.Thread(target=late).start()


def probe(event, args, write=os.write):
    # Raised by the interpreter's finalization (and by nothing else).
    if event in ("cpython.PyInterpreterState_Clear", "cpython._PySys_ClearAuditHooks"):
        write(1, b"finalized\\n")


sys.addaudithook(probe)
print("buffered", end="")  # flushed only at the end
log = open(sys.argv[3], "w")  # never closed: its buffer is flushed at the end
log.write("kept")
ending = sys.argv[2]
if ending == "exit3":
    sys.exit(3)
if ending == "message":
    sys.exit("stopping: bad flag")
if ending == "raise":
    raise ValueError("boom")
"""


def run_worker(
    tmp_path: Path, unsafe: str, ending: str, finalize: bool = False
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    log = tmp_path / f"log-{unsafe}-{int(finalize)}.txt"
    done = subprocess.run(
        [sys.executable, "-m", "jitckpt.launch.bootstrap", str(script), unsafe, ending, str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PYTHONPATH": str(SRC),
            "PATH": "/usr/bin:/bin",
            **({"JITCKPT_FINALIZE": "1"} if finalize else {}),
        },
    )
    assert log.read_text() == "kept", "the script's unclosed file lost what it wrote"
    return done


@pytest.mark.parametrize(
    ("ending", "status", "stderr_has"),
    [
        ("return", 0, ""),
        ("exit3", 3, ""),
        ("message", 1, "stopping: bad flag"),
        ("raise", 1, "ValueError: boom"),
    ],
)
def test_a_worker_ends_as_the_script_would_without_finalization(
    tmp_path: Path, ending: str, status: int, stderr_has: str
) -> None:
    """The default, and JITCKPT_FINALIZE=1 where finalizing is unsafe, skip
    finalization; JITCKPT_FINALIZE=1 where it is safe does not."""
    normal = run_worker(tmp_path, "safe", ending, finalize=True)
    skipped = run_worker(tmp_path, "safe", ending)
    unsafe = run_worker(tmp_path, "unsafe", ending, finalize=True)
    assert skipped.stdout == unsafe.stdout
    for done in (normal, skipped, unsafe):
        assert done.returncode == status, done.stderr
        assert "buffered" in done.stdout
        assert "thread finished" in done.stdout
        assert "atexit ran" in done.stdout
        assert stderr_has in done.stderr
    # The same output, in the same order, except that one was finalized.
    assert normal.stdout.endswith("finalized\n")
    assert "finalized" not in skipped.stdout
    assert skipped.stdout == normal.stdout.removesuffix("finalized\n")
