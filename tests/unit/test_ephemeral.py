"""The ephemeral Prefect server's watcher: whatever ends the command, the server goes too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tuneloop.flows.ephemeral import WATCHER, child_output

# A stand-in "command": starts a watcher for the pid it is given, says so, then waits to be killed.
# A command run from a terminal turns Ctrl-C (SIGINT) into KeyboardInterrupt; one started in the
# background of a script inherits SIGINT ignored, so the command takes the terminal's handling back.
COMMAND = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from tuneloop.flows.ephemeral import stop_with_this_process
stop_with_this_process(int(sys.argv[1]))
print("watching", flush=True)
import time
time.sleep(600)
"""


def gone(process: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_watched_process_is_stopped_once_the_command_ends_however_it_ends(how) -> None:
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    command = subprocess.Popen([sys.executable, "-c", COMMAND, str(server.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert command.stdout.readline().strip() == "watching"
        assert not gone(server, 0.5)  # watched, not stopped, while the command lives
        os.kill(command.pid, how)
        command.wait(timeout=30)
        assert gone(server, 30)
        assert server.returncode == -signal.SIGTERM  # stopped by the watcher's SIGTERM
    finally:
        for process in (command, server):
            if process.poll() is None:
                process.kill()


def test_the_watcher_ignores_a_process_that_is_already_gone() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    watcher = subprocess.run([sys.executable, "-c", WATCHER, str(done.pid)], input=b"", capture_output=True,
                             timeout=30)
    assert (watcher.returncode, watcher.stderr) == (0, b"")


def test_a_process_started_inside_child_output_writes_to_the_log_not_to_the_command(tmp_path, capfd) -> None:
    """The ephemeral server's output (a traceback when it is stopped mid-request) stays out of the terminal."""
    log = tmp_path / "state" / "prefect-server.log"
    print("before", flush=True)
    with child_output(log):
        child = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.5); print('served'); "
                                  "print('Traceback (most recent call last): boom', file=sys.stderr)"])
    print("after", flush=True)
    assert child.wait(timeout=60) == 0
    out, err = capfd.readouterr()
    assert (out.split(), "boom" in err) == (["before", "after"], False)
    assert sorted(log.read_text().splitlines()) == ["Traceback (most recent call last): boom", "served"]


def test_without_a_log_processes_share_the_commands_output(capfd) -> None:
    with child_output(None):
        child = subprocess.Popen([sys.executable, "-c", "print('served')"])
    assert child.wait(timeout=60) == 0
    assert capfd.readouterr().out.split() == ["served"]
