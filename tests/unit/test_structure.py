"""The package's shape, read from its source (AST, nothing imported): no import cycle, no private name or
module-level mutable state reached across modules, no sys.path edits, short files that say their one job."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 500
# Calls that change a dict, list or set in place
MUTATORS = {"append", "extend", "insert", "remove", "pop", "popitem", "clear", "update", "setdefault", "add",
            "discard", "sort", "reverse", "__setitem__", "__delitem__"}
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "Counter", "OrderedDict", "deque"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


PACKAGE_FILES = python_files("camex_ds")
MODULES = {module_name(p): p for p in PACKAGE_FILES}
# who may reach into camex_ds: the package itself and the programs over it
READERS = {module_name(p): p for p in python_files("camex_ds", "tools", "launcher")}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in READERS.items()}


@dataclass(frozen=True)
class Import:
    """One imported binding: `name` is None for a whole module bound to `alias`, else the name taken from it."""

    target: str
    name: Optional[str]
    alias: str
    in_function: bool
    node: ast.stmt


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    package = module if READERS[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports(module: str) -> list[Import]:
    """Every camex_ds binding `module` imports, at module level or in a function (TYPE_CHECKING blocks skipped)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "camex_ds":
                        found.append(Import(a.name, None, a.asname or a.name, in_function, child))
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, child)
                if source.split(".")[0] == "camex_ds":
                    for a in child.names:
                        sub = f"{source}.{a.name}"
                        found.append(Import(sub, None, a.asname or a.name, in_function, child) if sub in MODULES
                                     else Import(source, a.name, a.asname or a.name, in_function, child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(TREES[module], False)
    return found


IMPORTS = {name: imports(name) for name in READERS}


def graph(function_level: bool) -> dict[str, set[str]]:
    return {m: {i.target for i in IMPORTS[m] if i.target in MODULES and i.target != m
                and (function_level or not i.in_function)} for m in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def describe(component: list[str], edges: dict[str, set[str]]) -> str:
    inside = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(edges[m] & inside))}" for m in component)


def test_no_import_cycle_among_module_level_imports():
    edges = graph(function_level=False)
    assert not cycles(edges), "\n".join(describe(c, edges) for c in cycles(edges))


def test_no_import_cycle_even_through_imports_inside_functions():
    """An import deferred into a function hides a cycle from Python, not from the design."""
    edges = graph(function_level=True)
    assert not cycles(edges), "\n".join(describe(c, edges) for c in cycles(edges))


def references(module: str):
    """`(target module, attribute, node)` for every `alias.attr` (or deeper `pkg.mod.attr`) in `module` whose
    prefix is a camex_ds module it imported, and every name it imported from one (`from m import attr`)."""
    # `import camex_ds.a.b` binds `camex_ds`, from which `camex_ds.a.b.x` is read
    modules = {i.alias.split(".")[0]: i.target.split(".")[0] if "." in i.alias else i.target
               for i in IMPORTS[module] if i.name is None}
    taken = {i.alias: (i.target, i.name) for i in IMPORTS[module] if i.name is not None}
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Name) and node.id in taken:
            yield (*taken[node.id], node)
        elif isinstance(node, ast.Attribute):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in modules:
                continue
            dotted = [modules[value.id], *reversed(chain)]
            # the longest module prefix, then the attribute read from it; only the outermost node reports
            for cut in range(len(dotted) - 1, 0, -1):
                if ".".join(dotted[:cut]) in MODULES:
                    if cut == len(dotted) - 1:
                        yield ".".join(dotted[:cut]), dotted[cut], node
                    break
    for i in IMPORTS[module]:
        if i.name is not None:
            yield i.target, i.name, i.node


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_reached_from_another_module():
    """`from m import _x` or `m._x` outside m: make it public (with a docstring) or move it where it is used."""
    first = {}  # (reader, name) -> the first line that reaches it
    for m in READERS:
        for target, name, node in references(m):
            if _private(name) and target != m:
                first[m, f"{target}.{name}"] = min(first.get((m, f"{target}.{name}"), node.lineno), node.lineno)
    bad = [f"{READERS[m].relative_to(ROOT)}:{line} uses {name}" for (m, name), line in sorted(first.items())]
    assert not bad, "\n".join(bad)


def _sys_path_edit(node: ast.AST) -> bool:
    def is_sys_path(n: ast.AST) -> bool:
        return isinstance(n, ast.Attribute) and n.attr == "path" and getattr(n.value, "id", None) == "sys"

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in MUTATORS and is_sys_path(node.func.value)
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets)
    return False


def test_no_sys_path_edits():
    """The package is installed (`pip install -e .`): programs and tests import it, they do not patch sys.path."""
    bad = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in python_files("camex_ds", "tools", "launcher", "tests")
           for node in ast.walk(ast.parse(path.read_text())) if _sys_path_edit(node)]
    assert not bad, "\n".join(bad)


def test_no_module_loaded_from_a_file_path():
    """Tests and tools reach a command through `camex_ds.cli.<x>`, not `importlib.util.spec_from_file_location`."""
    bad = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in python_files("camex_ds", "tools", "launcher", "tests")
           for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Attribute) and node.attr == "spec_from_file_location"]
    assert not bad, "\n".join(bad)


def test_every_module_is_short_and_says_its_job():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in PACKAGE_FILES if (n := len(p.read_text().splitlines())) > MAX_LINES]
    undocumented = [str(p.relative_to(ROOT)) for p in PACKAGE_FILES if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not long and not undocumented, f"over {MAX_LINES} lines: {long}; no module docstring: {undocumented}"


def _is_mutable(value: Optional[ast.AST]) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    func = value.func if isinstance(value, ast.Call) else None
    return getattr(func, "id", None) in MUTABLE_CALLS or getattr(func, "attr", None) in MUTABLE_CALLS


def module_state(module: str) -> set[str]:
    """Top-level names of `module` that hold state: a dict/list/set it (or anyone) changes in place, or a global a
    function rebinds (`global X`)."""
    tree = TREES[module]
    containers = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign)) and _is_mutable(node.value)
                  for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    rebound = {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}
    changed = set()
    for reader in READERS:
        own = {name: name for name in containers} if reader == module else {}
        refs = {id(node): name for target, name, node in references(reader) if target == module}
        for node in ast.walk(TREES[reader]):
            changed_value = None
            if isinstance(node, (ast.Subscript,)) and isinstance(node.ctx, (ast.Store, ast.Del)):
                changed_value = node.value
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Subscript):
                changed_value = node.target.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                changed_value = node.func.value
            if changed_value is None:
                continue
            if isinstance(changed_value, ast.Name) and changed_value.id in own:
                changed.add(changed_value.id)
            elif id(changed_value) in refs:
                changed.add(refs[id(changed_value)])
    return (containers & changed) | rebound


def test_no_module_level_mutable_state_read_from_another_module():
    """Hidden state shared through a module global (`comm.TRAFFIC["bytes"] += n` read by the loop): pass an object
    instead, so the reader says where its numbers come from."""
    state = {m: module_state(m) for m in MODULES}
    bad = sorted({f"{READERS[reader].relative_to(ROOT)} reads {target}.{name}" for reader in READERS
                  for target, name, node in references(reader) if reader != target and name in state.get(target, ())})
    assert not bad, "\n".join(bad)
