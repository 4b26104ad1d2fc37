import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(ROOT / ".venv" / "bin" / "ruff")
    if not shutil.which(ruff):
        pytest.skip("ruff not installed (pip install -e .[dev])")
    r = subprocess.run([ruff, "check", "onpolicy", "verifiers", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_verifiers_package_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import verifiers"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
