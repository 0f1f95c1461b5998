"""The package's shape: no import cycle, modules and functions small enough to read."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "patchlab"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # code lines, the docstring aside
COMPILED = {"knn/_heaps.py"}  # numba kernels: hot loops written out on purpose


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = (path, ast.parse(path.read_text()))
    return out


def test_no_import_cycle():
    found = modules()
    graph = {}
    for name, (_, tree) in found.items():
        deps = set()
        typing_only = {  # `if TYPE_CHECKING:` imports are annotations, never run
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):  # function-level (lazy) imports count too
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("patchlab"):
                deps |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("patchlab")}
        graph[name] = {d for d in deps if d in found and d != name}
    # the package's own __init__ only imports the widgets lazily (patchlab.explore)
    graph["patchlab"] -= {"patchlab.widgets"}
    done, active, cycles = set(), [], []

    def visit(u):
        active.append(u)
        for v in sorted(graph[u]):
            if v in active:
                cycles.append(active[active.index(v) :] + [v])
            elif v not in done:
                visit(v)
        active.pop()
        done.add(u)

    for name in sorted(graph):
        if name not in done:
            visit(name)
    assert cycles == []


def test_modules_and_functions_are_small():
    too_long = []
    for name, (path, tree) in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        if str(path.relative_to(PACKAGE)) in COMPILED:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                code = node.end_lineno - node.lineno + 1 - (len(doc.splitlines()) + 2 if doc else 0)
                if code > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {code} code lines")
    assert too_long == []


def test_each_concept_has_one_home():
    """experiment.py orchestrates (small); cache file names are made in cache.py only; the
    atomic replacement of files lives in atomic.py (issue 22)."""
    import re

    experiment = PACKAGE / "experiment.py"
    tree = ast.parse(experiment.read_text())
    docs = sum(
        node.body[0].end_lineno - node.body[0].lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and ast.get_docstring(node)
    )
    code = len(experiment.read_text().splitlines()) - docs
    assert code <= 250, f"experiment.py: {code} lines besides its docstrings and examples"
    names = re.compile(r'-[km]\{|"(features|global|neighbours|coreset)-')
    mkstemp = re.compile(r"\bmkstemp\(")
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "cache.py":
            assert not names.search(text), f"{path}: a cache file name outside cache.py"
        if path.name != "atomic.py":
            assert not mkstemp.search(text), f"{path}: an atomic write outside atomic.py"
