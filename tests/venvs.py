"""Virtual environments of their own for outside tools whose pins clash with the project's
(checkov pins packaging < 24; tritonclient and kserve pin protobuf < 7). Made once under
.pytest_cache/ and reused; the test that needs one is skipped, saying why, when pip cannot
install it (no package index). Those tests are marked ``slow`` (the first run installs for
minutes); they run by default, ``-m "not slow"`` leaves them out."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tool_venv(name: str, requirements: list[str], check_import: str | None = None) -> Path:
    """The python of ``.pytest_cache/<name>-venv`` with ``requirements`` installed."""
    venv = ROOT / ".pytest_cache" / f"{name}-venv"
    python = venv / "bin" / "python"
    stamp = venv / "requirements.txt"
    wanted = "\n".join(requirements)
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
                           capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(venv, ignore_errors=True)
        pytest.skip(f"could not create a virtual environment for {name}: {e}")
    if r.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        pytest.skip(f"could not install {' '.join(requirements)} into {venv} (no package index?):\n{r.stderr[-2000:]}")
    stamp.write_text(wanted)
    return python
