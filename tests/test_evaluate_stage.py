"""The evaluate stage: promotion against the champion in a real MLflow registry, and the whole flow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from llm.checkpoint import SPLIT_FILE, save_model
from llm.config import EvaluateConfig
from llm.evaluate import TunedMeasurements, best_stage, evaluate_models, metric_key, primary_score, promote_if_better
from llm.files import sha256_file
from llm.hellaswag import Item
from llm.instructions import Record, Split, write_split
from llm.judge import JudgeResult
from llm.model import GPT, model_config
from llm.perplexity import PerplexityResult
from llm.scores import Scores
from llm.shards import ShardError, TokenStream
from llm.store import configure
from tests.conftest import shared_file
from tests.data import make_shards, patterned_tokens


@pytest.fixture
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    configure(uri)
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    return client


def version(client) -> str:
    return str(client.create_model_version("m", source="file:///nowhere").version)


def test_promotion_only_when_every_score_is_at_least_the_champions(registry):
    first, worse, equal, mixed = (version(registry) for _ in range(4))
    assert promote_if_better("m", first, {"rouge_l_f1": 0.5, "exact_match": 0.1}) == (True, None)
    assert promote_if_better("m", worse, {"rouge_l_f1": 0.4, "exact_match": 0.2}) == (False, first)
    assert str(registry.get_model_version_by_alias("m", "champion").version) == first
    assert promote_if_better("m", equal, {"rouge_l_f1": 0.5, "exact_match": 0.1}) == (True, first)
    assert promote_if_better("m", mixed, {"rouge_l_f1": 0.9, "exact_match": 0.0}) == (False, equal)
    assert str(registry.get_model_version_by_alias("m", "champion").version) == equal
    assert registry.get_model_version("m", worse).tags["eval.rouge_l_f1"] == "0.4"


def tuned(rouge: float, judge: tuple[int, ...] | None = None) -> TunedMeasurements:
    loss = PerplexityResult(loss=1.0, perplexity=2.7, tokens=10, tokens_per_s=1.0)
    scores = Scores(per_record=(), exact_match=0.0, rouge_l_f1=rouge)
    verdict = JudgeResult("scored", "llama3", judge) if judge else JudgeResult("skipped", "llama3", reason="none")
    return TunedMeasurements(loss, [], scores, verdict)


def test_the_best_model_is_chosen_by_the_judge_when_it_scored_every_one_else_by_rouge():
    assert best_stage({"finetune": tuned(0.4), "preference": tuned(0.5)}) == "preference"
    assert best_stage({"finetune": tuned(0.5), "preference": tuned(0.5)}) == "finetune"  # a tie: the simpler
    judged = {"finetune": tuned(0.6, (80,)), "preference": tuned(0.4, (90,))}
    assert primary_score(judged) == "judge_score" and best_stage(judged) == "preference"
    partly = {"finetune": tuned(0.6, (80,)), "preference": tuned(0.4)}
    assert primary_score(partly) == "rouge_l_f1" and best_stage(partly) == "finetune"


def test_a_figure_every_model_has_names_its_model_and_the_finetune_scores_keep_their_names():
    assert [metric_key(name, "finetune") for name in ("val_loss", "hellaswag_acc", "rouge_l_f1")] == [
        "val_loss_finetuned", "hellaswag_acc_finetuned", "rouge_l_f1"]
    assert [metric_key(name, "preference") for name in ("hellaswag_acc_norm", "exact_match")] == [
        "hellaswag_acc_norm_preference", "exact_match_preference"]


def test_shards_that_do_not_fit_a_model_are_refused_before_any_work(tmp_path):
    shards = make_shards(tmp_path / "shards", patterned_tokens(300), patterned_tokens(300), vocab_size=512)
    save_model(GPT(model_config("tiny", vocab_size=512)), tmp_path / "base")
    save_model(GPT(model_config("tiny", vocab_size=512)), tmp_path / "tuned", tokenizer="cl100k_base")
    config = EvaluateConfig(device="cpu")  # no split.json: the check must come first
    with pytest.raises(ShardError, match=rf"^{shards} holds tokens of tokenizer 'gpt2' \(vocabulary of 512\), but "
                                         rf"{tmp_path / 'tuned'} was trained with tokenizer 'cl100k_base'"):
        evaluate_models(config, tmp_path / "base", {"finetune": tmp_path / "tuned"}, shards)
    save_model(GPT(model_config("tiny", vocab_size=500)), tmp_path / "base")
    with pytest.raises(ShardError, match=rf"a vocabulary of 512, more than {tmp_path / 'base'}'s vocab_size of 500"):
        evaluate_models(config, tmp_path / "base", {"finetune": tmp_path / "tuned"}, shards)


@pytest.mark.slow
def test_evaluate_flow_measures_reports_and_promotes(tmp_path, monkeypatch, prefect_server):
    from flows.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    make_shards(tmp_path / "data/shards", patterned_tokens(3000), patterned_tokens(700))
    torch.manual_seed(0)
    model = GPT(model_config("tiny"))
    for stage in ("pretrain", "finetune", "preference"):  # the same weights: SFT and DPO tie
        save_model(model, tmp_path / f"data/checkpoints/{stage}", extra={"prompt_style": "alpaca"})
    records = [Record(**r) for r in json.loads(shared_file("instruction-data.json").read_text())[:12]]
    write_split(tmp_path / "data/checkpoints/finetune" / SPLIT_FILE, Split(records[:6], records[6:8], records[8:]))
    swag = tmp_path / "data/raw/hellaswag"  # as the download stage leaves a source of role hellaswag
    swag.mkdir(parents=True)
    (swag / "hellaswag_val.jsonl").write_text("".join(
        json.dumps({"ctx": f"Item {i}: a man", "endings": ["runs.", "sits down.", "is blue", "eats"], "label": i % 4,
                    "ind": i}) + "\n" for i in range(3)))
    (swag / "manifest.json").write_text(json.dumps({"sources": [{
        "name": "hellaswag-val", "role": "hellaswag", "file": "hellaswag/hellaswag_val.jsonl",
        "url": "https://example.org/hellaswag_val.jsonl", "sha256": sha256_file(swag / "hellaswag_val.jsonl")}]}))
    (tmp_path / "params.yaml").write_text(
        "evaluate: {max_new_tokens: 6, examples: 2, batch_size: 4, hellaswag: hellaswag-val, judge: {url: null}}\n"
        "tracking: {experiment: test-evaluate}\n")

    metrics = evaluate()

    responses = json.loads((tmp_path / "data/eval/responses.json").read_text())
    assert [r["instruction"] for r in responses] == [r.instruction for r in records[8:]]
    assert all(set(r) == {"instruction", "input", "output", "model_response"} for r in responses)
    assert json.loads((tmp_path / "data/eval/responses_preference.json").read_text()) == responses
    assert json.loads((tmp_path / "metrics/evaluate.json").read_text()) == metrics
    assert metrics["test_records"] == 4 and "judge_score" not in metrics and metrics["precision_used"] == "fp32"
    assert metrics["val_loss_base"] == pytest.approx(metrics["val_loss_finetuned"])  # the same weights
    assert 0 < metrics["val_bits_per_byte_base"] == pytest.approx(metrics["val_bits_per_byte_finetuned"])
    assert metrics["rouge_l_f1_preference"] == metrics["rouge_l_f1"]
    assert metrics["val_loss_preference"] == pytest.approx(metrics["val_loss_finetuned"])
    assert metrics["hellaswag_items"] == 3
    for name in ("hellaswag_acc", "hellaswag_acc_norm"):  # the same weights: the same choices
        assert metrics[f"{name}_base"] == metrics[f"{name}_finetuned"] == metrics[f"{name}_preference"]
        assert metrics[f"{name}_base"] in (0, 1 / 3, 2 / 3, 1)
    report = (tmp_path / "data/eval/report.md").read_text()
    assert "- **SFT model:** gpt-instruct version 1\n- **DPO model:** gpt-instruct version 2\n" in report
    assert "- **Promoted to champion:** SFT (gpt-instruct version 1)" in report  # a tie goes to the simpler
    assert "| metric | base | SFT | DPO |" in report and "skipped: no judge configured" in report
    acc = f"{metrics['hellaswag_acc_base']:.4f}"
    assert f"| HellaSwag acc | {acc} | {acc} | {acc} |" in report and "HellaSwag over 3 items" in report
    assert (tmp_path / "data/eval/losses.png").is_file() or "losses.png" not in report

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("gpt-instruct", "champion").version) == "1"
    (run,) = client.search_runs([client.get_experiment_by_name("test-evaluate").experiment_id])
    assert run.data.metrics["rouge_l_f1"] == metrics["rouge_l_f1"] and run.data.tags["promoted"] == "True"
    assert run.data.metrics["hellaswag_acc_norm_preference"] == metrics["hellaswag_acc_norm_preference"]
    assert run.data.tags["best_stage"] == "finetune" and run.data.tags["primary_score"] == "rouge_l_f1"
    dpo = client.get_model_version("gpt-instruct", "2")
    assert dpo.tags["stage"] == "preference" and float(dpo.tags["eval.rouge_l_f1"]) == metrics["rouge_l_f1"]
    assert run.data.tags["precision_used"] == "fp32"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {"eval/report.md",
                                                                                "eval/responses.json"}

    # The export stage takes the best model, as best.json names it, and logs its files to that version.
    from flows.export import export

    assert json.loads((tmp_path / "data/eval/best.json").read_text()) == {
        "stage": "finetune", "checkpoint": "data/checkpoints/finetune", "registered_model": "gpt-instruct",
        "version": "1", "champion": True, "primary_score": "rouge_l_f1"}
    (tmp_path / "params.yaml").write_text("export: {formats: [hf, gguf], gguf_dtype: f32}\n"
                                          "tracking: {experiment: test-evaluate}\n")
    exported = export()
    assert exported["files"] == ["gpt-instruct.Modelfile", "gpt-instruct.gguf", "hf"]
    sizes = json.loads((tmp_path / "metrics/export.json").read_text())
    assert sizes["gguf_bytes"] == (tmp_path / "data/exports/gpt-instruct.gguf").stat().st_size
    assert sizes["hf_bytes"] > (tmp_path / "data/exports/hf/model.safetensors").stat().st_size
    tags = client.get_model_version("gpt-instruct", "1").tags
    assert tags["exports"] == exported["exports"]
    logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=tags["exports"], dst_path=str(tmp_path / "dl")))
    assert sorted(p.name for p in logged.iterdir()) == exported["files"]
    assert (logged / "gpt-instruct.gguf").read_bytes() == (tmp_path / "data/exports/gpt-instruct.gguf").read_bytes()
    assert json.loads((logged / "hf/config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


def test_the_judges_credentials_never_reach_mlflow():
    from flows.evaluate import loggable_config
    from llm.config import JudgeConfig

    config = EvaluateConfig(judge=JudgeConfig(url="https://user:secret@judge.example/api/chat?key=abc"))
    assert loggable_config(config)["judge"]["url"] == "https://judge.example/api/chat"
    assert loggable_config(EvaluateConfig())["judge"]["url"] is None


def stage_inputs(folder: Path, base: GPT) -> Path:
    """What evaluate_models reads, in `folder`: `base` as the base model (base/), a tiny instruction model
    (tuned/) with a split of the book's first six records, and val shards; returns the shards' folder."""
    shards = make_shards(folder / "shards", patterned_tokens(3000), patterned_tokens(700))
    save_model(base, folder / "base")
    save_model(GPT(model_config("tiny")), folder / "tuned", extra={"prompt_style": "alpaca"})
    records = [Record(**r) for r in json.loads(shared_file("instruction-data.json").read_text())[:6]]
    write_split(folder / "tuned" / SPLIT_FILE, Split(records[:2], records[2:4], records[4:]))
    return shards


def test_an_encoder_base_gets_masked_token_figures_instead_of_perplexity(tmp_path):
    from llm.evaluate import ENCODER_ANSWER
    from llm.masking import split_metrics
    from llm.report import Evaluation, write_report

    torch.manual_seed(0)
    encoder = GPT(model_config("tiny", objective="masked"))
    shards = stage_inputs(tmp_path, encoder)
    config = EvaluateConfig(device="cpu", max_new_tokens=3, examples=1, batch_size=4)
    swag = [Item("A man", ("runs.", "sits.", "is blue", "eats"), 1)]

    measured = evaluate_models(config, tmp_path / "base", {"finetune": tmp_path / "tuned"}, shards, swag)

    expected = split_metrics(encoder.eval(), TokenStream.from_manifest(shards, "val"), 4, config.seed)
    metrics = measured.metrics()
    assert "val_perplexity_base" not in metrics and "val_loss_base" not in metrics
    assert metrics["val_masked_loss_base"] == pytest.approx(expected.loss)
    assert metrics["val_masked_accuracy_base"] == expected.accuracy and expected.targets > 0.1 * 700
    assert measured.examples[0].answers["base"] == ENCODER_ANSWER
    assert "hellaswag_acc_base" not in metrics and metrics["hellaswag_items"] == 1  # an encoder has no next token
    assert metrics["hellaswag_acc_finetuned"] in (0, 1) and measured.base_hellaswag is None
    report = write_report(tmp_path / "eval", Evaluation("encoder-base version 1", measured.base_loss,
                                                        [], None)).read_text()
    assert f"| val loss | {expected.loss:.4f} (masked tokens) |" in report
    assert f"| val masked-token accuracy (top-5) | {expected.accuracy:.3f} ({expected.top5_accuracy:.3f}) |" in report
