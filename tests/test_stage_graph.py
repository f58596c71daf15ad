"""dvc.yaml lists as deps the project code each stage runs, so that `dvc repro` reruns a stage whose code changed.

DVC knows only the deps it is told. A module missing from them (the one that picks the training dtype,
say) lets `dvc repro` call a stage up to date while its code would now give other results.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from ruamel.yaml import YAML

from tests.conftest import ROOT

PACKAGES = ("llm", "flows")


def module_path(module: str) -> str | None:
    """The project file of a module name, relative to the root; None if it is not a project module."""
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    return path.relative_to(ROOT).as_posix() if path.is_file() else None


def _run_on_import(tree: ast.Module) -> Iterator[ast.stmt]:
    """The statements a module's import runs: all but those inside functions and classes."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
            todo += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]


def _imports(tree: ast.Module, *, at_import_time: bool) -> Iterator[str]:
    """The module names a module imports: all of them, or only those its import itself runs (the
    imports inside functions and classes run only if they are called)."""
    for node in _run_on_import(tree) if at_import_time else ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)  # `from llm import files`


def imported_files(module: str, *, at_import_time: bool) -> set[str]:
    """The files of `module` and of the project modules it imports, at any depth."""
    files: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_path(name) if name.split(".")[0] in PACKAGES else None
        if path is None or path in files:
            continue
        files.add(path)
        todo += _imports(ast.parse((ROOT / path).read_text()), at_import_time=at_import_time)
    return files


def test_imported_files_follow_every_kind_of_import():
    loaded = imported_files("flows.pretrain", at_import_time=True)
    assert {"flows/pretrain.py", "flows/training.py", "llm/pretrain.py", "llm/model.py"} <= loaded
    assert "llm/distributed.py" in loaded  # `from llm import distributed`
    assert "llm/chat.py" not in loaded
    assert "llm/gpt2_weights.py" not in imported_files("llm.finetune", at_import_time=True)
    assert "llm/gpt2_weights.py" in imported_files("llm.finetune", at_import_time=False)  # inside a function


def test_each_stage_depends_on_the_code_it_runs():
    stages = YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]
    problems = []
    for name, stage in stages.items():
        module = stage["cmd"].removeprefix("python -m ")
        loaded = imported_files(module, at_import_time=True)  # the stage always runs this code
        reachable = imported_files(module, at_import_time=False)  # ... and may run this
        assert loaded, f"{name}: cannot find the module of {stage['cmd']!r}"
        listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
        if missing := sorted(loaded - listed):
            problems.append(f"stage {name}: add to its deps {missing}")
        if unused := sorted(listed - reachable):
            problems.append(f"stage {name}: it never imports {unused}; remove them from its deps")
    assert not problems, "dvc.yaml:\n" + "\n".join(problems)
