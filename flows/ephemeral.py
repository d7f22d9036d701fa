"""Prefect's ephemeral API server, started so that it dies with the command.

Without $PREFECT_API_URL, Prefect starts a temporary API server in a child
process and stops it at exit. A SIGKILLed command runs no exit handler, so
that server would live on, orphaned. Started here instead (from the main
thread, before any flow), the child asks the kernel for SIGTERM when its
parent dies (Linux `PR_SET_PDEATHSIG`); Prefect then reuses this server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from functools import partial
from unittest import mock

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: SIGTERM when `parent` dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request: go now
        os._exit(1)


def start_ephemeral_server() -> int | None:
    """Starts Prefect's ephemeral server tied to this process's life.

    Returns:
        The server's pid, or None when a Prefect API URL is configured (or not on Linux).
    """
    from prefect.settings import get_current_settings

    if get_current_settings().api.url or not sys.platform.startswith("linux"):
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # Prefect's client asks for this same instance later
    if not server.running:
        launch = server._run_uvicorn_command

        def launch_tied_to_us() -> subprocess.Popen:
            tied = partial(subprocess.Popen, preexec_fn=partial(die_with_parent, os.getpid()))
            with mock.patch.object(subprocess, "Popen", tied):
                return launch()

        server._run_uvicorn_command = launch_tied_to_us
        server.start()
    return server.server_process.pid if server.server_process else None
