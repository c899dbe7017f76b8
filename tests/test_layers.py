"""The package's layers hold: the import-linter contract in pyproject.toml (also run by `make
lint`), no import cycle between modules (function-level imports included) and no private name
imported from another module."""
import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ckd_ehr"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]):
    """(importer, imported module, imported names) for every ckd_ehr import, at any depth."""
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ckd_ehr"):
                yield name, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("ckd_ehr"):
                        yield name, a.name, []


def test_the_layer_contract_holds():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports not installed: `make install` installs the test extras (import-linter)")
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    crossing = [(a, b, n) for a, b, names in _imports(modules) for n in names
                if n.startswith("_") and not n.startswith("__") and b != a]
    assert not crossing, crossing


def test_no_import_cycle_between_modules():
    modules = _modules()
    edges = defaultdict(set)
    for a, b, names in _imports(modules):
        targets = [f"{b}.{n}" for n in names if f"{b}.{n}" in modules] or [b]
        edges[a].update(t for t in targets if t in modules and t != a)
    # Tarjan's strongly connected components
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in list(modules):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def _function_import_groups(path: Path) -> list[tuple[int, int]]:
    """(first line, last line) of each run of imports inside a function (a blank line between
    two imports keeps them in one run)."""
    tree = ast.parse(path.read_text())
    lines = sorted({(n.lineno, n.end_lineno) for f in ast.walk(tree)
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))})
    groups: list[list[int]] = []
    for start, end in lines:
        if groups and start <= groups[-1][1] + 2:
            groups[-1][1] = max(groups[-1][1], end)
        else:
            groups.append([start, end])
    return [(a, b) for a, b in groups]


def test_imports_inside_functions_say_why():
    """Imports sit at module level unless a comment says why they do not (a heavy or optional
    dependency kept off the CLI's start-up and off Ray-free machines, an import cycle): on the
    line above a run of imports inside a function, or on one of its lines."""
    silent = []
    for path in _modules().values():
        text = path.read_text().splitlines()
        for first, last in _function_import_groups(path):
            above = text[first - 2].strip() if first >= 2 else ""
            if not above.startswith("#") and not any("#" in text[i - 1] for i in range(first, last + 1)):
                silent.append(f"{path.relative_to(ROOT)}:{first}: {text[first - 1].strip()}")
    assert not silent, f"{len(silent)} import(s) inside functions with no reason given:\n" + "\n".join(silent[:40])


TESTS = ROOT / "tests"
TOP_LEVEL_TESTS = {"test_jobs.py", "test_layers.py", "test_metrics.py", "test_multinode.py", "test_phenotypes.py", "test_pipeline.py", "test_ray_utils.py",
                   "test_readme.py", "test_s3_run.py", "test_stage_contracts.py", "test_storage.py"}
"""Tests of the top-level modules and of what spans the project (layers, jobs, the README)."""


def test_tests_are_laid_out_like_the_package():
    """tests/<package>/ for ckd_ehr/<package>/ (tests/cluster/ for cluster/), shared helpers only
    in tests/helpers/, and no test module importing another test module."""
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} | {"cluster"}
    misplaced, cross = [], []
    for path in TESTS.rglob("*.py"):
        rel = path.relative_to(TESTS)
        if rel.parts[0] == "helpers" or rel.name == "conftest.py" and len(rel.parts) == 1:
            continue
        if len(rel.parts) == 1:
            ok = rel.name in TOP_LEVEL_TESTS
        else:
            ok = len(rel.parts) == 2 and rel.parts[0] in packages and rel.name.startswith("test_")
        if not ok:
            misplaced.append(str(rel))
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            if any(n.split(".")[0].startswith(("test_", "conftest")) for n in names):
                cross.append(f"{rel}: {names}")
    assert not misplaced, f"test files outside the package's layout (tests/<package>/test_*.py): {misplaced}"
    assert not cross, f"a test module imports a test module (shared code goes into tests/helpers/): {cross}"


def test_modules_and_functions_stay_small():
    """One job per module: no module over 600 lines, no function over 80 (issue 42)."""
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > 600:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_modules and not long_functions, (long_modules, long_functions)
