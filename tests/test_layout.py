"""The package's shape: no import circle among microdit's modules, and no long module without a reason."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "microdit"
MAX_LINES = 500
REASON = "Longer than 500 lines because"


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports, at module level or inside functions alike.

    `from a.b import c` imports a.b, and a.b.c too when that is a module; relative imports are
    resolved against `name`'s package."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known}


def import_circles(package: Path) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (strongly connected
    components of more than one module)."""
    known = modules(package)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        reach[start] = seen
    circles, placed = [], set()
    for m in sorted(graph):
        if m in placed:
            continue
        group = sorted({m} | {n for n in reach[m] if m in reach[n]})
        placed.update(group)
        if len(group) > 1:
            circles.append(group)
    return circles


def long_without_reason(package: Path, max_lines: int = MAX_LINES) -> list[str]:
    """Modules over `max_lines` lines whose docstring does not say why."""
    out = []
    for name, path in modules(package).items():
        text = path.read_text()
        if len(text.splitlines()) > max_lines and REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            out.append(f"{name} ({len(text.splitlines())} lines)")
    return out


def test_no_import_circle():
    assert import_circles(PACKAGE) == []


def test_long_modules_say_why():
    assert long_without_reason(PACKAGE) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "a.py").write_text('"""A."""\nfrom pkg.sub import b\n')
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")  # a circle closed inside a function
    (pkg / "sub" / "c.py").write_text("import pkg.sub\n")  # a package and its own module
    (pkg / "long.py").write_text('"""Long, for no stated reason."""\n' + "x = 1\n" * MAX_LINES)
    (pkg / "reasoned.py").write_text(f'"""Long.\n\n{REASON} it is.\n"""\n' + "x = 1\n" * MAX_LINES)
    assert import_circles(pkg) == [["pkg.a", "pkg.sub.b"], ["pkg.sub", "pkg.sub.c"]]
    assert long_without_reason(pkg) == [f"pkg.long ({MAX_LINES + 1} lines)"]
