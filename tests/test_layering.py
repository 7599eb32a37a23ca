"""The layering: flows -> tasks -> ddpm, never back, and each folder talks to its frameworks only.

    ddpm/     torch and the scientific stack; never Prefect, MLflow, tasks or flows
    tasks/    + Prefect tasks and the MLflow side; never flows
    flows/    + Prefect flows and the CLI
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the top-level names a folder's files may not import
FORBIDDEN = {
    "ddpm": {"prefect", "prefect_dask", "mlflow", "tasks", "flows"},
    "tasks": {"flows"},
}


def imported_top_levels(path: Path) -> set[str]:
    """Top-level module names `path` imports, anywhere in the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_file_imports_upwards_or_a_framework_its_folder_may_not(folder):
    offences = {str(path.relative_to(ROOT)): sorted(imported_top_levels(path) & FORBIDDEN[folder])
                for path in sorted((ROOT / folder).rglob("*.py"))}
    offences = {path: names for path, names in offences.items() if names}
    assert not offences, f"{folder}/ may not import {sorted(FORBIDDEN[folder])}: {offences}"


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os.path\nfrom tasks.config import X\ndef f():\n    import mlflow.pyfunc\n"
                      "from . import sibling\n")
    assert imported_top_levels(source) == {"os", "tasks", "mlflow"}


def test_importing_every_ddpm_module_loads_neither_prefect_nor_mlflow():
    """The core runs (and the benchmarks import it) without the orchestration stack."""
    code = (
        "import importlib, json, pkgutil, sys, ddpm\n"
        "for m in pkgutil.walk_packages(ddpm.__path__, 'ddpm.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded   # the check ran over the real modules
    assert not loaded & FORBIDDEN["ddpm"], sorted(loaded & FORBIDDEN["ddpm"])
