"""Old name of `tuneloop.values.labels`, kept for MLflow versions registered before 2026-12-05.

Their `code/` carries only classifier, fastpath and mlflow_model and imports this module
from the installed tuneloop (`tests/unit/test_mlflow_model_isolated.py` loads one). The
name is the module itself, not a copy: `tuneloop.tasks.labels is tuneloop.values.labels`.
"""

import sys

from tuneloop.values import labels

sys.modules[__name__] = labels
