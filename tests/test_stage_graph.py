"""dvc.yaml lists as deps the project code each stage runs, so that `dvc repro` reruns a stage whose code changed;
the library has no import cycle, and the README lists its modules.

DVC knows only the deps it is told. A module missing from them (the one that picks the training dtype,
say) lets `dvc repro` call a stage up to date while its code would now give other results.
"""

from __future__ import annotations

import re
import subprocess
import sys

from ruamel.yaml import YAML

from llm.imports import code_fingerprint, direct_imports, imported_files
from tests.conftest import ROOT


def test_imported_files_follow_every_kind_of_import():
    loaded = imported_files("flows.pretrain", at_import_time=True)
    assert {"flows/pretrain.py", "flows/training.py", "llm/pretrain.py", "llm/model.py"} <= loaded
    assert "llm/distributed.py" in loaded  # `from llm import distributed`
    assert "llm/chat.py" not in loaded
    assert "llm/gpt2_weights.py" not in imported_files("llm.finetune", at_import_time=True)
    assert "llm/gpt2_weights.py" in imported_files("llm.finetune", at_import_time=False)  # inside a function


def test_type_checking_imports_are_not_followed(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm/a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llm.b\n"
                                       "else:\n    import llm.c\n")
    for name in "bc":
        (tmp_path / f"llm/{name}.py").write_text("")
    assert imported_files("llm.a", at_import_time=True, root=tmp_path) == {"llm/a.py", "llm/c.py"}


def test_the_training_code_fingerprint_leaves_out_what_does_not_train():
    pretrain = code_fingerprint("llm.pretrain")
    assert {"llm/model.py", "llm/train.py", "llm/optim.py", "llm/gpt2_weights.py"} <= set(pretrain)
    assert not {"llm/report.py", "llm/tracking.py", "llm/plots.py", "flows/training.py"} & set(pretrain)


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


def test_the_data_stages_run_no_model_code_and_start_without_torch():
    # The README's promise: an edit to llm/model.py reruns the training stages and evaluate, not the data
    # stages. And a data stage's process does not pay for importing torch, which it never uses.
    stages = YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]
    for name in ("download", "tokenize"):
        assert not {"llm/model.py", "llm/loss.py", "llm/instructions.py"} & set(stages[name]["deps"]), name
    check = ("import sys, flows.download, flows.tokenize\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m == 'llm.model'))")
    loaded = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout[:500]


def test_resume_state_is_not_part_of_any_dvc_output():
    # resume/ holds optimizer state (twice the model) for every kept checkpoint: DVC would copy it into
    # its cache on every run and delete it before a rerun, so training outputs name the model files.
    stages = YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]
    for name in ("pretrain", "finetune"):
        outs = [next(iter(out)) if isinstance(out, dict) else out for out in stages[name]["outs"]]
        folder = f"data/checkpoints/{name}"
        assert folder not in outs and f"{folder}/resume" not in outs
        assert f"{folder}/model.safetensors" in outs and f"{folder}/config.json" in outs


def test_no_module_of_the_library_imports_itself_back():
    """No import cycle in llm/, counting imports made inside functions (a lazy import hides a cycle; it
    does not remove it): each module's imports form a graph a reader can take in from the bottom up."""
    graph = {path.relative_to(ROOT).as_posix(): direct_imports(path.relative_to(ROOT).as_posix(), at_import_time=False)
             for path in sorted((ROOT / "llm").glob("*.py"))}
    cycles, done = [], set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            cycles.append(" -> ".join(trail[trail.index(node):] + [node]))
            return
        if node in done:
            return
        for imported in sorted(graph.get(node, ())):
            visit(imported, trail + [node])
        done.add(node)

    for node in graph:
        visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_readme_lists_every_module_of_the_library_and_no_other():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("llm/          the library"):text.index("flows/        one Prefect flow")]
    rows = layout.splitlines()[1:]  # the module columns start at the 29th character of each row
    columns = re.sub(r"\([^)]*\)", "", "\n".join(row[28:] for row in rows))  # remarks may span rows
    listed = set(re.findall(r"[a-z_0-9]+", columns))
    modules = {path.stem for path in (ROOT / "llm").glob("*.py")} - {"__init__"}
    assert listed == modules, f"not in the README: {sorted(modules - listed)}; not modules: {sorted(listed - modules)}"
