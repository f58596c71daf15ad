from dataclasses import dataclass, field
from typing import Literal

import pytest

from llm.config import Params, ServingConfig, SourceConfig, load_params

from llm.validation import ConfigError, from_mapping
from tests.conftest import ROOT


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert [s.name for s in params.download.sources] == ["the-verdict", "tinyshakespeare", "instruction-data",
                                                         "instruction-data-with-preference", "sms-spam"]
    assert params.download.sources[1].file_name == "tinyshakespeare.txt"
    assert params.download.sources[0].file_name == "the-verdict.txt"
    assert params.download.sources[4].file_name == "SMSSpamCollection"  # the member's name, not the zip's
    assert params.serving == ServingConfig(max_new_tokens=1024, max_prompts=32)


def test_every_problem_is_reported_with_its_key_path():
    data = {
        "tokenize": {"val_fraction": 1.5, "sead": 3, "tokens_per_shard": "many"},
        "download": {"sources": [{"name": "x", "url": "ftp://host/x", "kind": "xml"}]},
        "pretrian": {},
        "pretrain": {"windows": "random"},
    }
    with pytest.raises(ConfigError) as info:
        from_mapping(Params, data)
    problems = dict(info.value.problems)
    assert problems["tokenize.sead"] == "unknown key; did you mean 'seed'?"
    assert problems["tokenize.tokens_per_shard"] == "must be an integer, got str 'many'"
    assert problems["download.sources[0].kind"] == ("must be one of 'text', 'json', 'jsonl', 'parquet', 'csv', "
                                                    "'tsv', got 'xml'")
    assert problems["pretrian"].startswith("unknown key")
    assert problems["pretrain.windows"] == "must be one of 'shifted', 'fixed', got 'random'"
    assert "tokenize.sead: unknown key; did you mean 'seed'?" in str(info.value)


def test_range_checks_run_when_types_are_right():
    with pytest.raises(ConfigError) as info:
        from_mapping(Params, {"tokenize": {"val_fraction": 1.5}})
    assert str(info.value).splitlines()[1] == "  tokenize.val_fraction: must be in (0, 1), got 1.5"


def test_source_checks():
    bad = {"sources": [
        {"name": "a", "url": "https://h/a.json", "kind": "json", "sha256": "ABC"},
        {"name": "a", "url": "https://h/a.json"},
    ]}
    with pytest.raises(ConfigError) as info:
        from_mapping(Params, {"download": bad})
    problems = dict(info.value.problems)
    assert problems["download.sources[0].sha256"] == "must be 64 lowercase hex digits, got 'ABC'"
    assert problems["download.sources[0].text_field"].startswith("is required for a json corpus")
    assert "download.sources[1].name" in problems


def test_types_are_strict_about_bools_and_accept_ints_as_floats():
    @dataclass(frozen=True)
    class Section:
        flag: bool = False
        count: int = 1
        rate: float = 0.5
        mode: Literal["a", "b"] = "a"
        tags: list[str] = field(default_factory=list)

    assert from_mapping(Section, {"rate": 1}).rate == 1.0
    with pytest.raises(ConfigError) as info:
        from_mapping(Section, {"flag": 1, "count": True, "tags": "x"})
    assert dict(info.value.problems) == {
        "flag": "must be true or false, got int 1",
        "count": "must be an integer, got bool True",
        "tags": "must be a list, got str 'x'",
    }


def test_yaml_numbers_follow_yaml_1_2(tmp_path):
    # DVC's `-S pretrain.lr=3e-4` writes exponent floats without a dot; YAML 1.1 would read a string.
    path = tmp_path / "params.yaml"
    path.write_text("download:\n  timeout_s: 3e1\n  sources: [{name: c, url: /x.txt}]\n")
    assert load_params(path).download.timeout_s == 30.0


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found; run from the project root"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("download: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_source_filename_defaults_to_url_basename():
    assert SourceConfig(name="x", url="file:///tmp/dir/corpus.txt").file_name == "corpus.txt"


def test_source_filename_ignores_the_urls_query_and_fragment():
    # A signed URL's token must not end up in the file's name, on disk and in the manifest.
    assert SourceConfig(name="x", url="https://u:tok@h/a/b.txt?sig=x#top").file_name == "b.txt"
    assert SourceConfig(name="x", url="/data/odd?name#1.txt").file_name == "odd?name#1.txt"


def test_source_filename_must_not_look_temporary():
    sources = [
        {"name": "a", "url": "https://h/a.txt", "filename": ".tmp-a.txt"},
        {"name": "b", "url": "https://h/.tmp-b.txt?sig=x"},
    ]
    with pytest.raises(ConfigError) as info:
        from_mapping(Params, {"download": {"sources": sources}})
    assert dict(info.value.problems) == {
        "download.sources[0].filename": "must not start with '.tmp-' (the prefix of temporary files, which cleanup "
                                        "deletes); set filename: to another name",
        "download.sources[1].filename": "'.tmp-b.txt', the name taken from url, must not start with '.tmp-' (the "
                                        "prefix of temporary files, which cleanup deletes); set filename: to another "
                                        "name",
    }
    ok = SourceConfig(name="b", url="https://h/.tmp-b.txt", filename="b.txt")
    assert list(ok.problems()) == []


def source_problems(**settings) -> list[tuple[str, str]]:
    """The problems params.yaml would show for one source of `settings` (beside a corpus, which the section needs)."""
    sources = [{"name": "c", "url": "https://h/c.txt"}, {"name": "s", **settings}]
    with pytest.raises(ConfigError) as info:
        from_mapping(Params, {"download": {"sources": sources}})
    return info.value.problems


ARCHIVE = "https://h/sms.zip"
TRAVERSAL = ("must be a relative path inside the archive, with '/' between folders and no '..' parts, got {!r}; "
             "write it as the archive lists it (python -m zipfile -l ARCHIVE), e.g. data/file.csv")


@pytest.mark.parametrize("member", ["../evil", "data/../../evil", "/etc/passwd", "C:/evil", "data\\spam.tsv"])
def test_an_archive_member_that_could_escape_its_folder_is_refused(member):
    assert source_problems(url=ARCHIVE, member=member) == [("download.sources[1].member", TRAVERSAL.format(member))]


def test_archive_member_checks():
    assert source_problems(url=ARCHIVE, member="data/") == [
        ("download.sources[1].member", "must name a file inside the archive, got 'data/'")]
    assert source_problems(url="https://h/s.txt", member_sha256="a" * 64) == [
        ("download.sources[1].member_sha256", "pins a file inside a .zip archive, but member is not set: set member: "
                                              "to the file's name in the archive, or remove member_sha256 (sha256 "
                                              "pins the file)")]
    assert source_problems(url=ARCHIVE, member="s.txt", member_sha256="ABC") == [
        ("download.sources[1].member_sha256", "must be 64 lowercase hex digits, got 'ABC'")]
    assert source_problems(url=ARCHIVE, member=".tmp-s.txt") == [
        ("download.sources[1].filename", "'.tmp-s.txt', the name taken from member, must not start with '.tmp-' (the "
                                         "prefix of temporary files, which cleanup deletes); set filename: to another "
                                         "name")]
    assert SourceConfig(name="s", url=ARCHIVE, member="data/spam.tsv").file_name == "spam.tsv"
    assert SourceConfig(name="s", url=ARCHIVE, member="data/spam.tsv", filename="sms.tsv").file_name == "sms.tsv"
    assert list(SourceConfig(name="s", url=ARCHIVE, member="data/spam.tsv", member_sha256="a" * 64).problems()) == []


def test_classification_source_checks():
    spam = {"url": "https://h/spam.tsv", "role": "classification", "kind": "tsv"}
    assert source_problems(**spam) == [
        ("download.sources[1].text_field", "is required for a classification source: name the column that holds "
                                           "the text"),
        ("download.sources[1].label_field", "is required for a classification source: name the column that holds "
                                            "the label"),
    ]
    assert source_problems(**{**spam, "kind": "text"}, text_field="t", label_field="l") == [
        ("download.sources[1].kind", "must be json, jsonl, parquet, csv or tsv for a classification source: a text "
                                     "file has no label")]
    assert source_problems(**spam, text_field="text", label_field="label", columns=["label", "body", "label"]) == [
        ("download.sources[1].columns", "names 'label' more than once; give each column its own name"),
        ("download.sources[1].columns", "must contain text_field 'text', got ['label', 'body', 'label']; add it, or "
                                        "fix text_field"),
    ]
    good = SourceConfig(name="s", **spam, text_field="text", label_field="label", columns=["label", "text"])
    assert list(good.problems()) == []
    assert list(SourceConfig(name="s", **spam, text_field="text", label_field="label").problems()) == []  # a header


def test_delimited_kinds_and_columns_are_for_classification_only():
    assert source_problems(url="https://h/s.csv", kind="csv", text_field="text") == [
        ("download.sources[1].kind", "csv is for classification sources only; corpus sources must be text, json, "
                                     "jsonl or parquet")]
    assert source_problems(url="https://h/s.tsv", kind="tsv", role="instructions") == [
        ("download.sources[1].kind", "tsv is for classification sources only; instructions sources must be text, "
                                     "json, jsonl or parquet")]
    assert source_problems(url="https://h/s.jsonl", kind="jsonl", role="classification", text_field="text",
                           label_field="label", columns=["text", "label"]) == [
        ("download.sources[1].columns", "names the columns of a headerless csv or tsv file; remove it for a jsonl "
                                        "source")]


@pytest.mark.parametrize("written, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), (".NaN", "nan")])
def test_nan_and_infinity_are_refused_in_every_float_setting(tmp_path, written, shown):
    # YAML 1.2 reads these as floats; a NaN learning rate would pass `lr > 0` and train to NaN losses.
    path = tmp_path / "params.yaml"
    path.write_text(f"pretrain: {{lr: {written}, grad_clip: {written}}}\nfinetune: {{dropout: {written}}}\n"
                    f"evaluate: {{top_p: {written}, judge: {{temperature: {written}}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).splitlines() == [
        f"{path} has 5 problems; fix them and rerun:",
        f"  pretrain.lr: must be a finite number, got {shown}",
        f"  pretrain.grad_clip: must be a finite number, got {shown}",
        f"  finetune.dropout: must be a finite number, got {shown}",
        f"  evaluate.top_p: must be a finite number, got {shown}",
        f"  evaluate.judge.temperature: must be a finite number, got {shown}",
    ]
    path.write_text("pretrain: {lr: 1e-3, min_lr: 0}\n")  # finite numbers, ints among them, still load
    assert load_params(path).pretrain.min_lr == 0.0


def test_serving_caps_must_be_positive():
    assert from_mapping(Params, {}).serving == ServingConfig()
    with pytest.raises(ConfigError) as info:
        from_mapping(Params, {"serving": {"max_new_tokens": 0, "max_prompts": -1}})
    assert dict(info.value.problems) == {"serving.max_new_tokens": "must be > 0, got 0",
                                         "serving.max_prompts": "must be > 0, got -1"}


def test_params_yaml_states_the_defaults():
    """params.yaml shows a user the settings the code defaults to: every value it sets is the dataclass
    default (the download sources excepted: they have none), so that neither can drift from the other."""
    import dataclasses

    from llm.config import read_yaml

    def differences(section, values, path):
        for key, value in values.items():
            default = getattr(section, key)
            if dataclasses.is_dataclass(default):
                yield from differences(default, value, f"{path}.{key}")
            elif (path, key) != ("download", "sources") and value != default:
                yield f"{path}.{key}: params.yaml has {value!r}, the default is {default!r}"

    found = [line for name, values in read_yaml(ROOT / "params.yaml").items()
             for line in differences(getattr(Params(), name), values, name)]
    assert not found, "\n".join(found)
