"""The `tuneloop` command's manners: --version, shell completion, --set on every
command that reads params, flags that read as flags, one clean message (no
traceback) for an expected failure, a readable status table, and no torch
import for `tuneloop status`."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.cli import app, status_table

REPO = Path(__file__).resolve().parents[2]
PARAMS_COMMANDS = ["ingest", "validate", "split", "baseline", "tune", "finetune", "evaluate", "gate", "register",
                   "run", "status", "incoming", "monitor", "restore-data", "serve", "rollback"]


def tuneloop(*args: str, cwd: Path, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """The real `tuneloop` entry point (main(), not just the Typer app) in a fresh interpreter."""
    runner = code or "from tuneloop.cli import main; main()"
    environment = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env or {})}
    return subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['tuneloop', *sys.argv[1:]]; {runner}",
                           *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def help_of(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_version_prints_the_installed_version_and_exits_zero() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.output.strip()) == (0, f"tuneloop {version('tuneloop')}")


def test_shell_completion_options_are_offered() -> None:
    text = help_of()
    assert "--install-completion" in text and "--show-completion" in text


@pytest.mark.parametrize("command", PARAMS_COMMANDS)
def test_every_command_that_reads_params_takes_repeatable_set(command: str) -> None:
    assert "--set SECTION.KEY=VALUE" in help_of(command)


def test_boolean_flags_read_as_on_off_pairs_never_as_a_bool_value() -> None:
    assert "--tune / --no-tune" in help_of("run")
    assert "--force / --no-force" in help_of("init")
    for command in ("run", "init", "status", "monitor"):
        assert "<bool>" not in help_of(command) and "BOOLEAN" not in help_of(command)


def test_a_bad_set_is_refused_like_a_bad_params_yaml_in_one_message(project: Path) -> None:
    result = tuneloop("status", "--set", "finetune.epochz=2", cwd=project)
    assert result.returncode == 2
    assert "finetune.epochz" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_restore_data_of_an_unknown_version_ends_in_one_line_and_exit_2(project: Path) -> None:
    result = tuneloop("restore-data", "99", cwd=project)
    assert result.returncode == 2
    assert result.stderr.strip() == "restore-data refused: tuneloop-sentiment has no version 99"
    assert result.stdout == ""


def test_an_unreachable_tracking_server_ends_in_one_message_and_exit_2(project: Path) -> None:
    # one retry, not MLflow's seven with backoff: the message is the same, minutes sooner
    result = tuneloop("status", cwd=project, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                                                  "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"})
    assert result.returncode == 2
    assert result.stderr.startswith("the MLflow server at http://127.0.0.1:9 did not answer")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_status_table_shows_the_champion_and_its_test_scores_one_fact_a_row() -> None:
    info = {"model": "m", "versions": 3, "previous": "1", "incomplete": ["3"],
            "champion": {"version": "2", "data_md5": "0123456789abcdef", "test": {"macro_f1": 0.91234, "accuracy": 0.9,
                                                                                 "ece": 0.031}},
            "last_run": {"outcome": "promoted", "status": "FINISHED", "version": "2"}}
    rows = [("model", "m"), ("versions", "3"), ("champion", "version 2"), ("  data version", "01234567"),
            ("  test macro-F1", "0.9123"), ("  test accuracy", "0.9000"), ("  test ECE", "0.0310"),
            ("previous", "version 1"), ("last run", "promoted (FINISHED), version 2"),
            ("unfinished", "versions 3 (never served)")]
    assert status_table(info).splitlines() == [f"{name:<15}  {value}" for name, value in rows]


def test_status_of_a_new_project_is_a_table_and_json_on_request(project: Path) -> None:
    table = tuneloop("status", cwd=project)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[:3] == ["model     tuneloop-sentiment", "versions  0",
                                             "champion  none yet (run `tuneloop run`)"]
    as_json = tuneloop("status", "--json", cwd=project)
    assert yaml.safe_load(as_json.stdout)["champion"] is None


def test_status_does_not_import_torch(project: Path) -> None:
    runner = ("import atexit; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
              "from tuneloop.cli import main; main()")
    result = tuneloop("status", "--json", cwd=project, code=runner)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "torch imported: False"


def test_split_help_says_rows_are_split_by_a_hash_of_their_text_not_stratified() -> None:
    text = help_of("split")
    assert "stratified" not in text.lower()
    assert "hash of each row's normalised text" in " ".join(text.split())


def test_debug_is_offered_in_help() -> None:
    assert "--debug" in help_of() and "traceback" in help_of()


PEFT_ON_TINY_BERT = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests!r})
{setup}
from tiny_model import build_tiny_bert
from peft import LoraConfig, get_peft_model
from transformers import AutoModel
base = build_tiny_bert(Path(tempfile.mkdtemp()))
get_peft_model(AutoModel.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
print("[6/9] finetune: the next stage line")
"""


@pytest.mark.parametrize("quiet", [True, False], ids=["tuneloop", "without tuneloop's setting"])
def test_a_library_future_warning_does_not_break_the_one_line_per_stage_output(tmp_path: Path, quiet: bool) -> None:
    setup = "from tuneloop.cli import quiet_library_warnings; quiet_library_warnings()" if quiet else ""
    code = PEFT_ON_TINY_BERT.format(tests=str(REPO / "tests"), setup=setup)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[6/9] finetune: the next stage line"
    # PEFT asks transformers' deprecated `is_gradient_checkpointing`: shown without the setting, silent with it
    assert ("FutureWarning" in done.stderr) is not quiet


def test_a_sigterm_on_a_sqlite_project_is_told_as_the_signal_not_as_a_silent_mlflow_server(project: Path) -> None:
    # the command is stopped by SIGTERM; what fails on the way out (a connection refused by a Prefect
    # server that died with it) must not be reported as "the MLflow server ... did not answer"
    runner = ("import os, signal; from tuneloop.tasks import registry\n"
              "def stopped(*args):\n"
              "    try:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    finally:\n        raise ConnectionRefusedError(111, 'Connection refused')\n"
              "registry.model_status = stopped\n"
              "from tuneloop.cli import main; main()")
    result = tuneloop("status", cwd=project, code=runner.replace("\n", "\n"), env={
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"})
    assert "MLflow server" not in result.stderr
    assert result.stderr.strip() == "tuneloop stopped by SIGTERM"
    assert result.returncode == 128 + 15


@pytest.mark.parametrize("flag, passed", [([], None), (["--commit"], True), (["--no-commit"], False)])
def test_run_passes_commit_to_the_flow_only_when_the_flag_is_given(project: Path, monkeypatch, flag: list[str],
                                                                    passed: bool | None) -> None:
    """No flag: the flow follows ingest.commit_iterations; a flag overrides it."""
    import tuneloop.flows.ephemeral
    import tuneloop.flows.retrain

    called = {}

    def flow(**kwargs):
        called.update(kwargs)
        return {"model": "m", "version": "1", "promoted": True, "champion": "1"}

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tuneloop.flows.retrain, "retrain_flow", flow)
    monkeypatch.setattr(tuneloop.flows.ephemeral, "start_ephemeral_server", lambda log=None: None)
    result = CliRunner().invoke(app, ["run", "--root", str(project), *flag])
    assert result.exit_code == 0, result.output
    assert called["commit"] is passed
