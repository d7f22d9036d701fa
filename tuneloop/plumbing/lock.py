"""lock: one writer per project at a time.

`tuneloop run`, every stage command that writes, `rollback`, `monitor`,
`incoming` and the retrain flow itself hold `state/project.lock` (an fcntl
lock: the kernel releases it when the holder dies, even by SIGKILL, so a
crashed run never leaves the project locked). A second writer waits up to
`wait_seconds` and then refuses, naming who holds the lock. The lock is
re-entrant within one process: the CLI's `run` holds it and the flow it starts
takes it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterator

from tuneloop.values.workspace import Workspace

WAIT_VARIABLE = "TUNELOOP_LOCK_WAIT"  # seconds a writer waits for the lock before refusing (default 0)
_held: dict[Path, tuple[IO, int]] = {}  # lock path -> (open file, depth) for this process
_guard = threading.Lock()


class ProjectBusy(RuntimeError):
    """Another process is writing to the project; nothing was done."""


def lock_path(root: Path) -> Path:
    return Workspace(Path(root).resolve()).project_lock


def holder(path: Path) -> dict:
    """What the current holder wrote into the lock file ({} if unreadable)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def busy_message(path: Path, command: str, waited: float) -> str:
    who = holder(path)
    held_by = (f"`tuneloop {who.get('command', '?')}` (pid {who.get('pid', '?')} on {who.get('host', '?')}, "
               f"since {who.get('since', '?')})") if who else "another process"
    waited_for = f" after waiting {waited:.0f}s" if waited else ""
    return (f"{command} refused{waited_for}: {held_by} is writing to this project ({path}). Wait for it to "
            f"finish, or set {WAIT_VARIABLE}=SECONDS to wait for it")


def wait_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(WAIT_VARIABLE, "0")))
    except ValueError:
        return 0.0


@contextmanager
def project_lock(root: Path, command: str, wait: float | None = None) -> Iterator[Path]:
    """Holds the project's writer lock for the block.

    Args:
        command: what holds it, shown to a writer that is refused.
        wait: seconds to wait for a busy lock (None: $TUNELOOP_LOCK_WAIT, default 0).

    Raises:
        ProjectBusy: the lock stayed busy; names the holder.
    """
    path = lock_path(root)
    with _guard:
        if path in _held:  # this process already holds it: re-enter
            handle, depth = _held[path]
            _held[path] = (handle, depth + 1)
            acquired = False
        else:
            acquired = True
    if acquired:
        handle = acquire(path, command, wait_seconds() if wait is None else wait)
        with _guard:
            _held[path] = (handle, 1)
    try:
        yield path
    finally:
        with _guard:
            handle, depth = _held[path]
            if depth > 1:
                _held[path] = (handle, depth - 1)
            else:
                del _held[path]
                release(handle)


def acquire(path: Path, command: str, wait: float) -> IO:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")  # "a+": opening never truncates what the holder wrote
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            waited = time.monotonic() - started
            if waited >= wait:
                handle.close()
                raise ProjectBusy(busy_message(path, command, waited if wait else 0)) from None
            time.sleep(min(0.2, wait - waited))
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    handle.flush()
    return handle


def release(handle: IO) -> None:
    handle.seek(0)
    handle.truncate()
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
