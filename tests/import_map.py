"""The package's import map: which pnapo_jax module imports which, module-level and function-local alike.

    python -m tests.import_map            # every module's arrows, then any circle and any arrow pointing up
    python -m tests.import_map --layers   # the modules of each layer, bottom first

Read with `ast` only (nothing is imported), so a function-local import counts as much as a top-level one;
`if TYPE_CHECKING:` blocks are skipped (they never run). `tests/test_layers.py` asserts what this prints.
"""

import ast
import pathlib
import sys
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "pnapo_jax"

# Layer of each module, by the longest matching prefix; an import may only point to the same or a lower layer.
LAYERS = {
    # 0: foundations (no pnapo_jax import above them)
    "pnapo_jax.errors": 0, "pnapo_jax.flow": 0, "pnapo_jax.data.batch": 0,
    "pnapo_jax.cli": 1, "pnapo_jax.sharding": 1, "pnapo_jax.metrics": 1, "pnapo_jax.workdir": 1,
    "pnapo_jax.checkpoint": 1, "pnapo_jax.data": 1, "pnapo_jax.fused_adamw": 1,
    # models know nothing of files or training; weight files for every model live in convert/
    "pnapo_jax.models": 2, "pnapo_jax.objective": 2,
    "pnapo_jax.convert": 3,
    "pnapo_jax.text": 4, "pnapo_jax.rewards": 4, "pnapo_jax.reference": 4,
    "pnapo_jax.world": 5,  # above backbones: the base model is any backbone's
    "pnapo_jax.sd3_text": 4, "pnapo_jax.pipelines": 6,  # SD3's prompt encoding; the FLUX / SD3 pipeline folders
    "pnapo_jax.backbones": 5,
    # the run config: its model fields from a backbone's model config, the backbone checks its own fields
    "pnapo_jax.config": 6, "pnapo_jax.config_check": 6,
    # what every command builds on
    "pnapo_jax.setup": 7,
    "pnapo_jax.sampling": 8, "pnapo_jax.step": 8,
    "pnapo_jax.pipeline_world": 9, "pnapo_jax.worlds": 10, "pnapo_jax.report": 10, "pnapo_jax.ref_cache": 9,
    # commands, beside each other and under the loop
    "pnapo_jax.generate": 11, "pnapo_jax.evaluate": 11, "pnapo_jax.export": 11, "pnapo_jax.sample": 11,
    "pnapo_jax.aot": 11, "pnapo_jax.bench": 11,
    "pnapo_jax.world.pretrain": 11, "pnapo_jax.world.reflow": 12, "pnapo_jax.world.straightness": 11,
    "pnapo_jax.data.import_pairs": 11, "pnapo_jax.rewards.convert_open_clip": 11,
    # the training loop on top, its entry points above it
    "pnapo_jax.train": 20,
    "pnapo_jax.main": 21, "pnapo_jax.sweep": 21, "pnapo_jax.sweep_report": 22,
}
COMMANDS = ("pnapo_jax.generate", "pnapo_jax.evaluate", "pnapo_jax.export", "pnapo_jax.sample", "pnapo_jax.aot",
            "pnapo_jax.bench")
NEVER = (("pnapo_jax.models", "pnapo_jax.convert"),)  # (package, package it may never import)


def modules() -> dict[str, pathlib.Path]:
    """Module name -> file, for every .py file of the package (a package is its __init__)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level and inside functions, not under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, known: dict[str, pathlib.Path]) -> str | None:
    """The package module `name` refers to (the longest known prefix), or None outside the package."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, known: dict[str, pathlib.Path]) -> set[str]:
    """The package modules `module` imports (`from pkg import sub` counts as importing pkg.sub)."""
    path = known[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import sub` imports pkg.sub; pkg itself counts only for a name that is not a module
            targets = subs + ([base] if any(s not in known for s in subs) else [])
        for target in targets:
            resolved = _resolve(target, known)
            if resolved and resolved != module:
                out.add(resolved)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, known) - {PACKAGE} for m in known if m != PACKAGE}  # its __init__ is empty


def layer(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Arrows from a module to one of a higher layer (or to / from a module no layer covers)."""
    bad = []
    for m, targets in sorted(g.items()):
        for t in sorted(targets):
            lm, lt = layer(m), layer(t)
            if lm is None or lt is None or lt > lm:
                bad.append((m, t))
    return bad


def crossings(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Arrows named in NEVER (models loading weight files), and from a command to the training loop."""
    inside = lambda m, p: m == p or m.startswith(p + ".")
    bad = [(m, t) for m, ts in g.items() for t in ts for a, b in NEVER if inside(m, a) and inside(t, b)]
    bad += [(m, t) for m, ts in g.items() for t in ts
            if any(inside(m, c) for c in COMMANDS) and inside(t, "pnapo_jax.train")]
    return sorted(bad)


def main(argv: list[str]) -> int:
    g = graph()
    short = lambda m: m.removeprefix(PACKAGE + ".")
    if "--layers" in argv:
        by_layer: dict[int | None, list[str]] = {}
        for m in g:
            by_layer.setdefault(layer(m), []).append(short(m))
        for n in sorted(by_layer, key=lambda n: -1 if n is None else n):
            print(f"{n}: {' '.join(sorted(by_layer[n]))}")
        return 0
    for m in sorted(g, key=lambda m: (layer(m) or 0, m)):
        if g[m]:
            print(f"[{layer(m)}] {short(m)} -> {', '.join(short(t) for t in sorted(g[m]))}")
    found = cycles(g)
    up = upward(g)
    cross = crossings(g)
    print(f"\n{len(found)} circle(s)")
    for c in found:
        print("  circle: " + " <-> ".join(short(m) for m in c))
    print(f"{len(up)} arrow(s) pointing up")
    for m, t in up:
        print(f"  up: {short(m)} [{layer(m)}] -> {short(t)} [{layer(t)}]")
    print(f"{len(cross)} forbidden arrow(s) (models -> convert, command -> train)")
    for m, t in cross:
        print(f"  crossing: {short(m)} -> {short(t)}")
    return 1 if found or up or cross else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
