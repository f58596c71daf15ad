"""`dvc repro` of the data stages in a real git repository: build, no-op, and a targeted rerun."""

from __future__ import annotations

import json

import pytest
from ruamel.yaml import YAML

from tests.conftest import shared_file
from tests.project import dvc, make_repo, stage_env, stages_run


@pytest.mark.slow
def test_repro_builds_then_skips_then_reruns_only_what_changed(tmp_path, prefect_server):
    shared_file("the-verdict.txt")  # skips where the mirror is absent
    repo = make_repo(tmp_path)
    env = stage_env(prefect_server)

    first = dvc(repo, "repro", "tokenize", env=env)
    assert stages_run(first) == ["download", "tokenize"]
    tokens = json.loads((repo / "metrics/tokenize.json").read_text())
    assert tokens["tokens"] == 5145 + 338025 + 2  # the-verdict and tinyshakespeare, each with end-of-text
    assert (repo / "data/shards/train/000000.arrow").is_file()
    assert json.loads((repo / "metrics/download.json").read_text())["files"] == 5  # sms-spam: the mirror's member
    assert (repo / "data/raw/classification/SMSSpamCollection").is_file()
    assert (repo / "data/raw/preference/instruction-data-with-preference.json").is_file()

    second = dvc(repo, "repro", "tokenize", env=env)
    assert stages_run(second) == []
    assert "Data and pipelines are up to date" in second

    yaml = YAML()
    params = yaml.load(repo / "params.yaml")
    params["tokenize"]["seed"] = 7
    yaml.dump(params, repo / "params.yaml")
    third = dvc(repo, "repro", "tokenize", env=env)
    assert stages_run(third) == ["tokenize"]
    assert "Stage 'download' didn't change, skipping" in third
