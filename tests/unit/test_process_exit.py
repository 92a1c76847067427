"""jitckpt.process_exit through the worker bootstrap: when a registered check
says finalization is unsafe, the worker still ends as the script would have
(exit status, atexit handlers, non-daemon threads, flushed output), only
without Python's finalization."""

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


class Probe:  # says when the interpreter's finalization frees it
    def __del__(self, write=os.write):
        write(1, b"finalized\\n")


sys.jitckpt_probe = Probe()
print("buffered", end="")  # flushed only at the end
ending = sys.argv[2]
if ending == "exit3":
    sys.exit(3)
if ending == "message":
    sys.exit("stopping: bad flag")
if ending == "raise":
    raise ValueError("boom")
"""


def run_worker(tmp_path: Path, unsafe: str, ending: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, "-m", "jitckpt.launch.bootstrap", str(script), unsafe, ending],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("ending", "status", "stderr_has"),
    [
        ("return", 0, ""),
        ("exit3", 3, ""),
        ("message", 1, "stopping: bad flag"),
        ("raise", 1, "ValueError: boom"),
    ],
)
def test_an_unsafe_worker_ends_as_the_script_would(
    tmp_path: Path, ending: str, status: int, stderr_has: str
) -> None:
    normal = run_worker(tmp_path, "safe", ending)
    skipped = run_worker(tmp_path, "unsafe", ending)
    for done in (normal, skipped):
        assert done.returncode == status, done.stderr
        assert "buffered" in done.stdout
        assert "thread finished" in done.stdout
        assert "atexit ran" in done.stdout
        assert stderr_has in done.stderr
    # The same output, in the same order, except that one was finalized.
    assert normal.stdout.endswith("finalized\n")
    assert "finalized" not in skipped.stdout
    assert skipped.stdout == normal.stdout.removesuffix("finalized\n")
