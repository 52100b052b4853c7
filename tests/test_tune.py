"""`esft tune`: a 2x2 sweep on a tiny model: MLflow parent + nested runs, one profile, a duplicate
selection not retrained, the registry entry, a driver that dies and resumes, a failed trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from esft import synthetic
from esft.trainable import merge_adapter
from tests.conftest import save_model_with_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_assets")
    task = synthetic.rows("math", 260, seed=5)
    save_model_with_tokenizer(root / "model", task + synthetic.rows("general", 40, seed=6))
    write_jsonl(root / "train.jsonl", task[:240])
    write_jsonl(root / "eval.jsonl", task[240:])
    write_jsonl(root / "general.jsonl", synthetic.rows("general", 40, seed=6))
    return root


@pytest.fixture
def fresh_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def sweep_yaml(assets: Path, run_dir: Path, **extra) -> Path:
    config = {
        "name": "tune-test", "run_dir": str(run_dir), "model": str(assets / "model"),
        "train_data": str(assets / "train.jsonl"), "eval_data": str(assets / "eval.jsonl"),
        "general_data": str(assets / "general.jsonl"),
        "profile": {"n_sample_tokens": 1024, "seq_len": 64, "batch_size": 8},
        "train": {"workers": 1, "deepspeed": "zero0", "steps": 4, "batch_size": 2, "seq_len": 64, "lr": 1e-3,
                  "eval_every": 2, "save_every": 4, "eval_rows": 4},
        "eval": {"metric": ["numeric"], "max_new_tokens": 6, "batch_size": 20},
        # 2 x 2: token / gate ranking x a budget of 1 or all 16 experts; "all 16" is the same selection
        # for both score functions, so the fourth trial must reuse the second one's result.
        "search": {"token_top_p": [], "gate_top_p": [], "experts_per_layer": [1, 16], "budget_score_functions": ["token", "gate"]},
        "register": {"model_name": "tune-test"}, **extra,
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def mlflow_runs(run_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("esft-sweeps")
    runs = client.search_runs([experiment.experiment_id])
    return client, [r for r in runs if r.data.tags.get("esft.kind") == "sweep"], [r for r in runs if r.data.tags.get("esft.kind") == "trial"]


def test_sweep_survives_a_dead_driver_and_registers_the_best_trial(assets, tmp_path, fresh_ray, monkeypatch):
    from pipeline.config import build_config, read_yaml
    from pipeline.register import generate_text, load_registered
    from pipeline.tracking import DRIVER_EXIT_ENV
    from pipeline.tune import SweepConfig, run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sweep's default: SQLite in its run dir
    run_dir = tmp_path / "sweep"
    config_file = sweep_yaml(assets, run_dir)
    # 1. the driver dies right after its second trial was logged
    env = {**os.environ, DRIVER_EXIT_ENV: "2", "RAY_ADDRESS": ""}
    died = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--config", str(config_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert died.returncode == 1, died.stderr[-3000:]
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "trials").glob("*/result.json")}
    assert len(finished_before) == 2
    profiles = list((run_dir / "profiles").glob("*/expert_scores.json"))
    assert len(profiles) == 1
    profile_mtime = profiles[0].stat().st_mtime_ns

    # 2. the same command resumes: only the missing trials run
    summary = run_sweep(build_config(SweepConfig, read_yaml(config_file), {}))
    assert [p.stat().st_mtime_ns for p in (run_dir / "profiles").glob("*/expert_scores.json")] == [profile_mtime]  # profiled once
    results = {p.parent.name: p for p in (run_dir / "trials").glob("*/result.json")}
    assert len(results) == 3  # 4 trials, 3 distinct selections
    assert all(results[key].stat().st_mtime_ns == mtime for key, mtime in finished_before.items())  # not redone

    rows = summary["rows"]
    assert len(rows) == 4 and not any(r["status"].startswith("failed") for r in rows)
    duplicates = [r for r in rows if r["status"].startswith("same selection as")]
    assert len(duplicates) == 1 and duplicates[0]["experts"] == 48  # 16 experts x 3 MoE layers
    original = next(r for r in rows if r["experts"] == 48 and r is not duplicates[0])
    assert duplicates[0]["metric"] == original["metric"] and duplicates[0]["work_dir"] == original["work_dir"]
    table_rows = [line for line in (run_dir / "sweep_summary.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table_rows) == 5  # header + 4 trials

    client, parents, trials = mlflow_runs(run_dir)
    assert len(parents) == 1 and len(trials) == 4
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    for run in trials:
        assert run.info.status == "FINISHED"
        assert {"score_function", "experts_per_layer", "selected_experts", "trainable_parameters", "method", "base_model",
                "data_hash"} <= set(run.data.params)
        assert {"numeric", "general_loss", "valid_loss", "tokens_per_second", "train_seconds", "objective"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]  # per-step curve
        assert [m.step for m in client.get_metric_history(run.info.run_id, "valid_loss")] == [2, 4]  # at each evaluation
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"expert_cfg.json", "selection.png", "heatmap.png"} <= artifacts
        assert ("adapter" in artifacts) != ("esft.duplicate_of" in run.data.tags)  # only trained trials carry an adapter

    registered = summary["registered"]
    assert registered["version"] == "1" and registered["champion"]
    version = client.get_model_version_by_alias("tune-test", "champion")
    assert version.tags["selected_experts"] == str(summary["best"]["experts"]) and version.tags["metric_name"] == "numeric"
    assert version.tags["base_model"] == str(assets / "model") and version.tags["base_source"] == "logged"  # small: it travels
    model, base = load_registered("models:/tune-test@champion", tracking_uri=summary["tracking_uri"])
    untouched = dict(AutoModelForCausalLM.from_pretrained(assets / "model").named_parameters())
    changed = [n for n, p in merge_adapter(model).named_parameters() if not torch.equal(p, untouched[n])]
    assert changed and all(".mlp.experts." in n for n in changed)  # the adapter is in
    text = generate_text("models:/tune-test@champion", "Tom has 3 apples. What is 3 plus 4?",
                         tracking_uri=summary["tracking_uri"], max_new_tokens=4)
    assert isinstance(text, str)


def test_a_failing_trial_is_marked_failed_in_mlflow(assets, tmp_path, fresh_ray, monkeypatch):
    import ray

    from pipeline.config import build_config, read_yaml
    from pipeline.train import FAULT_ENV
    from pipeline.tune import SweepConfig, run_sweep

    # A Train worker dies after its step-2 report and the trial allows no restart: the trial fails.
    monkeypatch.setenv(FAULT_ENV, f"2:0:{tmp_path / 'fault-marker'}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray.init(num_cpus=2, include_dashboard=False)
    run_dir = tmp_path / "failing"
    config = build_config(SweepConfig, read_yaml(sweep_yaml(assets, run_dir)), {})
    config.search = {"token_top_p": [0.5], "gate_top_p": []}
    config.train.update(max_failures=0, save_every=2)
    summary = run_sweep(config)
    assert summary["best"] is None and summary["registered"] is None
    assert summary["rows"][0]["status"].startswith("failed")
    _, parents, trials = mlflow_runs(run_dir)
    assert [t.info.status for t in trials] == ["FAILED"] and "esft.error" in trials[0].data.tags
    assert parents[0].info.status == "FAILED"
    assert json.loads((run_dir / "sweep_summary.json").read_text())["registered"] is None


def test_sweep_config_errors_are_clear(assets, tmp_path):
    from pipeline.cli import main as esft

    bad = sweep_yaml(assets, tmp_path / "bad", search={"token_top_p": [1.5]})
    assert esft(["tune", "--config", str(bad)]) == 2
    empty = sweep_yaml(assets, tmp_path / "empty", search={"token_top_p": [], "gate_top_p": []})
    assert esft(["tune", "--config", str(empty)]) == 2
    unknown = sweep_yaml(assets, tmp_path / "unknown", objective={"metrik": "numeric"})
    assert esft(["tune", "--config", str(unknown)]) == 2
    assert not (tmp_path / "bad").exists() and not (tmp_path / "empty").exists()
