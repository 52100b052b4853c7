"""Evaluation on a local Ray: predictions equal the model's own greedy decoding, metrics, formats."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esft.demo import synthetic
from esft.adapter import load_adapter, save_adapter
from esft.data import DataError
from esft.families import moe_layers
from esft.generation import cut_at_stop
from esft.select import ExpertConfig
from esft.trainable import apply_expert_config
from pipeline.config import ConfigError
from pipeline.evaluate import EvalConfig, read_eval_rows, run_eval
from tests.conftest import save_model_with_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("local_ray")
STOPS = ["\n\n", "User:"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = synthetic.rows("math", 60, seed=4)
    model_dir = save_model_with_tokenizer(root / "model", corpus)
    return {"root": root, "model": model_dir, "corpus": corpus}


def reference_predictions(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy decoding one prompt at a time, in this process."""
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            generated = model.generate(input_ids=ids, do_sample=False, max_new_tokens=max_new_tokens,
                                       pad_token_id=tokenizer.pad_token_id)
        outputs.append(cut_at_stop(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True), STOPS))
    return outputs


def test_predictions_equal_in_process_greedy_decoding_and_score(assets, tmp_path):
    rows = assets["corpus"][:6]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    metrics = run_eval(EvalConfig(model=str(assets["model"]), data=str(data), out=str(tmp_path / "m.json"),
                                  metric=["exact_match", "numeric", "rouge_l"], max_new_tokens=12, batch_size=1,
                                  general_data=str(data)))
    lines = [json.loads(line) for line in (tmp_path / "m.predictions.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    expected = reference_predictions(model, tokenizer, [line["prompt"] for line in lines], 12)
    assert [line["prediction"] for line in lines] == expected
    assert lines[0]["prompt"] == "User: " + rows[0]["messages"][0]["content"] + "\n\nAssistant:"
    assert metrics["n"] == 6 and 0 <= metrics["exact_match"] <= 1
    assert json.loads((tmp_path / "m.json").read_text())["rouge_l"] == metrics["rouge_l"]
    assert math.isclose(metrics["general_perplexity"], math.exp(metrics["general_loss"]))

    # the same predictions as references score 1.0 exact match
    ref_rows = [{"prompt": line["prompt"], "answers": [line["prediction"] or "None"]} for line in lines]
    again = run_eval(EvalConfig(model=str(assets["model"]), data=str(write_jsonl(tmp_path / "ref.jsonl", ref_rows)),
                                out=str(tmp_path / "again.json"), metric=["exact_match"], max_new_tokens=12, batch_size=2))
    assert again["exact_match"] == 1.0


def test_adapter_evaluation_uses_the_trained_experts(assets, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    config = ExpertConfig({str(layer.index): [0, 1, 2, 3] for layer in moe_layers(model)})
    apply_expert_config(model, config)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.experts.esft_down_proj.mul_(5.0)  # a visible change to the selected experts
    save_adapter(model, tmp_path / "adapter", config)
    rows = assets["corpus"][:3]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    run_eval(EvalConfig(model=str(assets["model"]), adapter=str(tmp_path / "adapter"), data=str(data),
                        out=str(tmp_path / "a.json"), metric=["numeric"], max_new_tokens=8, batch_size=1))
    lines = [json.loads(line) for line in (tmp_path / "a.predictions.jsonl").read_text().splitlines()]
    adapted = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    load_adapter(adapted, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    assert [line["prediction"] for line in lines] == reference_predictions(
        adapted, tokenizer, [line["prompt"] for line in lines], 8
    )


def test_eval_row_formats_and_errors(tmp_path):
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"prompt": "Q: 1+1?\nA:", "raw_answers": ["2"]}, {"prompt": "x", "answers": "y"}])
    assert read_eval_rows(str(ref)) == [{"prompt": "Q: 1+1?\nA:", "answers": ["2"]}, {"prompt": "x", "answers": ["y"]}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answers": []}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'answers' must be a non-empty list"):
        read_eval_rows(str(bad))
    multi = write_jsonl(tmp_path / "multi.jsonl", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
    with pytest.raises(DataError, match="one user turn and its answer"):
        read_eval_rows(str(multi))
    with pytest.raises(ConfigError, match="unknown metric"):
        run_eval(EvalConfig(model="m", data=str(ref), out=str(tmp_path / "o.json"), metric=["accuracy"]))
    with pytest.raises(ConfigError, match="not both"):
        run_eval(EvalConfig(model="m", data=str(ref), out=str(tmp_path / "o.json"), adapter="a", merged="b"))
    assert not (tmp_path / "o.json").exists()
