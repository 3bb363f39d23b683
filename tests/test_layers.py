"""The package's layers (issue 27): every import of a wsiseg module, read from the source with ``ast`` (nothing is
imported; imports inside functions count: a lazy import is still a dependency), goes to the same or a lower layer,
with no cycle and no private name crossing a module boundary."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "wsiseg"

#: low to high: a module may import modules of its own layer or of lower ones. A module belongs to the entry that
#: names it or its nearest package ("wsi" holds tissue, grid, stitch and resume; "wsi.run" is the run above them);
#: "wsiseg" is the package root.
LAYERS = (
    ("core", "parallel.workers", "options"),  # errors, atomic writes, process settings, worker processes, the options
    ("io",),                                   # slide reading
    ("models",),                               # networks, their configs and checkpoints
    ("segmenters",),                           # a tile -> its instances; the model registry
    ("wsi",),                                  # tissue, the tile grid, stitching, the resume journal
    ("export",),                               # GeoJSON, OME-Zarr labels
    ("eval",),                                 # metrics, `wsiseg eval`, white/glass measures
    ("parallel",),                             # tile workers, the predicting process
    ("wsi.run",),                              # one slide through the pipeline
    ("api",),                                  # the public API
    ("train", "parallel.cohort"),              # the trainer; cohorts on dask.distributed
    ("adapt",),                                # wsiseg adapt
    ("cli", "__main__", "wsiseg"),             # the command line; the package root
)


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = ("wsiseg",) + p.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> tuple[list[tuple[str, str | None, int]], dict[str, str], ast.AST]:
    """``(imported module, imported name or None, line)`` for every import of a wsiseg module in ``name``'s source,
    the local names bound to wsiseg modules, and the tree."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "wsiseg" or a.name.startswith("wsiseg."):
                    out.append((a.name, None, node.lineno))
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases["wsiseg"] = "wsiseg"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == "wsiseg" or mod.startswith("wsiseg.")):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in MODULES:
                    out.append((sub, None, node.lineno))
                    aliases[a.asname or a.name] = sub
                else:
                    out.append((mod, a.name, node.lineno))
    return out, aliases, tree


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _layer(mod: str) -> int:
    rel = mod[len("wsiseg."):] if mod.startswith("wsiseg.") else mod
    best, index = -1, None
    for i, names in enumerate(LAYERS):
        for key in names:
            if (rel == key or rel.startswith(key + ".")) and len(key) > best:
                best, index = len(key), i
    assert index is not None, f"{mod}: in no layer of LAYERS (tests/test_layers.py): add it"
    return index


def _graph() -> tuple[dict[str, dict[str, tuple[str, int]]], list[str]]:
    """importer -> {imported -> (file, line)} and the private crossings found."""
    edges: dict[str, dict[str, tuple[str, int]]] = {}
    private = []
    for name, path in MODULES.items():
        rel = str(path.relative_to(PKG.parent))
        imports, aliases, tree = _imports(name, path)
        deps = edges.setdefault(name, {})
        for mod, attr, line in imports:
            if mod != name and mod in MODULES:
                deps.setdefault(mod, (rel, line))
            if attr is not None and _private(attr) and mod != name:
                private.append(f"{name} imports {mod}.{attr} ({rel}:{line})")
            if attr is None and _private(mod.rpartition(".")[2]):
                private.append(f"{name} imports the private module {mod} ({rel}:{line})")
        for node in ast.walk(tree):  # module._name through a module bound by an import
            if isinstance(node, ast.Attribute) and _private(node.attr):
                head = _dotted(node.value)
                if head is None:
                    continue
                first, _, rest = head.partition(".")
                if first in aliases:
                    target = aliases[first] + ("." + rest if rest else "")
                    if target in MODULES and target != name:
                        private.append(f"{name} uses {target}.{node.attr} ({rel}:{node.lineno})")
    return edges, private


def _cycles(edges: dict[str, dict[str, tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
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
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_package():
    edges, _ = _graph()
    assert "wsiseg.api" in edges and "wsiseg.wsi.run" in edges["wsiseg.api"]
    assert "wsiseg.core.errors" in edges["wsiseg.io.slide"]


def test_no_import_cycle():
    edges, _ = _graph()
    lines = []
    for comp in _cycles(edges):
        lines.append("cycle: " + ", ".join(comp))
        for v in comp:
            for w, (f, line) in sorted(edges[v].items()):
                if w in comp:
                    lines.append(f"  {v} -> {w} ({f}:{line})")
    assert not lines, "\n".join(lines)


def test_no_private_name_crosses_modules():
    _, private = _graph()
    assert not private, "\n".join(private)


def test_imports_go_down_the_layers():
    edges, _ = _graph()
    bad = [f"{v} (layer {_layer(v)}) -> {w} (layer {_layer(w)}) ({f}:{line})"
           for v in sorted(edges) for w, (f, line) in sorted(edges[v].items()) if _layer(w) > _layer(v)]
    assert not bad, "imports up the layers (LAYERS in tests/test_layers.py):\n" + "\n".join(bad)


#: the slide's run path (issue 27: "no function over ~80 lines in the run path")
RUN_PATH = ("wsiseg.io", "wsiseg.wsi", "wsiseg.parallel", "wsiseg.segmenters", "wsiseg.export")
MAX_RUN_PATH_LINES = 85
#: "no public function with more than ~8 parameters" (``self``/``cls`` not counted; ``__init__`` counts as public)
MAX_PARAMETERS = 8


def _functions():
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, path, node


def test_run_path_functions_are_short():
    long = [f"{path}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, path, node in _functions()
            if name.startswith(RUN_PATH) and node.end_lineno - node.lineno + 1 > MAX_RUN_PATH_LINES]
    assert not long, "\n".join(long)


def test_public_functions_take_few_parameters():
    many = []
    for _, path, node in _functions():
        if node.name.startswith("_") and node.name != "__init__":
            continue
        a = node.args
        named = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        count = len([x for x in named if x not in ("self", "cls")])
        if count > MAX_PARAMETERS:
            many.append(f"{path}:{node.lineno} {node.name}: {count} parameters")
    assert not many, "\n".join(many)


def test_no_segmenter_probes_outside_segmenters():
    """Outside ``segmenters/`` a segmenter's optional parts are read through ``segmenters.base``'s protocols
    (``describe(seg)``, ``isinstance(seg, Calibrating)``...), never probed with ``hasattr``/``getattr(seg, ...)``."""
    probes = []
    for name, path in MODULES.items():
        if name.startswith("wsiseg.segmenters"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("hasattr", "getattr") and node.args \
                    and isinstance(node.args[0], ast.Name) and node.args[0].id == "seg":
                probes.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.func.id}(seg, ...)")
    assert not probes, "\n".join(probes)
