"""Run from the repository root, as README's commands do, Python finds the installed packages,
not the repository's folders: `passes/` and `kernels/` must never shadow a package of the same
name (PyPI's `kernels` is one, and transformers imports it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SHADOWED_FROM_THE_ROOT = """
import importlib.metadata, importlib.util, pathlib
root = pathlib.Path.cwd().resolve()
for name in sorted(importlib.metadata.packages_distributions()):
    if name == "attnrewrite" or not ((root / name).exists() or (root / f"{name}.py").exists()):
        continue
    spec = importlib.util.find_spec(name)
    origin = pathlib.Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is None or origin == root / f"{name}.py" or root / name in origin.parents:
        print(name, origin)
"""


def run_at_root(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_attnrewrite_is_the_only_regular_package_at_the_root():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["attnrewrite"]


def test_no_installed_package_is_shadowed_from_the_root():
    assert run_at_root(SHADOWED_FROM_THE_ROOT) == ""


def test_installed_kernels_and_transformers_import_from_the_root():
    pytest.importorskip("kernels")
    pytest.importorskip("transformers")
    out = run_at_root(
        "import kernels, transformers; transformers.GPT2LMHeadModel; print(kernels.__file__)"
    )
    assert ROOT / "kernels" not in Path(out.strip()).resolve().parents


def test_passes_and_kernels_import_as_subpackages_from_the_root():
    out = run_at_root(
        "import attnrewrite.kernels.monarch as k, attnrewrite.passes.canonicalize as p; "
        "print(k.__name__, p.__name__)"
    )
    assert out.split() == ["attnrewrite.kernels.monarch", "attnrewrite.passes.canonicalize"]
