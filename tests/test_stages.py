"""The stages `esft run` and every sweep trial share (pipeline/stages.py): training's one resumption
rule, and a sweep config that is a pipeline config with its selection searched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.config import ConfigError
from pipeline.run import PipelineConfig
from pipeline.sweep_config import SweepConfig
from pipeline.train import TrainConfig


@pytest.fixture
def recorded_runs(monkeypatch):
    """run_train replaced by a recorder of what it was asked (resume or not, what --out held): the
    rule under test decides both before training starts."""
    calls = []

    def fake_run_train(config: TrainConfig, callbacks=None) -> dict:
        out = Path(config.out)
        calls.append({"resume": config.resume, "had": sorted(p.name for p in out.iterdir()) if out.exists() else []})
        (out / "ray").mkdir(parents=True, exist_ok=True)  # what a started run leaves: its checkpoints
        return {"trained": len(calls)}

    monkeypatch.setattr("pipeline.train.run_train", fake_run_train)
    return calls


def test_training_continues_only_what_the_same_inputs_started(tmp_path, recorded_runs):
    config = TrainConfig(model="m", data="d.jsonl", out=str(tmp_path / "train"), expert_config="e.json")
    assert stages.train(config, "key-a") == {"trained": 1}
    assert recorded_runs[-1] == {"resume": False, "had": []}
    assert stages.started_marker(tmp_path / "train").read_text() == "key-a"

    stages.train(config, "key-a")  # killed before it finished, rerun with the same inputs: continue
    assert recorded_runs[-1] == {"resume": True, "had": ["ray"]}

    (tmp_path / "train" / "stale.txt").write_text("from the run with key-a")
    stages.train(config, "key-b")  # other inputs (another selection): the old run is removed first
    assert recorded_runs[-1] == {"resume": False, "had": []}
    assert stages.started_marker(tmp_path / "train").read_text() == "key-b"

    finished = {"history": [{"step": 4, "loss": 1.0}], "final_valid_loss": 0.5}
    (tmp_path / "train" / "metrics.json").write_text(json.dumps(finished))
    assert stages.train(config, "key-b") == finished  # finished with the same inputs: not run again
    assert len(recorded_runs) == 3


def test_a_sweep_config_is_a_pipeline_config_with_the_selection_searched(tmp_path):
    sections = {"run_dir": str(tmp_path / "run"), "train": {"steps": 4, "seq_len": 128}, "eval": {"max_new_tokens": 8},
                "profile": {"batch_size": 8}}
    sweep, run = SweepConfig(**sections, search={"token_top_p": [0.2]}), PipelineConfig(**sections)
    assert isinstance(sweep, PipelineConfig)
    inputs = run.inputs(tmp_path / "run")
    assert sweep.stage_configs(inputs["model"], inputs, tmp_path / "run") == run.stage_configs(inputs["model"], inputs,
                                                                                                tmp_path / "run")
    sweep.validate()
    with pytest.raises(ConfigError, match="a sweep searches the selection; set it under search"):
        SweepConfig(**sections, select={"score_function": "gate", "top_p": 0.1}).validate()
    with pytest.raises(ConfigError, match="unknown register setting.*metric"):  # a sweep ranks by its objective
        SweepConfig(**sections, register={"metric": "numeric"}).validate()
    with pytest.raises(ConfigError, match="unknown register setting.*enabled"):
        PipelineConfig(**sections, register={"enabled": False}).validate()
