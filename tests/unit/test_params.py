"""params.yaml: the shipped file loads, mistakes are named, and dvc.yaml agrees with the code."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from tuneloop.pipeline.params import Params, ParamsError, apply_overrides, load_params, parse_params
from tuneloop.tasks.gate import GateConfig

PROJECT = Path(__file__).resolve().parents[2]
PARAMS_YAML = PROJECT / "params.yaml"
DVC_YAML = PROJECT / "dvc.yaml"


@pytest.fixture(scope="module")
def shipped_raw() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text())


@pytest.fixture
def raw(shipped_raw: dict) -> dict:
    """A fresh, editable copy of the shipped params mapping."""
    return copy.deepcopy(shipped_raw)


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    # `${ingest.source}` is DVC templating; only keys are read here
    return yaml.safe_load(DVC_YAML.read_text())["stages"]


def section_names() -> set[str]:
    """The YAML keys Params accepts (aliases where a field has one)."""
    return {field.alias or name for name, field in Params.model_fields.items()}


def error_of(raw: dict) -> str:
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    return str(error.value)


# --- the shipped file ---------------------------------------------------------------------


def test_shipped_params_yaml_loads_with_its_values(shipped_raw: dict) -> None:
    params = load_params(PARAMS_YAML)
    assert params.model.base == shipped_raw["model"]["base"]
    assert params.ingest.exclude_labels == ("neutral",)
    assert params.ingest.length_slices == (10, 25)
    assert params.split.seed == shipped_raw["split"]["seed"]
    assert params.finetune.method == shipped_raw["finetune"]["method"]
    assert params.finetune.target_modules == shipped_raw["finetune"]["target_modules"] == "all-linear"
    assert params.evaluate.slice_columns is None
    assert params.gate == GateConfig(**shipped_raw["gate"])
    assert params.mlflow.tracking_uri is None


# The two settings that describe the shipped movie reviews rather than any project:
# 37 `neutral` rows are left out, and the label set is pinned to what remains.
SHIPPED_DATA_SETTINGS = {"ingest.exclude_labels": ("neutral",), "validate.labels": ("negative", "positive")}


def differences(left: Params, right: Params) -> dict[str, tuple]:
    """`section.key` -> (left value, right value) for every setting that differs."""
    out = {}
    for name, field in Params.model_fields.items():
        a, b = getattr(left, name), getattr(right, name)
        for key in vars(a):
            if getattr(a, key) != getattr(b, key):
                out[f"{field.alias or name}.{key}"] = (getattr(a, key), getattr(b, key))
    return out


def test_shipped_params_yaml_says_what_the_code_defaults_say(shipped_raw: dict) -> None:
    """Defaults are written once (tuneloop/values/config.py); params.yaml repeats them for the reader,
    and only the shipped data's own settings may differ."""
    shipped = parse_params(shipped_raw)
    assert {key: right for key, (_, right) in differences(Params(), shipped).items()} == SHIPPED_DATA_SETTINGS


def test_shipped_params_name_every_section(shipped_raw: dict) -> None:
    assert set(shipped_raw) == section_names()


def test_validate_yaml_key_maps_to_params_labels(raw: dict) -> None:
    raw["validate"]["labels"] = ["bad", "good", "meh"]
    params = parse_params(raw)
    assert params.declared_labels == ("bad", "good", "meh")
    assert params.validate_.labels == params.declared_labels


@pytest.mark.parametrize("value", ["auto", None])
def test_labels_auto_or_null_read_the_label_set_from_the_data(raw: dict, value) -> None:
    raw["validate"]["labels"] = value
    params = parse_params(raw)
    assert params.validate_.labels == "auto" and params.declared_labels is None


def test_a_label_list_in_block_style_holds_labels_yaml_flow_style_would_break(tmp_path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("validate:\n  labels:\n    - what time is it?\n    - 'yes: please'\n")
    assert load_params(path).declared_labels == ("what time is it?", "yes: please")


def test_labels_given_as_another_word_than_auto_are_refused(raw: dict) -> None:
    raw["validate"]["labels"] = "all"
    assert "labels must be `auto` or a list of labels" in error_of(raw)


def test_empty_params_give_every_default() -> None:
    assert parse_params({}) == Params()
    assert parse_params(None) == Params()


# --- mistakes are named -----------------------------------------------------------------------


def test_unknown_key_in_a_section_is_named(raw: dict) -> None:
    raw["finetune"]["lora_rank"] = 8
    assert "finetune.lora_rank" in error_of(raw)


def test_unknown_top_level_section_is_named(raw: dict) -> None:
    raw["trainer"] = {"epochs": 3}
    message = error_of(raw)
    assert message == "params.yaml is not valid: trainer: Extra inputs are not permitted"


def test_wrong_type_is_named_with_its_section(raw: dict) -> None:
    raw["finetune"]["epochs"] = "many"
    message = error_of(raw)
    assert re.search(r"(: |; )finetune\.epochs: Input should be a valid integer", message), message
    assert "\n" not in message


def test_bad_enum_value_is_refused(raw: dict) -> None:
    raw["finetune"]["method"] = "qlora"
    message = error_of(raw)
    assert "finetune" in message and "'qlora'" in message


def test_validate_section_errors_are_named_validate_not_validate_(raw: dict) -> None:
    raw["validate"]["min_text_chars"] = "three"
    message = error_of(raw)
    assert re.search(r"(: |; )validate\.min_text_chars: ", message), message
    assert "validate_" not in message


def test_every_bad_key_is_reported_at_once(raw: dict) -> None:
    raw["finetune"]["lora_rank"] = 8
    raw["gate"]["metric"] = "auc"
    raw["split"]["seed"] = "forty-two"
    message = error_of(raw)
    assert "finetune.lora_rank" in message and "split.seed" in message and "'auc'" in message


def test_load_params_names_a_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "bad.yaml").write_text("finetune: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        load_params(tmp_path / "list.yaml")


def test_load_params_error_names_the_file_and_the_key(tmp_path: Path, raw: dict) -> None:
    raw["finetune"]["lora_rank"] = 8
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=re.escape(f"{path} is not valid:")) as error:
        load_params(path)
    assert "finetune.lora_rank" in str(error.value)


# --- every setting within its range, every file readable (issue 21) -----------------------------


@pytest.mark.parametrize("section, key, value, message", [
    ("finetune", "batch_size", 0, "finetune.batch_size must be at least 1, got 0"),
    ("finetune", "device", "tpu", "finetune.device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("finetune", "learning_rate", float("nan"), "finetune.learning_rate must be a finite number, got nan"),
    ("finetune", "learning_rate", -1e-3, "finetune.learning_rate must be at least 0, got -0.001"),
    ("finetune", "epochs", -3, "finetune.epochs must be at least 1, got -3"),
    ("finetune", "lora_dropout", 1.0, "finetune.lora_dropout must be at least 0 and below 1, got 1.0"),
    ("finetune", "warmup_ratio", float("inf"), "finetune.warmup_ratio must be a finite number, got inf"),
    ("finetune", "seed", -1, "finetune.seed must be 0..4294967295, got -1"),
    ("finetune", "max_steps", 0, "finetune.max_steps must be at least 1, got 0"),
    ("baseline", "zero_shot_template", "This text is good.",
     "baseline.zero_shot_template must contain {label}, or every label reads the same"),
    ("baseline", "device", "gpu", "baseline.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("validate", "max_class_imbalance", float("nan"), "validate.max_class_imbalance must be a finite number, got nan"),
    ("validate", "min_rows_per_class", 0, "validate.min_rows_per_class must be at least 1, got 0"),
    ("split", "test_fraction", float("nan"), "split.test_fraction must be a finite number, got nan"),
    ("gate", "confidence", 1.0, "gate.confidence must be above 0 and below 1, got 1.0"),
    ("gate", "bootstrap_samples", 10, "gate.bootstrap_samples must be at least 100, got 10"),
    ("serve", "poll_seconds", float("nan"), "serve.poll_seconds must be a finite number, got nan"),
    ("serve", "port", 99999, "serve.port must be 0-65535, got 99999"),
    ("monitor", "embedding_auc", 0.3, "monitor.embedding_auc must be at least 0.5 and at most 1, got 0.3"),
    ("monitor", "reference_split", "holdout", "monitor.reference_split must be train, validation or test, got "
                                              "'holdout'"),
    ("triggers", "min_new_labelled_rows", 0, "triggers.min_new_labelled_rows must be at least 1, got 0"),
    ("ingest", "label_column", "text", "ingest.text_column and ingest.label_column are both 'text': texts and "
                                       "labels need a column each"),
    ("ingest", "length_slices", [25, 10], "ingest.length_slices must be increasing word counts of at least 1, "
                                          "got [25, 10]"),
])
def test_a_setting_outside_its_range_is_refused_when_params_load_naming_it_in_one_line(
        raw: dict, section: str, key: str, value, message: str) -> None:
    raw[section][key] = value
    assert error_of(raw) == f"params.yaml is not valid: {message}"


def test_every_value_of_the_shipped_params_and_the_code_defaults_is_within_range(shipped_raw: dict) -> None:
    assert parse_params(shipped_raw) is not None and Params() is not None


@pytest.mark.parametrize("text, message", [
    ("finetune:\n  epochs: -3\n", "params.yaml is not valid: finetune.epochs must be at least 1, got -3"),
    ("finetune:\n  learning_rate: .nan\n", "params.yaml is not valid: finetune.learning_rate must be a finite "
                                             "number, got nan"),
    ("finetune:\n  epochs: 2\n  batch_size: 16\n  epochs: 3\n",
     "params.yaml: key 'epochs' is written twice in one section (line 4, column 3); YAML would keep only the "
     "last, remove one"),
    ("finetune: {epochs: 2}\nsplit: {seed: 1}\nfinetune: {epochs: 3}\n",
     "params.yaml: key 'finetune' is written twice in one section (line 3, column 1); YAML would keep only the "
     "last, remove one"),
    ("", "params.yaml is empty: tuneloop does not fall back to its shipped defaults (they train on its own movie "
         "reviews); write your sections, or let `tuneloop init DATA` write them"),
    ("# every section at its defaults?\n\n", "params.yaml is empty: tuneloop does not fall back to its shipped "
                                             "defaults (they train on its own movie reviews); write your sections, or "
                                             "let `tuneloop init DATA` write them"),
    ("{}\n", "params.yaml is empty: tuneloop does not fall back to its shipped defaults (they train on its own "
             "movie reviews); write your sections, or let `tuneloop init DATA` write them"),
    ("[" * 20_000 + "]" * 20_000 + "\n", "params.yaml nests its values too deeply to read (thousands of levels)"),
])
def test_a_params_file_that_cannot_be_trusted_is_refused_in_one_line(tmp_path: Path, monkeypatch, text: str,
                                                                     message: str) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(text)
    with pytest.raises(ParamsError) as refused:
        load_params(Path("params.yaml"))
    assert str(refused.value) == message


def test_a_params_path_that_is_latin_1_a_folder_or_a_pipe_is_refused_in_one_line(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    import os

    monkeypatch.chdir(tmp_path)
    Path("latin.yaml").write_bytes("finetune:\n  device: caf\xe9\n".encode("latin-1"))
    Path("folder.yaml").mkdir()
    os.mkfifo("pipe.yaml")
    refusals = {}
    for name in ("latin.yaml", "folder.yaml", "pipe.yaml"):
        with pytest.raises(ParamsError) as refused:
            load_params(Path(name))
        refusals[name] = str(refused.value)
    assert refusals == {
        "latin.yaml": "latin.yaml is not UTF-8 (line 2, byte 23): save it as UTF-8",
        "folder.yaml": "folder.yaml is a folder, not a params file: pass --params FILE",
        "pipe.yaml": "pipe.yaml is not a regular file (a pipe or a device?): pass --params FILE"}


def test_a_set_value_that_repeats_a_key_is_refused_like_the_file(raw: dict) -> None:
    with pytest.raises(ParamsError) as refused:
        apply_overrides(raw, ["finetune.target_modules={a: 1, a: 2}"])
    assert str(refused.value).startswith("--set 'finetune.target_modules={a: 1, a: 2}': the value: key 'a' is "
                                         "written twice")


# --- --set overrides ---------------------------------------------------------------------------


def test_set_overrides_nest_at_the_dots_and_read_values_as_yaml(raw: dict) -> None:
    merged = apply_overrides(raw, ["finetune.epochs=2", "gate.min_gain_over_base=-0.5", "tune.enabled=true",
                                   "ingest.slice_columns=[source, length_bucket]", "finetune.epochs=3"])
    assert merged["finetune"]["epochs"] == 3  # the last of repeated keys wins
    assert merged["gate"]["min_gain_over_base"] == -0.5 and merged["tune"]["enabled"] is True
    assert merged["ingest"]["slice_columns"] == ["source", "length_bucket"]
    assert raw["finetune"]["epochs"] != 3  # the caller's mapping is left as it was


def test_load_params_applies_set_overrides_and_validates_them_like_the_file(tmp_path: Path, raw: dict) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path, ["finetune.epochs=2"]).finetune.epochs == 2
    with pytest.raises(ParamsError, match=r"finetune\.epochz") as error:
        load_params(path, ["finetune.epochz=2"])
    assert "--set finetune.epochz=2" in str(error.value)
    with pytest.raises(ParamsError, match="finetune.epochs"):
        load_params(path, ["finetune.epochs=many"])


@pytest.mark.parametrize("bad", ["finetune.epochs", "=2", "finetune..epochs=2", "model.base.name=x"])
def test_malformed_set_overrides_are_refused_with_the_form_to_use(raw: dict, bad: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(f"--set {bad!r}")):
        apply_overrides(raw, [bad])


# --- dvc.yaml agrees with the code ---------------------------------------------------------------


def test_every_dvc_stage_runs_its_own_registered_tuneloop_command(dvc_stages: dict) -> None:
    from tuneloop.cli import app

    commands = {info.name for info in app.registered_commands}
    for name, stage in dvc_stages.items():
        assert stage["cmd"] == f"tuneloop {name}"
        assert name in commands, f"dvc.yaml stage {name!r} has no `tuneloop {name}` command"


def test_every_dvc_params_entry_names_a_params_section(dvc_stages: dict) -> None:
    sections = section_names()
    for name, stage in dvc_stages.items():
        assert stage.get("params"), f"stage {name} declares no params"
        for entry in stage["params"]:
            assert entry in sections, f"stage {name}: params entry {entry!r} is not a params.yaml section"


def test_every_dvc_stage_is_a_pipeline_stage_in_order(dvc_stages: dict) -> None:
    from tuneloop.pipeline.stages import STAGES

    assert set(dvc_stages) <= set(STAGES)
    assert list(dvc_stages) == [s for s in STAGES if s in dvc_stages]


def test_dvc_yaml_templates_refer_to_existing_params(dvc_stages: dict, shipped_raw: dict) -> None:
    references = re.findall(r"\$\{([^}]+)\}", DVC_YAML.read_text())
    assert references, "dvc.yaml is expected to template the ingest source"
    for reference in references:
        value = shipped_raw
        for key in reference.split("."):
            assert key in value, f"${{{reference}}} is not in params.yaml"
            value = value[key]
    assert (PROJECT / shipped_raw["ingest"]["source"]).is_file()


@pytest.mark.parametrize(("section", "key", "value", "said"), [
    ("evaluate", "perturbations", ["lowercase", "shout"], "evaluate.perturbations must be distinct names"),
    ("evaluate", "robustness_rows", -1, "evaluate.robustness_rows must be at least 0"),
    ("evaluate", "typo_rate", 0.0, "evaluate.typo_rate must be above 0"),
    ("gate", "max_robustness_drop", 1.5, "gate.max_robustness_drop must be at least 0 and at most 1"),
])
def test_robustness_settings_out_of_range_are_named(raw: dict, section: str, key: str, value, said: str) -> None:
    raw[section][key] = value
    assert said in error_of(raw)


def test_the_shipped_robustness_settings_are_the_defaults(shipped_raw: dict) -> None:
    params = load_params(PARAMS_YAML)
    assert (params.evaluate.robustness_rows, params.evaluate.typo_rate, params.gate.max_robustness_drop) == (
        500, 0.05, 0.02)
    assert list(params.evaluate.perturbations) == shipped_raw["evaluate"]["perturbations"] == [
        "lowercase", "uppercase", "strip_punctuation", "add_punctuation", "typos", "whitespace", "contract", "expand"]


def test_the_shipped_forgetting_settings_are_the_defaults(shipped_raw: dict) -> None:
    params = load_params(PARAMS_YAML)
    assert (params.evaluate.regression_file, params.gate.max_forgetting) == (None, 0.02)
    assert (shipped_raw["evaluate"]["regression_file"], shipped_raw["gate"]["max_forgetting"]) == (None, 0.02)


def test_a_forgetting_tolerance_outside_zero_to_one_is_named(raw: dict) -> None:
    raw["gate"]["max_forgetting"] = -0.1
    assert "gate.max_forgetting must be at least 0 and at most 1" in error_of(raw)
