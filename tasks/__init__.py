"""The pipeline's work as plain functions, one module per stage.

A stage module (`ingest`, `validate`, `split`, `baseline`, `tune`, `finetune`,
`evaluate`, `gate`, `registry`, `drift`, `rollback`, `triggers`, `serve`) takes
in-memory values and its section of params (a dataclass of `config.py`) and
returns values; a few also read and write their own files in the workspace
(`run_ingest`, `run_split`, `run_baseline`). What every stage reads from the
workspace and writes back, and what it logs, is `tuneloop/stages.py`: the layer
`dvc.yaml` and the Prefect flows call. Below the stages sit the model core
(`classifier`, `fastpath`, `metrics`, `calibration`: torch, transformers, peft,
numpy, scikit-learn and SciPy; no orchestration) and plain values (`config`,
`decision`, `errors`, `labels`, `workspace`). `tuneloop layout` prints every
floor with its modules.
"""
