"""Benchmarks of the finetune and evaluate stages: `python -m benchmarks.run` (see README.md here)."""
