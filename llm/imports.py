"""The project code a module runs: its import closure, read from the source, and a hash of it.

Two users need the same answer to "which of our files does this stage run?": `dvc.yaml`, whose code deps
must list them (checked by tests/test_stage_graph.py), and the trainer's fingerprint, which must change
when code that shapes the weights changes and must not change when an unrelated module is edited (a
comment in llm/report.py must not make a killed pretrain run start over).

    imported_files("llm.pretrain", at_import_time=False)   # {"llm/pretrain.py", "llm/model.py", ...}
    code_fingerprint("llm.pretrain")                       # {"llm/model.py": "<sha256>", ...}

The walk reads the source with `ast`, never imports anything, and follows `import x`, `from x import y`
and `from pkg import module`. Imports under `if TYPE_CHECKING:` never run and are not followed.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llm", "flows")


def module_path(module: str, root: Path = ROOT) -> str | None:
    """The project file of a module name, relative to `root`; None if it is not a project module."""
    if module.split(".")[0] not in PACKAGES:
        return None
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    return path.relative_to(root).as_posix() if path.is_file() else None


def _is_type_checking(node: ast.stmt) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.Module, *, at_import_time: bool) -> Iterator[ast.stmt]:
    """The statements that may run: all of them, or only those the module's import itself runs (not
    those inside functions and classes, which run only if called)."""
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo += node.orelse  # type: ignore[attr-defined]
            continue
        if at_import_time and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield node
        todo += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]


def _imports(tree: ast.Module, *, at_import_time: bool) -> Iterator[str]:
    """The module names a module imports (see `_statements` for which)."""
    for node in _statements(tree, at_import_time=at_import_time):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)  # `from llm import files`


def direct_imports(path: str, *, at_import_time: bool, root: Path = ROOT) -> set[str]:
    """The project files that the file `path` (relative to `root`) imports itself, not through another."""
    names = _imports(ast.parse((root / path).read_text(encoding="utf-8")), at_import_time=at_import_time)
    return {found for name in names if (found := module_path(name, root)) is not None} - {path}


def imported_files(module: str, *, at_import_time: bool, root: Path = ROOT) -> set[str]:
    """The files of `module` and of the project modules it imports, at any depth, relative to `root`."""
    files: set[str] = set()
    todo = [module_path(module, root)]
    while todo:
        path = todo.pop()
        if path is None or path in files:
            continue
        files.add(path)
        todo += direct_imports(path, at_import_time=at_import_time, root=root)
    return files


def code_fingerprint(module: str, root: Path = ROOT) -> dict[str, str]:
    """{file: sha256 of its source} for every project file `module` may run, imports made inside
    functions included (they shape the result when called: the GPT-2 weight loader, say)."""
    return {path: hashlib.sha256((root / path).read_bytes()).hexdigest()
            for path in sorted(imported_files(module, at_import_time=False, root=root))}
