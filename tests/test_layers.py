"""The layers of docs/DESIGN.md, held by import-linter's contracts in pyproject.toml: the
core imports no web framework, Redis client or PyTorch; the offline pipeline imports the
core, never the service; nothing imports the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {c["id"]: c for c in CONFIG["contracts"]}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the tree at ``cwd`` (it puts ``cwd`` first on its path), uncached."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_tree_keeps_every_contract() -> None:
    res = lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in res.stdout


def test_every_app_module_has_a_layer() -> None:
    """A new module of app/ is named core or service, or the contracts would not see it."""
    core = set(CONTRACTS["core"]["source_modules"])
    service = set(CONTRACTS["offline"]["forbidden_modules"])
    assert not core & service
    modules = {f"app.{p.stem}" for p in (ROOT / "app").glob("*.py") if p.stem != "__init__"}
    modules |= {f"app.{p.name}" for p in (ROOT / "app").iterdir() if (p / "__init__.py").is_file()}
    assert modules == core | service


def test_the_contracts_catch_a_breach(tmp_path: Path) -> None:
    """The same contracts, on a copy of the tree with one breach of each, fail and name it."""
    ignore = shutil.ignore_patterns("__pycache__", "bundles")
    for package in ("app", "model_export"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    breaches = {
        "app/core/decisions.py": "import fastapi",  # the core, on a web framework
        "model_export/parity.py": "from app import settings",  # the offline side, on the service
        "app/replay.py": "from app import cli",  # the CLI, imported
    }
    for path, line in breaches.items():
        with (tmp_path / path).open("a") as f:
            f.write(f"\n{line}  # noqa\n")

    res = lint_imports(tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert f"Contracts: 0 kept, {len(CONTRACTS)} broken." in out
    for broken in ("app.core.decisions -> fastapi", "model_export.parity -> app.settings", "app.replay -> app.cli"):
        assert broken in out, out
