"""A Python where `import tuneloop` fails but every installed package imports:
what a serving team has after `pip install -r requirements.txt` of a model.

It is a venv (no pip) whose one `.pth` line names this interpreter's
site-packages. A path named in a `.pth` file is added to sys.path without
reading the `.pth` files inside it, so setuptools' editable finder for
tuneloop (`__editable__.tuneloop-*.pth`) never runs there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def isolated_python(folder: Path) -> Path:
    """Makes the venv at `folder` (once) and returns its python. Its bin/ holds
    `uvicorn`, which `mlflow models serve` runs from PATH."""
    python = folder / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    found = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    here = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(found) / "installed.pth").write_text("".join(f"{path}\n" for path in sorted(here)))
    uvicorn = folder / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return python


def isolated_environment(folder: Path, **extra: str) -> dict[str, str]:
    """os.environ with the isolated venv's bin/ first on PATH and no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    return {**env, "PATH": f"{folder / 'bin'}:{env.get('PATH', '')}", **extra}


def tuneloop_importable(python: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`import tuneloop` in `python`, from `cwd` (its returncode says whether it worked)."""
    return subprocess.run([str(python), "-c", "import tuneloop"], cwd=cwd, capture_output=True, text=True,
                          env=isolated_environment(python.parent.parent))
