"""register: versions of one model in the MLflow Model Registry.

Every challenger becomes a version, tagged with what made it (data hash, git
commit, base model and its hash, params, metrics). Aliases carry the state:
`champion` is what serves, `previous` is where a rollback goes. Each alias move
is recorded in an audit trail on the registered model.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.errors import TuneloopError

CHAMPION = "champion"
PREVIOUS = "previous"
REFERENCE_DIR = "reference"  # run artefact folder holding the version's splits.parquet
MAX_TAG = 4900  # MLflow rejects longer tag values on some backends


# Tags are text anyone with registry access can write; these formats are checked before a
# tag becomes part of a path or a command (a data.md5 of "../../x" must never name a folder).
TAG_FORMATS = {
    "data.md5": re.compile(r"^[0-9a-f]{32}$"),  # DVC's md5 of the snapshot
    "data.size": re.compile(r"^[0-9]{1,15}$"),  # bytes
    "data.path": re.compile(r"^(?!.*(?:^|/)\.\.?(?:/|$))[A-Za-z0-9._+/-]{1,255}$"),  # relative, no . or .. parts
}
VERSION = re.compile(r"^[1-9][0-9]{0,8}$")  # registry versions are positive integers


class TagError(ValueError):
    """A version's tag, or a version number, is not in its format; nothing was used."""


def checked_version(version: str) -> str:
    """Raises TagError unless `version` is a registry version number."""
    if not VERSION.match(str(version)):
        raise TagError("a version is a positive whole number (as `tuneloop status` shows)")
    return str(version)


def checked_tags(tags: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The named tags, each checked against TAG_FORMATS.

    Raises:
        TagError: naming each missing or malformed tag (its value is not repeated).
    """
    problems = [f"{name} is missing" if name not in tags else f"{name} is not in its format"
                for name in names if name not in tags or not TAG_FORMATS[name].match(str(tags[name]))]
    if problems:
        raise TagError("; ".join(problems))
    return {name: str(tags[name]) for name in names}


@dataclass(frozen=True)
class VersionInfo:
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]
    aliases: tuple[str, ...]


def client():
    import mlflow

    return mlflow.MlflowClient()


def as_info(mv) -> VersionInfo:
    return VersionInfo(str(mv.version), mv.run_id, mv.source, dict(mv.tags), tuple(mv.aliases or ()))


def ensure_registered_model(name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().get_registered_model(name)
    except MlflowException:
        client().create_registered_model(name, description="Managed by tuneloop: see tags and aliases.")


def alias_version(name: str, alias: str) -> VersionInfo | None:
    """The version behind an alias, or None when the alias (or model) is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return as_info(client().get_model_version_by_alias(name, alias))
    except MlflowException:
        return None


def get_version(name: str, version: str) -> VersionInfo:
    return as_info(client().get_model_version(name, str(version)))


def list_versions(name: str) -> list[VersionInfo]:
    """Every version, oldest first, with its aliases (a version search does not return them)."""
    found = client().search_model_versions(f"name = '{name}'")
    if not found:
        return []
    aliases: dict[str, list[str]] = {}
    for alias, version in (client().get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    infos = (replace(as_info(mv), aliases=tuple(sorted(aliases.get(str(mv.version), ())))) for mv in found)
    return sorted(infos, key=lambda v: int(v.version))


def download_version(name: str, version: str, cache_dir: Path) -> Path:
    """The version's model folder, downloaded once into `cache_dir/<version>`."""
    import mlflow

    target = Path(cache_dir) / str(version)
    if (target / "model" / "tuneloop.json").exists():
        return target / "model"
    target.mkdir(parents=True, exist_ok=True)
    source = get_version(name, version).source
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target)))


def create_version(name: str, run_id: str, model_dir: Path, tags: dict[str, str]) -> VersionInfo:
    """Uploads the model folder to the run's artefacts and registers it."""
    c = client()
    ensure_registered_model(name)
    c.log_artifacts(run_id, str(model_dir), artifact_path="model")
    source = f"{c.get_run(run_id).info.artifact_uri}/model"
    clean = {k: str(v)[:MAX_TAG] for k, v in tags.items()}
    return as_info(c.create_model_version(name, source=source, run_id=run_id, tags=clean))


def audit_trail(name: str) -> list[dict]:
    """Alias moves, oldest first: {at, action, from, to, why}."""
    tags = client().get_registered_model(name).tags
    entries = [json.loads(v) for k, v in tags.items() if k.startswith("audit.")]
    return sorted(entries, key=lambda e: e["at"])


def record_audit(name: str, action: str, from_version: str | None, to_version: str, why: str) -> dict:
    now = time.time_ns()  # one clock reading: seconds and fraction must come from the same instant
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}Z",
             "action": action, "from": from_version, "to": str(to_version), "why": why[:1000]}
    client().set_registered_model_tag(name, f"audit.{now}", json.dumps(entry))
    return entry


def move_champion(name: str, to_version: str, action: str, why: str) -> dict:
    """Points `champion` at `to_version`; the version it leaves becomes `previous`.

    Returns:
        The audit entry written.
    """
    c = client()
    old = alias_version(name, CHAMPION)
    if old is not None and old.version == str(to_version):
        raise ValueError(f"version {to_version} of {name} is already the champion")
    get_version(name, to_version)  # fails with a clear MLflow error if the version does not exist
    if old is not None:
        c.set_registered_model_alias(name, PREVIOUS, old.version)
    c.set_registered_model_alias(name, CHAMPION, str(to_version))
    return record_audit(name, action, old.version if old else None, str(to_version), why)


class RollbackError(TuneloopError, ValueError):
    """A rollback that cannot happen; the registry is unchanged."""


def rollback(name: str, to_version: str | None = None, why: str = "manual rollback") -> dict:
    """Moves `champion` back to `previous` (or to `to_version`) in one step.

    The version it leaves becomes `previous`, so a second rollback rolls
    forward again. The move is recorded in the audit trail as `rollback`.

    Returns:
        The audit entry written: {at, action, from, to, why}.

    Raises:
        RollbackError: no champion, no previous version (and no `to_version`),
            an unknown version, or the target already is the champion.
    """
    from mlflow.exceptions import MlflowException

    champion = alias_version(name, CHAMPION)
    if champion is None:
        raise RollbackError(f"{name} has no champion to roll back from")
    if to_version is None:
        previous = alias_version(name, PREVIOUS)
        if previous is None:
            raise RollbackError(f"{name} has no `{PREVIOUS}` version to roll back to; name one with --to VERSION")
        to_version = previous.version
    to_version = str(to_version)
    if to_version == champion.version:
        raise RollbackError(f"version {to_version} of {name} already is the champion")
    try:
        get_version(name, to_version)
    except MlflowException:
        raise RollbackError(f"{name} has no version {to_version}") from None
    return move_champion(name, to_version, "rollback", why)


def reject_version(name: str, version: str, reasons: list[str]) -> None:
    c = client()
    c.set_model_version_tag(name, version, "decision", "rejected")
    c.set_model_version_tag(name, version, "rejected", "true")
    c.set_model_version_tag(name, version, "reasons", "\n".join(reasons)[:MAX_TAG])


def last_run(experiment: str) -> dict | None:
    """The newest pipeline run: its outcome, status, data version and new version."""
    import mlflow

    found = mlflow.search_runs(experiment_names=[experiment], max_results=1, order_by=["start_time DESC"],
                               output_format="list")
    if not found:
        return None
    run = found[0]
    return {"run_id": run.info.run_id, "status": run.info.status,
            "outcome": run.data.tags.get("tuneloop.outcome", "running"),
            "version": run.data.tags.get("tuneloop.version"), "data_md5": run.data.tags.get("data.md5")}


def model_status(name: str, experiment: str) -> dict:
    """What `tuneloop status` prints: the model, its champion and the last run."""
    champion = alias_version(name, CHAMPION)
    previous = alias_version(name, PREVIOUS)
    described = None
    if champion is not None:
        described = {
            "version": champion.version, "data_md5": champion.tags.get("data.md5"),
            "test": {k.split(".", 1)[1]: float(v) for k, v in champion.tags.items() if k.startswith("test.")},
            "run_id": champion.run_id,
        }
    return {"model": name, "champion": described, "previous": previous.version if previous else None,
            "versions": len(list_versions(name)), "last_run": last_run(experiment)}


def download_reference(name: str, version: str, cache_dir: Path) -> Path:
    """The train/validation/test splits a version was trained and tested on
    (splits.parquet, with a `split` column), downloaded once."""
    import mlflow

    target = Path(cache_dir) / str(version) / REFERENCE_DIR
    if (target / "splits.parquet").exists():
        return target / "splits.parquet"
    run_id = get_version(name, version).run_id
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_DIR,
                                               dst_path=str(target.parent))
    return Path(path) / "splits.parquet"
