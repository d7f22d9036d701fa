"""Prefect's ephemeral API server, started so that it dies with the command.

Without $PREFECT_API_URL, Prefect starts a temporary API server in a child
process and stops it at exit. A SIGKILLed command runs no exit handler, so
that server would live on, orphaned. Started here instead (from the main
thread, before any flow, with Prefect's own `SubprocessASGIServer`, which its
client then reuses), and watched by a small process that holds the read end
of a pipe only this command writes to: when the command ends in any way, even
SIGKILL, the kernel closes the pipe and the watcher stops the server. No
Prefect internals are patched, and it works wherever pipes do (not only Linux).
The server writes its output to a log file of the project, not to the command's
terminal: a server stopped mid-request at exit may log a traceback, which is no
business of a user whose command ended with a clear message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Waits for the pipe from the command to close (the command is gone), then stops the server.
WATCHER = """
import os, signal, sys
sys.stdin.buffer.read()
try:
    os.kill(int(sys.argv[1]), signal.SIGTERM)
except (ProcessLookupError, PermissionError):
    pass
"""

WATCHERS: list[subprocess.Popen] = []  # held for the command's life: their pipes close only when it ends


def stop_with_this_process(pid: int) -> subprocess.Popen:
    """A watcher that sends SIGTERM to `pid` once this process has ended, however it ended.

    Its own session, so a Ctrl-C to the command's process group does not stop it first;
    no stdout or stderr of ours, so a pipe reading the command's output ends with the command."""
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(pid)], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    WATCHERS.append(watcher)
    return watcher


@contextmanager
def child_output(log: Path | None) -> Iterator[None]:
    """Processes started inside the block write their stdout and stderr to `log` (appended)
    instead of this command's: file descriptors 1 and 2 point at it while they start.
    None: they share the command's."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with open(log, "ab") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def start_ephemeral_server(log: Path | None = None) -> int | None:
    """Starts Prefect's ephemeral server tied to this process's life, its output going to `log`.

    Returns:
        The server's pid, or None when a Prefect API URL is configured.
    """
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # Prefect's client asks for this same instance later
    if not server.running:
        with child_output(log):
            server.start()
        if server.server_process is not None:
            stop_with_this_process(server.server_process.pid)
    return server.server_process.pid if server.server_process else None
