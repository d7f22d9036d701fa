"""Recording a stage the Prefect flow ran in `dvc.lock`, as `dvc repro` would.

`tuneloop run` runs the same commands as `dvc repro`, but without DVC: unless
each stage is recorded, `dvc status` calls every stage changed and `dvc repro`
reruns them all (registering a duplicate version). `dvc commit` of one stage
hashes its deps, params and outs as they are right after it ran, which is what
`dvc repro` writes after running it; recording stage by stage means an
interrupted flow leaves the finished stages recorded and `dvc repro` resumes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml


def declared_stages(root: Path) -> set[str]:
    """The stage names of the project's dvc.yaml (none without one)."""
    path = root / "dvc.yaml"
    if not path.exists() or not (root / ".dvc").exists():
        return set()
    return set((yaml.safe_load(path.read_text()) or {}).get("stages", {}))


def record_stage(root: Path, stage: str) -> bool:
    """Writes `stage`'s current deps, params and outs into dvc.lock.

    Returns:
        False when the project has no DVC pipeline declaring the stage, or
        DVC could not record it (said on stdout: the stage's work stands,
        `dvc status` will show it changed).
    """
    if stage not in declared_stages(root):
        return False
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)
    here = os.getcwd()
    os.chdir(root)  # DVC resolves a target against the working folder, not the repo's root
    try:
        with Repo(".") as repo:
            repo.commit(f"dvc.yaml:{stage}", force=True)
    except DvcException as error:
        print(f"dvc.lock not updated for stage {stage}: {error}", flush=True)
        return False
    finally:
        os.chdir(here)
    return True
