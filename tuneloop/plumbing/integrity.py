"""Integrity of model files: what a version's weights hash to, and the check
that refuses to load anything else.

A registered version records the sha256 of every file of its model folder
(tag `model.files`) and of its base model's weights (tag `base_model.sha256`);
whatever loads a version (evaluate's champion, serving, rollback) checks the
bytes it is about to load against them first. The decisions are pure functions
returning their reasons (`manifest_problems`); the checks raise IntegrityError
with those reasons.

Imports only the standard library and `tasks.classifier` (for finding a base
model folder), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Mapping

from tuneloop.values.errors import TuneloopError

log = logging.getLogger("tuneloop.integrity")

MANIFEST_TAG = "model.files"  # JSON {relative path: sha256} of every file of the version's model folder
BASE_NAME_TAG, BASE_PATH_TAG, BASE_SHA_TAG = "base_model.name", "base_model.path", "base_model.sha256"
WEIGHT_SUFFIXES = {".safetensors", ".bin"}
# Files MLflow itself writes into a registered version's folder, beside the recorded ones:
# `mlflow.pyfunc.load_model("models:/<name>@champion")` on a local store writes
# `registered_model_meta` (the model's name and version, YAML) into the version's artefact
# folder itself. Nothing tuneloop loads reads it, so it is tolerated with a warning naming it;
# every recorded file must still be there unchanged, and any other unrecorded file is refused.
MLFLOW_ADDED = frozenset({"registered_model_meta"})


class IntegrityError(TuneloopError, ValueError):
    """Files differ from the hashes recorded for them; nothing was loaded."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_manifest(folder: Path) -> dict[str, str]:
    """{path relative to `folder` (POSIX): sha256} of every file under it, sorted by path."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def base_weights_sha256(model_dir: Path) -> str:
    """SHA-256 over a base model's weight files (safetensors/bin at the top of
    the folder, name then bytes, in name order): the `base_model.sha256` tag,
    computed as versions registered before this module recorded it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def added_by_mlflow(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """The unrecorded files found that MLflow itself writes beside a version's files (MLFLOW_ADDED)."""
    return sorted(name for name in set(actual) - set(expected) if name in MLFLOW_ADDED)


def manifest_problems(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Every difference between recorded and found hashes, one reason each
    (empty: identical but for files MLflow adds, `added_by_mlflow`). A missing
    or an extra file is a difference too: an added `model.safetensors` would
    change what loads."""
    problems = [f"{name}: sha256 {actual[name][:12]}... but {expected[name][:12]}... was recorded"
                for name in sorted(expected) if name in actual and actual[name] != expected[name]]
    problems += [f"{name}: missing" for name in sorted(set(expected) - set(actual))]
    tolerated = set(added_by_mlflow(expected, actual))
    problems += [f"{name}: not recorded for this version" for name in sorted(set(actual) - set(expected) - tolerated)]
    return problems


def recorded_manifest(tags: Mapping[str, str]) -> dict[str, str] | None:
    """The file hashes a version's tags record, or None for a version registered without them."""
    raw = tags.get(MANIFEST_TAG)
    return json.loads(raw) if raw else None


def check_folder(folder: Path, expected: Mapping[str, str], what: str) -> None:
    """Raises IntegrityError naming `what`, the folder and every differing file;
    warns naming the files MLflow added beside the recorded ones."""
    actual = folder_manifest(folder)
    problems = manifest_problems(expected, actual)
    if problems:
        raise IntegrityError(f"{what} at {folder} does not match its recorded sha256 hashes, refusing to load it: "
                             + "; ".join(problems))
    added = added_by_mlflow(expected, actual)
    if added:
        log.warning("%s at %s also holds %s, written by MLflow when the version was loaded through models:/ "
                    "(not recorded, and nothing tuneloop loads reads it): every recorded file matches, loading it",
                    what, folder, ", ".join(added))


def check_version_files(folder: Path, tags: Mapping[str, str], what: str) -> None:
    """Checks a version's model folder against its `model.files` tag.

    A version registered before hashes were recorded has nothing to check
    against: it loads with a warning saying so.
    """
    expected = recorded_manifest(tags)
    if expected is None:
        log.warning("%s records no file hashes (registered before tuneloop recorded them): loading it unverified",
                    what)
        return
    check_folder(folder, expected, what)


def locate_base(tags: Mapping[str, str], fallback: str | None = None, carried: Path | None = None) -> Path:
    """The base model folder a version was trained on: the copy it carries
    (`carried`, inside its MLflow model), else its recorded path when that
    folder is here, else its recorded name (or `fallback`, for versions that
    record none) resolved on this machine.

    Raises:
        FileNotFoundError: the version's base model is not on this machine.
    """
    from tuneloop.model.classifier import resolve_model_path

    if carried is not None:
        return Path(carried)
    recorded_path = tags.get(BASE_PATH_TAG)
    if recorded_path and (Path(recorded_path) / "config.json").exists():
        return Path(recorded_path)
    name = tags.get(BASE_NAME_TAG) or fallback
    try:
        if name:
            return resolve_model_path(name)
    except (FileNotFoundError, ImportError):
        pass
    raise FileNotFoundError(f"the base model this version was trained on is not on this machine: name {name!r}, "
                            f"recorded path {recorded_path!r}, sha256 {tags.get(BASE_SHA_TAG)!r}; install it "
                            f"or copy it to that path")


def verified_base(tags: Mapping[str, str], what: str, fallback: str | None = None, carried: Path | None = None
                  ) -> Path:
    """`locate_base`, then its weights checked against the recorded `base_model.sha256`.

    Raises:
        FileNotFoundError: the base model is not on this machine.
        IntegrityError: its weights are not the ones the version was trained on.
    """
    base = locate_base(tags, fallback, carried)
    expected = tags.get(BASE_SHA_TAG)
    if not expected:
        log.warning("%s records no base model hash: %s loads unverified", what, base)
        return base
    found = base_weights_sha256(base)
    if found != expected:
        raise IntegrityError(f"{what} was trained on base model {tags.get(BASE_NAME_TAG)!r} with weights sha256 "
                             f"{expected[:12]}..., but {base} has {found[:12]}...: refusing to load it on other "
                             f"base weights")
    return base
