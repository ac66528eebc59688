"""The package's shape: every import inside `hf_lts` points down (no circle, function-level imports
included) and no module grows past the size a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_lts"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The `hf_lts` modules ``name`` imports anywhere in its body. Importing ``a.b.c`` runs the package
    ``a.b``'s ``__init__`` too, so that counts as an import of it — except where that package is one of
    ``name``'s own (already being imported when ``name`` runs) or the root (which imports everything, and
    under which every module sits)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    found: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # the packages on the way down, not the root
            if ".".join(parts[:i]) in modules:
                found.add(".".join(parts[:i]))
        if target == "hf_lts":
            found.add(target)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return found - own


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph``, or ``None``."""
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return [*stack[stack.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            if found := visit(nxt, [*stack, node]):
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        if found := visit(start, []):
            return found
    return None


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "hf_lts.quantization.layers" in graph["hf_lts.quantization.prepare"]  # the parser sees imports
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_modules_stay_readable() -> None:
    sources = [p for p in PACKAGE.rglob("*") if p.suffix in {".py", ".cpp", ".h"}]
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in sources}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_the_kernels_constants_are_the_python_ones() -> None:
    """``csrc/constants.h`` copies constants of the Python side, each line naming the one it copies."""
    import math
    import re

    from hf_lts import update
    from hf_lts.quantization import fused, state

    modules = {"fused": fused, "state": state, "update": update}
    header = (PACKAGE / "quantization" / "csrc" / "constants.h").read_text()
    values: dict[str, float] = {}
    checked = 0
    for name, expr, source in re.findall(r"constexpr \w+ (k\w+) = (.+?);(?:\s*// (\w+\.\w+))?", header):
        expr = re.sub(r"static_cast<float>\((\w+)\)", r"\1", expr)
        values[name] = eval(re.sub(r"(\d)f\b", r"\1", expr), {}, dict(values))  # noqa: S307 (our own header)
        if source:
            module, attr = source.split(".")
            assert math.isclose(values[name], getattr(modules[module], attr), rel_tol=1e-7), source
            checked += 1
    assert checked == 7
