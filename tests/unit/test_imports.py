"""How the source imports itself, read from the files (ast), not from a running interpreter: no module of torchship
imports itself back through others (function-local imports included, so none hides a circle), and a function-local
import is there only to put off a heavy or optional dependency, with its reason on the line."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from helpers import ROOT

FOLDERS = {
    "torchship": "torchship",
    "train": "torchship.train",
    "export": "torchship.export",
    "serve": "torchship.serve",
    "handlers": "torchship.handlers",
}
# Third-party modules that cost about half a second or more to import here (torch 3 s, torch._inductor 2 s more,
# matplotlib.pyplot 1.7 s, kserve 3.9 s, onnxruntime.quantization 0.4 s more), or that a runtime may lack on purpose
# (the torch-free containers, TorchServe's workers, an app embedding the ONNX model): the only ones worth putting off
# until a function needs them. A submodule listed here is heavy on top of its package.
LAZY = (
    *("torch", "torch._inductor", "torchvision", "onnx", "onnxruntime", "onnxruntime.quantization", "onnxscript"),
    *("matplotlib", "kserve", "kubernetes", "opentelemetry", "uvloop", "mlxtend", "transformers", "ts"),
    *("model_archiver", "tokenizers"),
)


@functools.cache
def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            out[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return out


def imported(name: str, node: ast.AST) -> list[str]:
    """The modules an import statement of module NAME names, relative ones resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = name.split(".") if modules()[name].name == "__init__.py" else name.split(".")[:-1]
    if node.level:
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, node.module] if node.module else package)
    else:
        base = node.module
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules()]
    return [base, *submodules]


@functools.cache
def imports(name: str) -> tuple[tuple[str, int, bool], ...]:
    """(module, line, at module level) for every import in NAME that runs (those under `if TYPE_CHECKING:` never do)."""
    tree = ast.parse(modules()[name].read_text())
    local = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    typing_only = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.If) and isinstance(f.test, ast.Name) and f.test.id == "TYPE_CHECKING"
        for n in ast.walk(f)
    }
    return tuple(
        (m, node.lineno, id(node) not in local)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only
        for m in imported(name, node)
    )


def ours(module: str) -> list[str]:
    """MODULE and the packages it lives in (importing a module runs its packages' __init__ first)."""
    parts = module.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in modules()]


@functools.cache
def loads(name: str) -> frozenset[str]:
    """Every module importing NAME loads, through module-level imports only."""
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m in modules():
            todo += [p for target, _, top in imports(m) if top for p in (*ours(target), target)]
    return frozenset(seen)


def heavy(names) -> set[str]:
    return {e for n in names for e in LAZY if n == e or n.startswith(f"{e}.")}


def block_above(lines: list[str], line: int) -> list[str]:
    """The import and comment lines right above LINE (1-based): a group of imports shares one comment."""
    out, k = [], line - 2
    while k >= 0 and lines[k].strip().startswith(("import ", "from ", "#")):
        out.append(lines[k].strip())
        k -= 1
    return out


def test_the_scan_sees_the_whole_source():
    assert {"torchship.handlers.oip.pipeline", "torchship.export.proof.verify", "torchship.cli"} <= set(modules())
    assert ("torchship.handlers.oip.pipeline", 0, True) not in imports("torchship.handlers.oip.rest")  # lines count
    assert any(m == "torchship.handlers.oip.pipeline" and top for m, _, top in imports("torchship.handlers.oip.rest"))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk closes (a node met again while still on the walk's path)."""
    found, path, state = [], [], {}

    def visit(node: str) -> None:
        state[node] = "on path"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "on path":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_walk_finds_a_circle_through_a_package():
    graph = {"a": {"a.b"}, "a.b": {"a.c"}, "a.c": {"a"}, "d": {"a.b"}}
    assert circles(graph) == [["a", "a.b", "a.c", "a"]] and circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back_through_others():
    graph = {name: {p for m, _, _ in imports(name) for p in ours(m) if p != name} for name in modules()}
    found = circles(graph)
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_function_local_imports_put_off_something_heavy_and_say_why():
    wrong = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for target, line, top in imports(name):
            if top:
                continue
            gain = heavy(loads(target) if target in modules() else {target}) - heavy(loads(name))
            said = "#" in lines[line - 1] or any(x.startswith("#") for x in block_above(lines, line))
            if not gain or not said:
                why = "imports nothing heavy the module lacks" if not gain else "says no reason"
                wrong.append(f"{path.relative_to(ROOT)}:{line} {target}: {why}")
    assert not wrong, "\n".join(wrong)
