"""dvc.yaml lists as deps the project code each stage runs, so that `dvc repro` reruns a stage whose code changed.

DVC knows only the deps it is told. A module missing from them (the one that picks the training dtype,
say) lets `dvc repro` call a stage up to date while its code would now give other results.
"""

from __future__ import annotations

from ruamel.yaml import YAML

from llm.imports import code_fingerprint, imported_files
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


def test_resume_state_is_not_part_of_any_dvc_output():
    # resume/ holds optimizer state (twice the model) for every kept checkpoint: DVC would copy it into
    # its cache on every run and delete it before a rerun, so training outputs name the model files.
    stages = YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]
    for name in ("pretrain", "finetune"):
        outs = [next(iter(out)) if isinstance(out, dict) else out for out in stages[name]["outs"]]
        folder = f"data/checkpoints/{name}"
        assert folder not in outs and f"{folder}/resume" not in outs
        assert f"{folder}/model.safetensors" in outs and f"{folder}/config.json" in outs
