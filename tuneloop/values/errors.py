"""The one base class of the failures a user is expected to fix.

Bad data, bad params, a missing file, a refused rollback: each is a subclass
of `TuneloopError` (and of the built-in type it used to be), so the CLI prints
its message alone, with no traceback, and exits non-zero (`--debug` shows the
traceback). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TuneloopError(Exception):
    """An expected failure: its message names the problem and the fix."""
