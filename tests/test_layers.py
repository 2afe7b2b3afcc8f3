"""The package's layers import one way (docs/architecture.md): each package imports only from the layers below it,
and every module imports on its own (no import cycle hides behind an import order)."""
import ast
import os

import pytest
import subprocess
import sys

from conftest import REPO

PACKAGE = os.path.join(REPO, "ssl_bocb")

# lowest first; a module may import its own package and any package of a lower layer, never a higher one
LAYERS = [
    {"errors"},
    {"files", "dist", "device", "recipes"},
    {"losses", "optim"},
    {"config", "data", "models"},
    {"engine"},
    {"eval", "analysis"},
    {"tasks"},
    {"sweep", "quickstart"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules():
    """(dotted name, path) of every module of the package."""
    out = []
    for folder, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].replace(os.sep, ".")
                out.append((rel[: -len(".__init__")] if rel.endswith(".__init__") else rel, os.path.join(folder, f)))
    return sorted(out)


def imported(name, path):
    """Every ssl_bocb module or package that ``name`` imports, at any depth of its code (lazy imports too)."""
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.startswith("ssl_bocb"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names
                             if os.path.exists(os.path.join(REPO, *f"{base}.{a.name}".split("."))) or
                             os.path.exists(os.path.join(REPO, *f"{base}.{a.name}".split(".")) + ".py"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ssl_bocb"))
    return found


def top(dotted):
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer():
    tops = {top(n) for n, _ in modules()} - {None}
    assert tops <= set(LAYER), f"packages without a layer in LAYERS: {sorted(tops - set(LAYER))}"


def test_packages_import_only_from_lower_layers():
    bad = []
    for name, path in modules():
        here = top(name)
        if here is None:
            continue
        for target in imported(name, path):
            there = top(target)
            if there is not None and there != here and LAYER[there] >= LAYER[here]:
                bad.append(f"{name} imports {target} (layer {LAYER[there]} >= {LAYER[here]})")
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_a_violation(tmp_path):
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from ..analysis.report import analyze\n")
    assert "ssl_bocb.analysis.report" in imported("ssl_bocb.engine.x", str(fake))


@pytest.mark.slow
def test_every_module_imports_alone():
    names = [n for n, _ in modules()]
    code = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'ssl_bocb' or m.startswith('ssl_bocb.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_no_function_is_longer_than_80_lines():
    long = []
    for root in ("ssl_bocb", "tools"):
        for folder, _, files in os.walk(os.path.join(REPO, root)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    for node in ast.walk(ast.parse(open(path).read())):
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            n = node.end_lineno - node.lineno + 1
                            if n > 80:
                                long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)
