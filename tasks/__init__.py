"""The pipeline's work as plain functions, one module per stage.

Each stage module holds a frozen config dataclass (its `params.yaml` section),
core functions that do the work on in-memory values, and one `run_<stage>`
function that reads its inputs from the workspace and writes its outputs there
(what `dvc.yaml` and the Prefect flow call).
"""
