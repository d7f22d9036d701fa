"""tuneloop: keep fine-tuned transformer classifiers good in production."""

__version__ = "0.1.0"
