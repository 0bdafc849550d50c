"""The layers of the package and what each may import (docs/architecture.md).

Lower floors never import higher ones, lazily or not: the 3D prior's nn.Modules know
nothing of Lightning stages, a stage knows nothing of the runner, and nothing but the
applications (bench, predict, CLI) knows the bench. Every package folder is installed
under the amodal3d namespace (pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"models": "models", "metrics": "metrics", "datamodules": "datamodules", "callbacks": "callbacks",
           "lightning_modules": "lightning_modules"}
CORE = ("amodal3d.categories", "amodal3d.config", "amodal3d.atomic", "amodal3d.protocols", "amodal3d.errors")
RUNNER = ("amodal3d.runs", "amodal3d.dependencies", "amodal3d.train", "amodal3d.slurm")
APPS = ("amodal3d.bench", "amodal3d.predict", "amodal3d.cli", "amodal3d.__main__")
# floor -> the floors it may import (its own included)
ALLOWED = {
    "core": {"core"},
    "models": {"core", "models"},
    "metrics": {"core", "models", "metrics"},
    "datamodules": {"core", "models", "metrics", "datamodules"},
    "callbacks": {"core", "models", "metrics", "datamodules", "callbacks"},
    "lightning_modules": {"core", "models", "metrics", "datamodules", "callbacks", "lightning_modules"},
    "runner": {"core", "models", "metrics", "datamodules", "callbacks", "lightning_modules", "runner"},
}
# the one upward edge: load_config looks a stage's `model` schema up in the stage registry
EXCEPTIONS = {("amodal3d.config", "amodal3d.lightning_modules.registry")}


def floor_of(module: str) -> str | None:
    for name in FOLDERS:
        if module == f"amodal3d.{name}" or module.startswith(f"amodal3d.{name}."):
            return name
    if any(module == m or module.startswith(m + ".") for m in CORE):
        return "core"
    if any(module == m or module.startswith(m + ".") for m in RUNNER):
        return "runner"
    if any(module == m or module.startswith(m + ".") for m in APPS):
        return "apps"
    return None  # third-party or the standard library


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    roots = {"amodal3d": REPO / "amodal3d", **{f"amodal3d.{k}": REPO / v for k, v in FOLDERS.items()}}
    for prefix, root in roots.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = f
    return out


def imports_of(path: Path, module: str) -> set[str]:
    """Every module an import statement in the file names, lazy imports included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_no_floor_imports_a_higher_one():
    files = module_files()
    bad = []
    for module, path in sorted(files.items()):
        floor = floor_of(module)
        if floor in (None, "apps"):
            continue
        for target in sorted(imports_of(path, module)):
            if target not in files and target.rsplit(".", 1)[0] in files:
                continue  # `from module import name`: the module itself is checked
            tf = floor_of(target)
            if tf is None or tf in ALLOWED[floor] or (module, target) in EXCEPTIONS:
                continue
            bad.append(f"{module} ({floor}) imports {target} ({tf})")
    assert not bad, "imports run upward:\n" + "\n".join(bad)


def test_no_generic_top_level_import_names():
    """Code imports amodal3d.models, never `models` (which another project may own)."""
    bad = []
    for module, path in module_files().items():
        for target in imports_of(path, module):
            if target.split(".")[0] in FOLDERS:
                bad.append(f"{module} imports {target}")
    for path in (REPO / "tests").glob("*.py"):
        for target in imports_of(path, "tests"):
            if target.split(".")[0] in FOLDERS:
                bad.append(f"tests/{path.name} imports {target}")
    assert not bad, "\n".join(bad)


def test_lower_floors_import_without_the_runner_the_bench_or_the_cli():
    lower = [m for m in module_files() if floor_of(m) not in ("runner", "apps")]
    code = ("import importlib, sys\n"
            f"for m in {sorted(lower)!r}:\n    importlib.import_module(m)\n"
            f"high = sorted(m for m in sys.modules if m.startswith({RUNNER + APPS!r}))\n"
            "print('|'.join(high))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing the lower floors imported {out.stdout.strip()}"


def test_every_package_folder_is_installed_under_the_namespace():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    present = {m for m, f in module_files().items() if f.name == "__init__.py"}
    assert listed == present, f"pyproject.toml packages differ: missing {sorted(present - listed)}, " \
                              f"extra {sorted(listed - present)}"
    for name, folder in FOLDERS.items():
        assert cfg["package-dir"][f"amodal3d.{name}"] == folder


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_no_source_file_is_crowded(name):
    """One responsibility per file: none over 450 lines (the procedural shape table aside)."""
    long = [f"{p.relative_to(REPO)} ({n})" for p in (REPO / FOLDERS[name]).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450 and p.name != "synth13_shapes.py"]
    assert not long, long
