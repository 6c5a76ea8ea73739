"""The tests' subprocess helper (`conftest.run_command`): a command that hangs fails its test
with the Python stacks of all its processes, and leaves none of them running."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_command

HANGS = """
import multiprocessing as mp, os, sys, time

def child_waits_forever(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(600)

def parent_waits_forever():
    time.sleep(600)

if __name__ == "__main__":
    mp.set_start_method("forkserver")
    mp.Process(target=child_waits_forever, args=(sys.argv[1],)).start()
    parent_waits_forever()
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def test_a_hung_command_fails_with_every_process_stack_and_leaves_nothing_running(tmp_path):
    script, pid_file = tmp_path / "hangs.py", tmp_path / "child.pid"
    script.write_text(HANGS)
    with pytest.raises(pytest.fail.Exception) as failed:
        run_command([sys.executable, str(script), str(pid_file)], timeout=5, cwd=tmp_path)
    message = str(failed.value)
    assert "ran past 5 s" in message
    assert "in parent_waits_forever" in message and "in child_waits_forever" in message
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def test_a_command_that_ends_returns_its_output_and_status(tmp_path):
    done = run_command([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"])
    assert (done.returncode, done.stdout) == (3, "out\n")
