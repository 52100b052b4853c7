"""`esft run`: the whole pipeline on the embedded default, stage skipping and resumption."""

from __future__ import annotations

import json

import pytest

from pipeline.config import build_config, read_yaml
from pipeline.run import PipelineConfig, run_pipeline

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]  # Ray Train runs


def quick_config(run_dir) -> PipelineConfig:
    config = build_config(PipelineConfig, read_yaml("configs/quickstart.yaml"), {"run_dir": str(run_dir)})
    config.profile.update(n_sample_tokens=2048)
    config.train.update(steps=4, save_every=4, eval_every=4, eval_rows=4)
    config.eval.update(max_new_tokens=8)
    return config


def test_pipeline_runs_end_to_end_then_skips_resumes_and_retrains_a_changed_selection(tmp_path, caplog):
    run_dir = tmp_path / "run"
    caplog.set_level("INFO", logger="esft")
    summary = run_pipeline(quick_config(run_dir))
    for artifact in ("profile/expert_scores.json", "select/expert_cfg.json", "train/adapter/model.safetensors",
                     "train/metrics.json", "eval/metrics.json", "eval/metrics.predictions.jsonl", "summary.json"):
        assert (run_dir / artifact).exists(), artifact
    assert summary["selected_experts"] >= 3 and 0.0 <= summary["numeric"] <= 1.0
    assert summary["registered"]["version"] == "1" and summary["registered"]["champion"]
    # the base model evaluated the same way: what fine-tuning changed is printed last
    baseline = json.loads((run_dir / "eval" / "baseline.json").read_text())
    assert summary["baseline"]["numeric"] == baseline["numeric"] and baseline["n"] == 64
    assert summary["baseline"]["general_loss"] != summary["general_loss"]  # the adapter changed the model
    assert (f"numeric: vanilla {baseline['numeric']:.4f} -> fine-tuned {summary['numeric']:.4f}") in caplog.text
    assert (f"general-domain loss: vanilla {baseline['general_loss']:.4f} "
            f"-> fine-tuned {summary['general_loss']:.4f}") in caplog.text

    caplog.clear()
    run_pipeline(quick_config(run_dir))  # nothing changed: every stage is skipped
    assert caplog.text.count("up to date, skipped") == 7

    (run_dir / "stages" / "eval.json").unlink()  # as if the driver died during evaluation
    caplog.clear()
    again = run_pipeline(quick_config(run_dir))
    assert caplog.text.count("up to date, skipped") == 5  # assets, profile, select, train, baseline
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["n"] == 64
    # evaluation is deterministic, so the register stage meets the same adapter and metric: no second version
    assert again["registered"]["version"] == "1"

    changed = quick_config(run_dir)  # a changed selection: training starts from scratch, not from the old checkpoint
    changed.select["top_p"] = 0.6
    wider = run_pipeline(changed)
    assert wider["selected_experts"] > summary["selected_experts"]
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == [1, 2, 3, 4]  # a fresh run, not a resumed one
    cfg = json.loads((run_dir / "train" / "adapter" / "expert_cfg.json").read_text())
    assert sum(len(v) for v in cfg["experts"].values()) == wider["selected_experts"]


@pytest.mark.parametrize("name", ["quickstart.yaml", "deepseek-v2-lite-8gpu.yaml", "deepseek-v2-lite-multinode.yaml"])
def test_shipped_pipeline_configs_build_every_stage(name, tmp_path):
    config = build_config(PipelineConfig, read_yaml(f"configs/{name}"), {})
    config.validate()
    data = {"train_data": "t.jsonl", "eval_data": "e.jsonl", "general_data": "g.jsonl"}
    profile, train, evaluate = config.stage_configs("some/model", data, tmp_path)
    profile.validate(), train.validate(), evaluate.validate()
    if name != "quickstart.yaml":
        assert train.use_gpu and profile.gpus_per_replica >= 1 and train.workers >= 8
