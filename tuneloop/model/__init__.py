"""The model: the pooled encoder and its head, the fast path, metrics, calibration; no orchestration.

torch, transformers, peft, numpy, scikit-learn and SciPy only (the layout test checks
it), so fine-tuning runs on a bare GPU machine without Prefect or MLflow.
"""
