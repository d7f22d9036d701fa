"""register: versions of one model in the MLflow Model Registry.

Every challenger becomes a version, tagged with what made it (data hash, git
commit, base model and its hash, params, metrics). Aliases carry the state:
`champion` is what serves, `previous` is where a rollback goes, `shadow` is a
challenger the service scores beside the champion until monitoring promotes or
discards it. Each alias move is recorded in an audit trail on the registered model.

A registration takes several calls to the MLflow server, and the server can be
lost between any two. A version is therefore created marked `incomplete` (tag
`tuneloop.registration`, set in the same request that creates it) and marked
`complete` only once its files, hashes, lineage tags and reference data are all
written; nothing serves, promotes or rolls back to an incomplete version. Each
version also records which registration made it (`tuneloop.registration_key`),
so running the registration again finishes that version instead of adding one.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tuneloop.plumbing import integrity
from tuneloop.plumbing.tracking import SOURCE_TAGS
from tuneloop.values.errors import TuneloopError

CHAMPION = "champion"
PREVIOUS = "previous"
SHADOW = "shadow"  # a challenger scored beside the champion on live traffic (tasks/shadow.py)
REFERENCE_DIR = "reference"  # run artefact folder holding the version's splits.parquet
MAX_TAG = 4900  # MLflow rejects longer tag values on some backends
REGISTRATION_TAG = "tuneloop.registration"  # INCOMPLETE from the version's creation until every part is written
INCOMPLETE, COMPLETE = "incomplete", "complete"
KEY_TAG = "tuneloop.registration_key"  # on the version and its run: which evaluated challenger and decision made it


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


def version_run_id(name: str, info: VersionInfo) -> str:
    """The MLflow run a version was logged from (every version tuneloop registers has one)."""
    if info.run_id is None:
        raise ValueError(f"version {info.version} of {name} has no MLflow run")
    return info.run_id


def client():
    import mlflow

    return mlflow.MlflowClient()


def as_info(mv) -> VersionInfo:
    return VersionInfo(str(mv.version), mv.run_id, mv.source, dict(mv.tags), tuple(mv.aliases or ()))


class IncompleteVersion(integrity.IntegrityError):
    """A version whose registration did not finish; it is not loaded, promoted or rolled back to."""


def is_complete(tags: dict[str, str]) -> bool:
    """Whether a version's registration finished. A version registered before
    tuneloop marked registrations carries no mark and counts as complete."""
    return tags.get(REGISTRATION_TAG, COMPLETE) == COMPLETE


def check_complete(name: str, info: VersionInfo) -> None:
    """Raises IncompleteVersion unless the version's registration finished."""
    if not is_complete(info.tags):
        raise IncompleteVersion(
            f"version {info.version} of {name} is an unfinished registration ({REGISTRATION_TAG}: "
            f"{info.tags.get(REGISTRATION_TAG)}): its files or tags may be missing, so it is never served, promoted "
            f"or rolled back to; `tuneloop register` run again in its workspace finishes it")


class RegistryUnavailable(TuneloopError, ConnectionError):
    """The MLflow server did not answer; the message says what to do next."""


def unreachable(error: BaseException | None) -> bool:
    """Whether `error` (or one it was raised from or during) means the MLflow
    server did not answer: connection refused or lost, or a timeout. MLflow
    wraps these in an MlflowException after its own retries."""
    import requests

    lost = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, lost):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def server_problem(error: BaseException) -> str:
    """A few words for why the server did not answer (MLflow's own message runs to several lines)."""
    text = " ".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None).lower()
    if "refused" in text:
        return "connection refused"
    return "timed out" if "timed out" in text or "timeout" in text else "connection lost"


@contextmanager
def reachable(doing: str, after: str = "run the command again") -> Iterator[None]:
    """Turns 'the MLflow server did not answer' inside the block into one
    RegistryUnavailable naming the server, what was being done and what to do."""
    try:
        yield
    except RegistryUnavailable:
        raise
    except Exception as error:
        if not unreachable(error):
            raise
        import mlflow

        raise RegistryUnavailable(f"the MLflow server at {mlflow.get_tracking_uri()} did not answer while {doing} "
                                  f"({server_problem(error)}); once it is back, {after}") from error


def ensure_registered_model(name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().get_registered_model(name)
    except MlflowException as error:
        if unreachable(error):
            raise
        client().create_registered_model(name, description="Managed by tuneloop: see tags and aliases.")


def alias_version(name: str, alias: str) -> VersionInfo | None:
    """The version behind an alias, or None when the alias (or model) is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return as_info(client().get_model_version_by_alias(name, alias))
    except MlflowException as error:
        if unreachable(error):  # a lost server is not "no champion"
            raise
        return None


def get_version(name: str, version: str) -> VersionInfo:
    return as_info(client().get_model_version(name, str(version)))


def existing_version(name: str, version: str, refusal: type[Exception]) -> VersionInfo:
    """`get_version`, with an unknown version raised as `refusal` ("NAME has no version V");
    a registry that does not answer is raised as it is, never read as "no such version"."""
    from mlflow.exceptions import MlflowException

    try:
        return get_version(name, version)
    except MlflowException as error:
        if unreachable(error):
            raise
        raise refusal(f"{name} has no version {version}") from None


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
    """The version's classifier folder (what `load_classifier` reads), its whole
    model folder downloaded once into `cache_dir/<version>/model` and checked
    against the file hashes the version recorded, cached or not.

    A version is an MLflow model (`tasks.mlflow_model`): the classifier is its
    `artifacts/classifier`; a version registered before that is the folder itself.

    Raises:
        IntegrityError: the folder's files differ from the recorded hashes
            (a changed cache or registry artefact); nothing is loaded.
        IncompleteVersion: the version's registration did not finish.
    """
    import mlflow.artifacts

    from tuneloop.plumbing.mlflow_model import classifier_folder

    info = get_version(name, version)
    check_complete(name, info)  # before any download: an unfinished version may lack files
    target = Path(cache_dir) / str(version)
    model_dir = target / "model"
    cached = (model_dir / "MLmodel").exists() or (model_dir / "tuneloop.json").exists()
    if not cached:
        target.mkdir(parents=True, exist_ok=True)
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(target)))
    where = f"the cached copy of version {version} of {name} (remove {target} to download it again)" if cached \
        else f"version {version} of {name} as registered ({info.source})"
    integrity.check_version_files(model_dir, info.tags, where)
    return classifier_folder(model_dir)


def version_run(name: str, parent_run_id: str, key: str | None = None) -> str:
    """A new run, child of `parent_run_id` (same experiment), that holds one version's model files."""
    c = client()
    parent = c.get_run(parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items() if k in SOURCE_TAGS or k == "data.md5"}
    tags = {**inherited, "mlflow.parentRunId": parent_run_id, "tuneloop.stage": "register", "tuneloop.model": name}
    if key:
        tags[KEY_TAG] = key
        close_abandoned_runs(parent.info.experiment_id, key)
    return c.create_run(parent.info.experiment_id, run_name="register", tags=tags).info.run_id


def close_abandoned_runs(experiment_id: str, key: str) -> list[str]:
    """Marks KILLED the version runs an earlier attempt at this registration
    opened but never turned into a version (the server was lost mid-upload)."""
    c = client()
    found = c.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'RUNNING'")
    for run in found:
        c.set_tag(run.info.run_id, "tuneloop.outcome", "abandoned: the registration was cut off before its version "
                                                       "was created")
        c.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in found]


def create_version(name: str, run_id: str, model_dir: Path, tags: dict[str, str], reference: Path | None = None,
                   key: str | None = None, description: str | None = None,
                   training_run_id: str | None = None) -> VersionInfo:
    """Registers a copy of the model folder as a new, complete version with its own run.

    Every version gets a run of its own (a child of `run_id`, the pipeline's
    run), so its `model/` artefact folder is written once and never shared:
    registering again, in any order of stages, cannot replace an older
    version's files. The files are copied first and hashed from the copy, so
    the recorded sha256s (tag `model.files`) are those of the uploaded bytes
    even if the folder changes meanwhile. The version is created only after its
    files are uploaded, with every tag, marked incomplete; `finish_version`
    then adds the reference data and marks it complete.

    Args:
        reference: the splits the version learned from (drift monitoring's reference data).
        key: the registration's key (`registration_key`), so a re-run can find this version.
        description: shown on the version's page in the MLflow UI (the model card).
        training_run_id: the run that trained the model (finetune's, or baseline's for
            the probe): the logged model's source run and an output of it; None: the version's run.

    Returns:
        The new version; its `run_id` is the version's own run.
    """
    import shutil
    import tempfile

    c = client()
    ensure_registered_model(name)
    own_run = version_run(name, run_id, key)
    with tempfile.TemporaryDirectory(prefix="tuneloop-register-") as scratch:
        frozen = Path(shutil.copytree(model_dir, Path(scratch) / "model"))
        trained_by = training_run_id or own_run
        logged = logged_model(name, trained_by, frozen, tags) if (frozen / "MLmodel").exists() else None
        manifest = integrity.folder_manifest(frozen)
        if logged is None:  # a bare classifier folder (no MLmodel) stays a run artefact
            c.log_artifacts(own_run, str(frozen), artifact_path="model")
        else:
            c.log_model_artifacts(logged.model_id, str(frozen))
            finish_logged_model(logged.model_id, dict.fromkeys([trained_by, own_run]), tags)
    source = logged.artifact_location if logged else f"{c.get_run(own_run).info.artifact_uri}/model"
    clean = {k: str(v)[:MAX_TAG] for k, v in tags.items()}
    manifest_json = json.dumps(manifest, sort_keys=True)
    if len(manifest_json) > MAX_TAG:
        raise ValueError(f"{model_dir} holds too many files to record their hashes in one tag ({len(manifest)})")
    clean.update({integrity.MANIFEST_TAG: manifest_json, REGISTRATION_TAG: INCOMPLETE})
    if key:
        clean[KEY_TAG] = key
    info = as_info(c.create_model_version(name, source=source, run_id=own_run, tags=clean, description=description,
                                          model_id=logged.model_id if logged else None))
    c.update_run(own_run, name=f"register {name} v{info.version}")
    return finish_version(name, info.version, reference)


def logged_model(name: str, run_id: str, model_dir: Path, tags: dict[str, str]):
    """An MLflow 3 logged model whose source is run `run_id` (the training run), for the MLflow model in
    `model_dir`; its id is written into the folder's MLmodel (before the files are hashed).
    The experiment's Models tab and the runs table's Models column show it."""
    from mlflow.models import Model

    c = client()
    experiment_id = c.get_run(run_id).info.experiment_id
    model = c.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="text-classifier",
                                  tags={k: str(v)[:MAX_TAG] for k, v in tags.items()
                                        if k.startswith(("data.", "base_model.", "git."))},
                                  params={k: v for k, v in tags.items() if k.startswith("tune")} or None)
    mlmodel = Model.load(str(model_dir / "MLmodel"))
    mlmodel.model_id, mlmodel.run_id = model.model_id, run_id
    mlmodel.save(str(model_dir / "MLmodel"))
    return model


def finish_logged_model(model_id: str, run_ids: Iterable[str], tags: dict[str, str]) -> None:
    """The logged model marked ready, listed as an output of each run in `run_ids`
    (training and version runs: the runs table's Models column), with the version's
    test metrics linked to it from the first (the Models tab's metric columns)."""
    import time as clock

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    c, now, run_ids = client(), int(clock.time() * 1000), list(run_ids)
    for run_id in run_ids:
        c.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    metrics = [Metric(k, float(v), now, 0, model_id=model_id, run_id=run_ids[0])
               for k, v in tags.items() if k.startswith("test.")]
    if metrics:
        c.log_batch(run_ids[0], metrics=metrics)
    c.finalize_logged_model(model_id, LoggedModelStatus.READY)


def finish_version(name: str, version: str, reference: Path | None = None) -> VersionInfo:
    """Completes a version: its reference data uploaded, its run closed, then
    marked complete (the last write, so a version marked complete has every part).
    Each step may be repeated: a registration cut off part-way runs it again."""
    c = client()
    info = get_version(name, version)
    if reference is not None:
        c.log_artifact(info.run_id, str(reference), artifact_path=REFERENCE_DIR)
    c.set_terminated(version_run_id(name, info))
    c.set_model_version_tag(name, version, REGISTRATION_TAG, COMPLETE)
    return get_version(name, version)


def registration_key(evaluation: dict, decision: dict) -> str:
    """What identifies one registration: the evaluated challenger (its files'
    hashes are part of the evaluation) and the gate's decision on it. A re-run
    on the same evaluation and decision has the same key; a new finetune,
    evaluate or gate gives a new one."""
    import hashlib

    return hashlib.sha256(json.dumps({"evaluation": evaluation, "decision": decision}, sort_keys=True,
                                     default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RegistrationPlan:
    action: str  # "create" a version, "resume" an incomplete one, or "finish" after a complete one
    version: str | None
    reason: str


def plan_registration(versions: Sequence[VersionInfo], key: str) -> RegistrationPlan:
    """What registering does, given the versions earlier attempts with this key left.

    A complete version is never registered twice: the newest complete one is
    kept. Otherwise the newest incomplete one is finished (its files were
    uploaded before it was created). Without either, a new version is created.
    """
    mine = [v for v in versions if v.tags.get(KEY_TAG) == key]
    complete = [v for v in mine if is_complete(v.tags)]
    if complete:
        return RegistrationPlan("finish", complete[-1].version,
                                f"version {complete[-1].version} already holds this challenger, complete")
    if mine:
        return RegistrationPlan("resume", mine[-1].version,
                                f"version {mine[-1].version} holds this challenger, left incomplete by an "
                                "interrupted registration: finishing it")
    return RegistrationPlan("create", None, "a new version")


def promotion_steps(promote: bool, decided: str | None, champion: str | None, version: str,
                    audited: bool) -> list[str]:
    """What is left of applying the gate's decision to a complete version.

    Args:
        decided: the version's `decision` tag, written last: set, the decision
            was applied and a re-run changes nothing (it must not undo a later rollback).
        champion: the version behind `champion` now.
        audited: the audit trail holds this version's promotion.

    Returns:
        Steps in order, from "move champion", "record audit", "tag promoted", "reject".
    """
    if decided:
        return []
    if not promote:
        return ["reject"]
    if champion != version:
        return ["move champion", "tag promoted"]
    return ([] if audited else ["record audit"]) + ["tag promoted"]


def verified_version(name: str, version: str, cache_dir: Path, fallback_base: str | None = None
                     ) -> tuple[Path, Path | None]:
    """A version's model folder and, for a LoRA adapter or a probe, the base model
    it was trained on, both checked against the hashes the version recorded.

    Args:
        fallback_base: the base model for a version that records none (registered by older code).

    Returns:
        (model folder, base model folder; None for a fully fine-tuned model, which needs no base).

    Raises:
        IntegrityError: a file differs from its recorded hash.
        FileNotFoundError: the version's base model is not on this machine.
    """
    from tuneloop.model.classifier import needs_base
    from tuneloop.plumbing.mlflow_model import carried_base

    model_dir = download_version(name, version, cache_dir)
    if not needs_base(model_dir):
        return model_dir, None
    what = f"version {version} of {name}"
    carried = carried_base(model_dir.parent.parent) if model_dir.parent.name == "artifacts" else None
    return model_dir, integrity.verified_base(get_version(name, version).tags, what, fallback_base, carried)


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


AUDIT_TABLE = "audit.json"  # the audit trail as a table artefact of each register stage run
AUDIT_COLUMNS = ("time", "action", "version", "from", "to", "reason")


def audit_table(entries: Sequence[dict]) -> dict[str, list]:
    """Audit entries ({at, action, from, to, why}) as table columns, one row per
    event; `version` is the version the event moved an alias to (champion; for
    `shadow` the new shadow, for `shadow-discard` the discarded one)."""
    rows = [(e["at"], e["action"], e["to"], e["from"], e["to"], e["why"]) for e in entries]
    return {column: [row[i] for row in rows] for i, column in enumerate(AUDIT_COLUMNS)}


def log_audit_table(name: str, run_id: str) -> dict[str, list]:
    """Logs `name`'s whole audit trail as `audit.json` on `run_id` (`mlflow.log_table`):
    the trail as a table in the run's Artifacts view. The registered model's
    `audit.*` tags stay the record the code reads.

    Returns:
        The table logged.
    """
    table = audit_table(audit_trail(name))
    client().log_table(run_id, data=table, artifact_file=AUDIT_TABLE)
    return table


def move_champion(name: str, to_version: str, action: str, why: str) -> dict:
    """Points `champion` at `to_version`; the version it leaves becomes `previous`.
    A `shadow` alias on `to_version` is removed: a champion is nobody's shadow.

    Returns:
        The audit entry written.

    Raises:
        IncompleteVersion: `to_version`'s registration did not finish; no alias moved.
    """
    c = client()
    old = alias_version(name, CHAMPION)
    if old is not None and old.version == str(to_version):
        raise ValueError(f"version {to_version} of {name} is already the champion")
    check_complete(name, get_version(name, to_version))  # an MLflow error if the version does not exist
    if old is not None:  # `previous` first: cut off here, champion has not moved and a rollback refuses
        c.set_registered_model_alias(name, PREVIOUS, old.version)
    c.set_registered_model_alias(name, CHAMPION, str(to_version))
    shadow = alias_version(name, SHADOW)
    if shadow is not None and shadow.version == str(to_version):
        c.delete_registered_model_alias(name, SHADOW)
    return record_audit(name, action, old.version if old else None, str(to_version), why)


class RollbackError(TuneloopError, ValueError):
    """A rollback that cannot happen; the registry is unchanged."""


def rollback(name: str, to_version: str | None = None, why: str = "manual rollback",
             check: Callable[[str], object] | None = None) -> dict:
    """Moves `champion` back to `previous` (or to `to_version`) in one step.

    The version it leaves becomes `previous`, so a second rollback rolls
    forward again. The move is recorded in the audit trail as `rollback`.

    Args:
        check: called with the target version before the alias moves
            (`tuneloop rollback` passes `verified_version`); an IntegrityError
            or FileNotFoundError it raises refuses the rollback.

    Returns:
        The audit entry written: {at, action, from, to, why}.

    Raises:
        RollbackError: no champion, no previous version (and no `to_version`),
            an unknown version, the target already is the champion, its
            registration did not finish, or it fails `check`.
    """
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
    target = existing_version(name, to_version, RollbackError)
    if not is_complete(target.tags):
        raise RollbackError(f"version {to_version} of {name} is an unfinished registration, version "
                            f"{champion.version} stays champion")
    if check is not None:
        try:
            check(to_version)
        except (integrity.IntegrityError, FileNotFoundError) as error:
            raise RollbackError(f"version {to_version} of {name} cannot serve, version {champion.version} stays "
                                f"champion: {error}") from None
    return move_champion(name, to_version, "rollback", why)


class ShadowError(TuneloopError, ValueError):
    """A version that cannot become the shadow; the registry is unchanged."""


def set_shadow(name: str, version: str, why: str) -> dict | None:
    """Points `shadow` at `version` (a version that was shadow before it stops being one).

    Returns:
        The audit entry written (action `shadow`); None when `version` already is the shadow.

    Raises:
        ShadowError: an unknown version, the champion, or an unfinished registration.
    """
    version = str(version)
    target = existing_version(name, version, ShadowError)
    champion, shadow = alias_version(name, CHAMPION), alias_version(name, SHADOW)
    if champion is not None and champion.version == version:
        raise ShadowError(f"version {version} of {name} already is the champion")
    if not is_complete(target.tags):
        raise ShadowError(f"version {version} of {name} is an unfinished registration")
    if shadow is not None and shadow.version == version:
        return None
    client().set_registered_model_alias(name, SHADOW, version)
    return record_audit(name, "shadow", shadow.version if shadow else None, version, why)


def shadow_started(name: str, version: str) -> float | None:
    """When `version` last became the shadow (seconds since the epoch), from the audit trail."""
    moves = [entry["at"] for entry in audit_trail(name) if entry["action"] == "shadow" and entry["to"] == str(version)]
    if not moves:
        return None
    from datetime import datetime, timezone

    at = moves[-1].rstrip("Z")
    whole, _, fraction = at.partition(".")
    moment = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return moment.timestamp() + float(f"0.{fraction or 0}")


def promote_shadow(name: str, version: str, why: str) -> dict:
    """The shadow becomes champion (the champion it replaces becomes `previous`), audited
    as `shadow-promote`; `move_champion` removes the `shadow` alias; the version is tagged."""
    entry = move_champion(name, version, "shadow-promote", why)
    client().set_model_version_tag(name, version, "shadow.outcome", "promoted")
    return entry


def discard_shadow(name: str, version: str, reasons: list[str]) -> dict:
    """Removes the `shadow` alias, tags the version with why (`shadow.outcome`,
    `shadow.reasons`) and audits it as `shadow-discard`; the champion is untouched."""
    c = client()
    c.delete_registered_model_alias(name, SHADOW)
    c.set_model_version_tag(name, version, "shadow.reasons", "\n".join(reasons)[:MAX_TAG])
    c.set_model_version_tag(name, version, "shadow.outcome", "discarded")
    return record_audit(name, "shadow-discard", str(version), str(version), "; ".join(reasons))


def reject_version(name: str, version: str, reasons: list[str]) -> None:
    c = client()
    c.set_model_version_tag(name, version, "reasons", "\n".join(reasons)[:MAX_TAG])
    c.set_model_version_tag(name, version, "rejected", "true")
    c.set_model_version_tag(name, version, "decision", "rejected")  # last: `decision` says the decision was applied


def last_run(experiment: str) -> dict | None:
    """The newest pipeline run: its outcome, status, data version and new version.
    Stage, version and tuning runs are children of a pipeline run and do not count."""
    import mlflow

    found = mlflow.search_runs(experiment_names=[experiment], max_results=200, order_by=["start_time DESC"],
                               output_format="list")
    run = next((r for r in found if "mlflow.parentRunId" not in r.data.tags), None)
    if run is None:
        return None
    return {"run_id": run.info.run_id, "status": run.info.status,
            "outcome": run.data.tags.get("tuneloop.outcome", "running"),
            "version": run.data.tags.get("tuneloop.version"), "data_md5": run.data.tags.get("data.md5")}


def model_status(name: str, experiment: str) -> dict:
    """What `tuneloop status` prints: the model, its champion, previous and shadow versions and the last run."""
    champion = alias_version(name, CHAMPION)
    previous = alias_version(name, PREVIOUS)
    shadow = alias_version(name, SHADOW)
    described = None
    if champion is not None:
        described = {
            "version": champion.version, "data_md5": champion.tags.get("data.md5"),
            "test": {k.split(".", 1)[1]: float(v) for k, v in champion.tags.items() if k.startswith("test.")},
            "run_id": champion.run_id,
        }
    versions = list_versions(name)
    return {"model": name, "champion": described, "previous": previous.version if previous else None,
            "shadow": shadow.version if shadow else None,
            "versions": len(versions), "incomplete": [v.version for v in versions if not is_complete(v.tags)],
            "last_run": last_run(experiment)}


def download_reference(name: str, version: str, cache_dir: Path) -> Path:
    """The train/validation/test splits a version was trained and tested on
    (splits.parquet, with a `split` column), downloaded once."""
    import mlflow.artifacts

    target = Path(cache_dir) / str(version) / REFERENCE_DIR
    if (target / "splits.parquet").exists():
        return target / "splits.parquet"
    run_id = version_run_id(name, get_version(name, version))
    if not any(f.path == REFERENCE_DIR for f in client().list_artifacts(run_id)):
        run_id = client().get_run(run_id).data.tags.get("mlflow.parentRunId", run_id)  # logged on the pipeline's run
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_DIR,
                                               dst_path=str(target.parent))
    return Path(path) / "splits.parquet"
