"""Recording a stage the Prefect flow ran in `dvc.lock`, as `dvc repro` would.

`tuneloop run` runs the same commands as `dvc repro`, but without DVC: unless
each stage is recorded, `dvc status` calls every stage changed and `dvc repro`
reruns them all (registering a duplicate version). `dvc commit` of one stage
hashes its deps, params and outs as they are right after it ran, which is what
`dvc repro` writes after running it; recording stage by stage means an
interrupted flow leaves the finished stages recorded and `dvc repro` resumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
    # `dvc commit` in its own process, run in the project: DVC's Python API resolves paths
    # against the working folder (its run cache even when given the repo's root), and
    # changing this process's folder would move it under every other thread too.
    done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", f"dvc.yaml:{stage}"],
                          cwd=root, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines() or [f"dvc exited with {done.returncode}"]
        print(f"dvc.lock not updated for stage {stage}: {said[-1]}", flush=True)
        return False
    return True


# What a run writes that a user diffs: DVC's record of the stages and the data snapshot's
# pointer, the metrics and plot data, and the settings they came from; and DVC's project
# config (`tuneloop init` writes its remote and offline plots template), so a clone of the
# repository can `dvc pull` (credentials stay in the git-ignored .dvc/config.local).
ITERATION_FILES = ("dvc.lock", "dvc.yaml", "params.yaml", ".gitignore", "metrics", "plots", ".dvc/config",
                   ".dvcignore")


def iteration_paths(root: Path) -> list[str]:
    """The files of one iteration that exist in `root`: ITERATION_FILES and data/raw/*.dvc."""
    found = [name for name in ITERATION_FILES if (root / name).exists()]
    return found + sorted(str(p.relative_to(root)) for p in (root / "data" / "raw").glob("*.dvc"))


def git(root: Path, *args: str):
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def commits_iteration(setting: bool, flag: bool | None, as_params_yaml: bool) -> bool:
    """Whether a run ends by committing its iteration: the run's --commit/--no-commit
    when given (`flag`), else params' `ingest.commit_iterations` (`setting`); never
    for a run whose values are not params.yaml's (--tune, --set), which dvc.lock
    does not record either."""
    return as_params_yaml and (setting if flag is None else flag)


def commit_iteration(root: Path, message: str) -> str:
    """Commits the iteration's files (and nothing else the user staged), as DVC's
    example projects do each iteration, so `dvc metrics diff HEAD~1`,
    `dvc plots diff HEAD~1` and `dvc exp show` compare runs.

    Returns:
        One line saying what happened: the commit, that nothing changed, or why
        it could not commit and the command that would.
    """
    paths = iteration_paths(root)
    command = f"git add {' '.join(paths)} && git commit -m '{message}'"
    top = git(root, "rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve() or not paths:
        return f"not a git repository of its own: to keep this run, `git init` and {command}"
    git(root, "add", "--", *paths)
    if not git(root, "status", "--porcelain", "--", *paths).stdout.strip():
        return "nothing to commit: dvc.lock, metrics/ and plots/ are as the last commit has them"
    done = git(root, "commit", "-q", "-m", message, "--", *paths)
    if done.returncode != 0:
        return f"not committed ({(done.stderr or done.stdout).strip().splitlines()[-1]}); to keep this run: {command}"
    head = git(root, "rev-parse", "--short", "HEAD").stdout.strip()
    return f"committed {', '.join(paths)} as {head}: `dvc metrics diff HEAD~1` compares with the previous run"
