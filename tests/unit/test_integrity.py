"""Hashes of model files and checkpoints: the pure comparison as a table, and
checkpoints that load without pickle, so a crafted one is refused, never run."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from tuneloop.plumbing.integrity import IntegrityError, check_folder, folder_manifest, manifest_problems
from tuneloop.tasks import finetune as ft

A, B, C = "a" * 64, "b" * 64, "c" * 64


@pytest.mark.parametrize("expected, actual, problems", [
    ({"w.safetensors": A}, {"w.safetensors": A}, []),
    ({"w.safetensors": A}, {"w.safetensors": B},
     [f"w.safetensors: sha256 {B[:12]}... but {A[:12]}... was recorded"]),
    ({"w.safetensors": A, "labels.json": C}, {"w.safetensors": A}, ["labels.json: missing"]),
    ({"adapter_model.safetensors": A}, {"adapter_model.safetensors": A, "model.safetensors": B},
     ["model.safetensors: not recorded for this version"]),
    ({"MLmodel": A}, {"MLmodel": A, "registered_model_meta": B}, []),  # MLflow writes it on models:/ loads
    ({"MLmodel": A}, {"MLmodel": B, "registered_model_meta": B}, [f"MLmodel: sha256 {B[:12]}... but {A[:12]}... was "
                                                                 "recorded"]),
    ({"MLmodel": A}, {"sub/registered_model_meta": B}, ["MLmodel: missing",
                                                        "sub/registered_model_meta: not recorded for this version"]),
])
def test_manifest_problems_name_every_changed_missing_and_extra_file(expected, actual, problems) -> None:
    assert manifest_problems(expected, actual) == problems


def test_folder_manifest_hashes_every_file_by_relative_path(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_bytes(b"[1]")
    (tmp_path / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert folder_manifest(tmp_path) == {"a.json": hashlib.sha256(b"[1]").hexdigest(),
                                         "sub/w.bin": hashlib.sha256(b"\x00\x01").hexdigest()}


def test_check_folder_refuses_one_flipped_byte_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    recorded = folder_manifest(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weightz")
    with pytest.raises(IntegrityError, match="version 7 at .* refusing to load it: adapter_model.safetensors: sha256"):
        check_folder(tmp_path, recorded, "version 7")


# --- checkpoints ---------------------------------------------------------------------------------


class RunsAShellCommand:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_checkpoint_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoints" / ft.CHECKPOINT_FILE
    path.parent.mkdir()
    torch.save({"fingerprint": "run", "state": RunsAShellCommand(marker)}, path)
    # the attacker writes a matching digest too: only loading without pickle stops it
    ft.digest_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(IntegrityError, match="holds more than tensors and numbers"):
        ft.load_checkpoint(path, "run")
    assert not marker.exists()


def test_a_checkpoint_round_trips_as_plain_tensors_and_numbers(tmp_path: Path) -> None:
    path = tmp_path / ft.CHECKPOINT_FILE
    state = ft.TrainState(step=3, best_f1=0.5, best_state={"w": torch.ones(2)}, history=[{"epoch": 1, "f1": 0.5}])
    ft.save_checkpoint(path, {"fingerprint": "run", "state": state.to_plain(), "rng": torch.get_rng_state()})
    loaded = torch.load(path, weights_only=True)  # no pickle needed: plain values only
    restored = ft.TrainState(**loaded["state"])
    assert (restored.step, restored.best_f1, restored.history) == (3, 0.5, [{"epoch": 1, "f1": 0.5}])
    assert torch.equal(restored.best_state["w"], torch.ones(2))
    assert ft.load_checkpoint(path, "another run") is None


def test_a_checkpoint_whose_bytes_changed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ft.CHECKPOINT_FILE
    ft.save_checkpoint(path, {"fingerprint": "run", "w": torch.zeros(64)})
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 does not match the one written with it"):
        ft.load_checkpoint(path, "run")
