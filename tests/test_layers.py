"""The import-layer contract ([tool.importlinter] in pyproject.toml, run by `nox -s lint`).

The tree keeps it; a copy of the tree with a deliberate circle or upward import
breaks it (``lint-imports`` exits non-zero and names the contracts broken); and
at run time the report and pricing load what the contract says they may.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or \
    shutil.which("lint-imports")


def lint_imports(tree: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the package in ``tree`` (its directory first on the path)."""
    assert LINT_IMPORTS, "import-linter is installed but its lint-imports command is not found"
    limit = [arg for c in contracts for arg in ("--contract", c)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo", *limit], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_the_import_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 broken" in done.stdout


@pytest.fixture()
def tree_copy(tmp_path: Path) -> Path:
    """The package and pyproject.toml copied; the copy keeps the contract as it is."""
    shutil.copytree(ROOT / "engine", tmp_path / "engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    done = lint_imports(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path


# (module file, code appended to it, the contracts it must break)
BREAKS = {
    # The circle issue 17 found: the report reaching pricing inside a function.
    "hidden circle": ("bench/report.py",
                      "\n\ndef _deliberate() -> object:\n"
                      "    from engine.pricing import load_profile\n\n"
                      "    return load_profile\n",
                      ("house", "acyclic", "bench")),
    "room imports a face": ("scheduler.py", "\nfrom engine.cli import main  # noqa\n",
                            ("house",)),
    "pricing imports torch": ("pricing.py", "\nimport torch  # noqa\n", ("no-torch-import",)),
    "jobs reach torch through loading": ("jobs.py", "\nfrom engine import loading  # noqa\n",
                                         ("house", "no-torch")),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_a_deliberate_break_fails_the_contract(tree_copy: Path, case: str) -> None:
    module, code, broken = BREAKS[case]
    with (tree_copy / "engine" / module).open("a", encoding="utf-8") as f:
        f.write(code)
    everything = lint_imports(tree_copy)
    assert everything.returncode != 0, everything.stdout
    named = lint_imports(tree_copy, *broken)
    assert named.returncode != 0
    assert f"Contracts: 0 kept, {len(broken)} broken." in named.stdout, named.stdout


def _modules_loaded_by(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120)
    return set(json.loads(out.stdout))


def test_the_report_never_imports_pricing_and_neither_imports_torch() -> None:
    """``python -c "import engine.bench.report"`` loads neither pricing nor torch; pricing
    loads the report and its cost model, and no torch."""
    report = _modules_loaded_by("engine.bench.report")
    assert "engine.pricing" not in report
    assert "torch" not in report and "engine.bench.scenarios" not in report
    pricing = _modules_loaded_by("engine.pricing")
    assert "torch" not in pricing
    assert {"engine.bench.report", "engine.bench.cost_model"} <= pricing
