"""Records around the stages: MLflow tracking and model packaging, run logs, locks, DVC, file hashes."""
