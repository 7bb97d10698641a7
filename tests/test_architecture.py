"""The design's limits, checked on the package's source (ARCHITECTURE.md, issue 17).

- size: no module over 400 lines, no function (sync or async, nested ones too) over 60 lines, no class over
  300 lines; a node's lines are ``end_lineno - lineno + 1`` of its AST node (docstrings included, decorators
  not);
- the window engine has no dead public surface: the name of every public method or property of its classes is
  read as an attribute somewhere (in the package or in the tests), so a documented entry point cannot rot
  unused (``LayerWindow.aforward`` and ``kv_clear`` did).

The layering itself is import-linter's job (``lint-imports``, contracts in pyproject.toml).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "homering"
TESTS = ROOT / "tests"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path, base: Path = ROOT) -> str:
    return path.relative_to(base).as_posix()


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _lines(node: ast.stmt) -> int:
    assert node.end_lineno is not None, f"{type(node).__name__} without end_lineno"
    return node.end_lineno - node.lineno + 1


def _qualified_defs(tree: ast.Module) -> list[tuple[str, ast.stmt]]:
    """Every function and class of a module with its dotted name (``Outer.method.inner``)."""
    found: list[tuple[str, ast.stmt]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                found.append((name, child))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def size_offenders(folder: Path = PACKAGE) -> list[str]:
    """``path:line kind name: N lines (limit L)`` for every module, function and class over its limit."""
    out = []
    for path in _modules(folder):
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{_rel(path, folder.parent)}: module: {n} lines (limit {MAX_MODULE_LINES})")
        for name, node in _qualified_defs(_parse(path)):
            is_class = isinstance(node, ast.ClassDef)
            limit = MAX_CLASS_LINES if is_class else MAX_FUNCTION_LINES
            n = _lines(node)
            if n > limit:
                kind = "class" if is_class else "function"
                out.append(f"{_rel(path, folder.parent)}:{node.lineno}: {kind} {name}: {n} lines (limit {limit})")
    return out


def test_size_limits():
    offenders = size_offenders()
    assert not offenders, f"{len(offenders)} over the size limits:\n" + "\n".join(offenders)


def test_the_size_check_sees_nested_and_async_functions(tmp_path):
    body = "".join(f"            x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # inner: 61 lines
    (tmp_path / "m.py").write_text(
        "class C:\n"
        "    async def outer(self):\n"
        "        def inner():\n" + body + "        return inner\n"
        "def short():\n"
        "    return 1\n"
    )
    found = size_offenders(tmp_path)
    assert any("function C.outer.inner:" in o for o in found), found
    assert any("function C.outer:" in o for o in found), found
    assert not any("short" in o or "class C" in o for o in found), found


def _public_members(cls: ast.ClassDef) -> list[str]:
    return [
        n.name
        for n in cls.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_")
    ]


def _attribute_names(paths: list[Path]) -> set[str]:
    """The attribute names read in these files (``x.name``)."""
    return {node.attr for path in paths for node in ast.walk(_parse(path)) if isinstance(node, ast.Attribute)}


def test_the_window_engine_has_no_unused_public_methods():
    used = _attribute_names(_modules(PACKAGE) + _modules(TESTS))
    unused = []
    for path in _modules(PACKAGE / "engine"):
        for node in _parse(path).body:
            if isinstance(node, ast.ClassDef):
                unused += [f"{_rel(path)}: {node.name}.{name}" for name in _public_members(node) if name not in used]
    assert not unused, "public methods nothing calls (remove them, or use them):\n" + "\n".join(unused)
