"""Old name of `tuneloop.model.calibration`, kept for MLflow versions registered before 2026-12-05.

Their `code/` carries only classifier, fastpath and mlflow_model and imports this module
from the installed tuneloop (`tests/unit/test_mlflow_model_isolated.py` loads one). The
name is the module itself, not a copy: `tuneloop.tasks.calibration is tuneloop.model.calibration`.
"""

import sys

from tuneloop.model import calibration

sys.modules[__name__] = calibration
