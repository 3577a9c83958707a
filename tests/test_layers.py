"""Layer contracts: the engine is a library that knows nothing of the service, the worker
needs no HTTP layer (both via import-linter, configured in pyproject.toml), and importing
the web API loads neither torch nor transformers (a fresh interpreter checks it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "NO_COLOR": "1"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_the_layer_contracts_hold() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contracts_catch_an_engine_that_imports_the_service(tmp_path: Path) -> None:
    """The same contracts on a tree whose engine imports SQL and the API: both broken."""
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    for package, body in (
        ("das_engine", "import sqlalchemy\n"),
        ("service_core", ""),
        ("app", ""),
        ("worker", "import app.routes\n"),
    ):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(body)
    (tmp_path / "app" / "routes.py").write_text("")
    (tmp_path / "app" / "main.py").write_text("")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "2 broken" in result.stdout, result.stdout


def test_importing_the_api_loads_no_ml_library() -> None:
    code = (
        "import sys, app.main, app.cli; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') "
        "if m in sys.modules); print(heavy)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
