"""Public names of the package that nothing but tests uses (issue 15: "dead code gone ... helpers only tests use").

    python tests/dead_code.py     # each unused top-level public name, as file:line name

A top-level function, class or constant of a pnapo_jax module whose name has no leading underscore is used when
the library reaches it: a reference in its own module, an import or a `module.name` in pnapo_jax/, configs/,
benchmarks/ or the notebooks, a `pnapo_jax.module:name` string, or the module's `__all__` (a package's declared
API). tests/ do not count: a helper only tests call is a second path beside the one runs take. Read with `ast`
(nothing is imported); modules are resolved through import aliases, so a same-named function elsewhere does not
keep one alive. `tests/test_dead_code.py` asserts what this prints.
"""

import ast
import json
import sys
from collections.abc import Iterator

from import_map import PACKAGE, ROOT, modules

USERS = ("pnapo_jax", "configs", "benchmarks")  # code that counts as the library's own use
NOTEBOOKS = "notebooks"

# Public API used by no code in the repository, each with why it stays.
ALLOWED: dict[str, str] = {}


def definitions(tree: ast.Module) -> Iterator[tuple[str, int]]:
    """(name, line) of each public top-level def, class and assigned name."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            names = []
        for name in names:
            if not name.startswith("_"):
                yield name, node.lineno


def _sources() -> Iterator[tuple[str | None, str, str]]:
    """(module name or None, file label, source) of every file whose references count."""
    known = {path: name for name, path in modules().items()}
    for top in USERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield known.get(path), str(path.relative_to(ROOT)), path.read_text()
    for path in sorted((ROOT / NOTEBOOKS).glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        lines = [line for cell in code for line in cell.splitlines() if not line.lstrip().startswith(("!", "%"))]
        yield None, str(path.relative_to(ROOT)), "\n".join(lines)


def _absolute(module: str | None, is_package: bool, node: ast.ImportFrom) -> str:
    base = node.module or ""
    if node.level and module:
        package = module if is_package else module.rpartition(".")[0]
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return base


PASSED, DYNAMIC = "*", "?"  # (module, PASSED): the module itself is passed as a value; (DYNAMIC, attr): `x.attr`


def uses(module: str | None, source: str, known: set[str], is_package: bool = False) -> set[tuple[str, str]]:
    """(module, name) pairs this source reaches: its own names, `from m import name`, `alias.name`, strings; and
    (m, PASSED) for a module passed as a value (`load(folder, t5)`), (DYNAMIC, attr) for `x.attr` on anything else
    (`model.init_params` then reaches t5.init_params)."""
    tree = ast.parse(source)
    bases = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    alias: dict[str, str] = {}  # local name -> package module it stands for
    out: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    alias[a.asname or a.name] = f"{base}.{a.name}"
                elif base in known:
                    out.add((base, a.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if module:
                out.add((module, node.id))
            if node.id in alias and id(node) not in bases and isinstance(node.ctx, ast.Load):
                out.add((alias[node.id], PASSED))
        elif isinstance(node, ast.Attribute):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in alias:
                dotted = ".".join([alias[value.id], *reversed(chain)])
                owner, _, name = dotted.rpartition(".")
                out.add((owner, name))
            else:
                out.add((DYNAMIC, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PACKAGE):
            owner, _, name = node.value.replace(":", ".").rpartition(".")
            out.add((owner, name))
    return out


def _declared(tree: ast.Module) -> set[str]:
    """The names of a module's `__all__`."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
    return set()


def unused() -> list[str]:
    """`file:line name` of every public top-level name of the package nothing outside tests/ uses."""
    known = modules()
    reached: dict[tuple[str, str], set[str]] = {}  # (module, name) -> the files that reach it
    for module, label, source in _sources():
        is_package = module is not None and known[module].name == "__init__.py"
        for pair in uses(module, source, set(known), is_package):
            reached.setdefault(pair, set()).add(label)
    passed = {m for m, name in reached if name == PASSED}
    dynamic = {name for m, name in reached if m == DYNAMIC}
    out = []
    for module, path in known.items():
        label = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        declared = _declared(tree)
        loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        for name, line in definitions(tree):
            elsewhere = reached.get((module, name), set()) - {label}
            through_value = module in passed and name in dynamic
            if name in loads or name in declared or elsewhere or through_value or f"{module}.{name}" in ALLOWED:
                continue
            out.append(f"{label}:{line} {name}")
    return out


if __name__ == "__main__":
    found = unused()
    print("\n".join(found))
    print(f"{len(found)} public name(s) nothing outside tests/ uses")
    sys.exit(1 if found else 0)
