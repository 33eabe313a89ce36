"""The package's shape: what `import pycpt` costs, what it exports, and which module may
import what (no test of behaviour; these keep the structure from drifting)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pycpt

PACKAGE = Path(pycpt.__file__).parent


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _package_of(module: str, tree_is_package: bool) -> str:
    return module if tree_is_package else module.rpartition(".")[0]


def test_import_pycpt_loads_only_the_version():
    code = "import sys, pycpt; print(*sorted(m for m in sys.modules if m.startswith('pycpt')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pycpt", "pycpt._version"]


def test_every_exported_name_resolves_and_type_checkers_see_the_same():
    for name in pycpt.__all__:
        assert getattr(pycpt, name) is not None, name
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    seen = {
        alias.asname
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        for sub in ast.walk(node)
        if isinstance(sub, ast.ImportFrom)
        for alias in sub.names
    }
    assert seen == set(pycpt.__all__)


def test_no_underscore_name_is_imported_from_outside_a_subpackage():
    modules = _modules()
    packages = {m for m in modules if (PACKAGE.parent / m.replace(".", "/")).is_dir()}
    bad = []
    for name, tree in modules.items():
        own = _package_of(name, name in packages)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pycpt")):
                continue
            source = node.module or ""
            source_package = _package_of(source, source in packages)
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and (source_package != own or own == "pycpt"):
                    bad.append(f"{name}: from {source} import {alias.name}")
    assert bad == []


def test_one_ffi_and_no_import_of_the_package_root():
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
                if node.module == "pycpt":  # submodules only, never a name of the root
                    for alias in node.names:
                        assert (PACKAGE / alias.name).exists() or (
                            PACKAGE / f"{alias.name}.py"
                        ).exists(), f"{name} imports {alias.name} from the package root"
            else:
                continue
            assert "ctypes" not in imported, f"{name} uses ctypes"
            if name != "pycpt._native":
                assert "pycpt._cpt" not in imported, f"{name} imports the extension"
