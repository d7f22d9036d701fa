"""The pipeline's stages: one module per stage and the stages' own helpers, plain functions on values.

A stage module (`ingest`, `validate`, `split`, `baseline`, `tune`, `finetune`,
`evaluate`, `gate`, `registry`, `drift`, `shadow`, `rollback`, `triggers`) takes
in-memory values and its section of params (a dataclass of
`tuneloop/values/config.py`) and returns values; a few also read and write their
own files in the workspace (`run_ingest`, `run_split`, `run_baseline`). What
every stage reads from the workspace and writes back, and what it logs, is
`tuneloop/pipeline/stages.py`: the layer `dvc.yaml` and the Prefect flows call.
Below the stages sit `tuneloop/plumbing/`, `tuneloop/model/` and
`tuneloop/values/`; `tuneloop layout` prints every floor with its modules.
"""
