"""Training on Ray Train + DeepSpeed (2 CPU workers, ZeRO-2): learning, frozen weights, exact
recovery after a worker dies, resume, and the FFT / LoRA baselines through the same path."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from esft.adapter import load_adapter
from esft.families import moe_layers
from esft.select import ExpertConfig
from esft.trainable import merge_adapter
from pipeline.config import ConfigError
from pipeline.deepspeed_config import PRESETS, preset
from esft.demo import synthetic
from pipeline.train import PROGRESS_FILE, TrainConfig, echo_progress, run_train
from tests.conftest import save_model_with_tokenizer, write_jsonl

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]  # Ray Train runs
EXPERTS = {"1": [0, 5], "2": [3], "3": [7, 8, 9]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("train"))


def make_assets(root):
    """A tiny DeepSeek-V2 model directory with its tokenizer, task and general data, and an expert config."""
    corpus = synthetic.rows("math", 200, seed=2)
    save_model_with_tokenizer(root / "model", corpus)
    write_jsonl(root / "train.jsonl", corpus[:180])
    write_jsonl(root / "general.jsonl", synthetic.rows("math", 20, seed=9))
    ExpertConfig(EXPERTS).save(root / "expert_cfg.json")
    return root


def config(assets, out, **overrides) -> TrainConfig:
    values = dict(model=str(assets / "model"), data=str(assets / "train.jsonl"), expert_config=str(assets / "expert_cfg.json"),
                  out=str(out), workers=2, deepspeed="zero2", steps=8, save_every=4, eval_every=4, seq_len=64,
                  batch_size=2, lr=2e-3, general_data=str(assets / "general.jsonl"), eval_rows=8)
    return TrainConfig(**{**values, **overrides})


def adapter_tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "esft"
    return out, run_train(config(assets, out))



def merged_changing_only_selected_experts(model_dir, adapter_dir):
    """base + adapter, merged, after checking that every non-expert tensor is bit-identical to the
    base's and that only the selected experts' rows of the fused expert tensors moved."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    load_adapter(merged, adapter_dir)
    merge_adapter(merged)
    before, after = dict(base.named_parameters()), dict(merged.named_parameters())
    for name, tensor in after.items():
        if ".mlp.experts." not in name:
            assert torch.equal(tensor, before[name]), f"{name} changed"
    for layer in moe_layers(merged):
        for fused in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer.index}.mlp.experts.{fused}"
            moved = (after[key] != before[key]).flatten(1).any(1).nonzero().flatten().tolist()
            assert moved == EXPERTS[str(layer.index)], key
    return merged

def test_esft_learns_and_touches_only_the_selected_experts(assets, uninterrupted):
    out, metrics = uninterrupted
    history = metrics["history"]
    assert [r["step"] for r in history] == list(range(1, 9))
    assert history[-1]["loss"] < history[0]["loss"]
    assert metrics["final_valid_loss"] < history[0]["loss"] and "general_loss" in history[-1]
    assert metrics["trainable_parameters"] == 6 * (2 * 32 * 64 + 64 * 32)  # 6 experts: gate_up [64,64] + down [64,32]
    assert metrics["optimizer_state_bytes"] >= 2 * 4 * metrics["trainable_parameters"]  # exp_avg + exp_avg_sq, fp32

    keys = set(adapter_tensors(out / "adapter"))
    expected = {f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for layer, ids in EXPERTS.items() for e in ids
                for p in ("gate_proj", "up_proj", "down_proj")}
    assert keys == expected

    merged_changing_only_selected_experts(assets / "model", out / "adapter")
    # rank 0's step lines, which the driver echoes while training runs
    assert [line.split()[1] for line in (out / PROGRESS_FILE).read_text().splitlines()] == [f"{s}/8" for s in range(1, 9)]


def test_a_dead_worker_is_replaced_and_the_result_is_bitwise_identical(assets, uninterrupted, tmp_path, monkeypatch):
    import pipeline.train
    from tests.faults import loop_dying_once_after

    marker = tmp_path / "fault-injected"  # rank 1 dies right after the step-4 checkpoint
    monkeypatch.setattr(pipeline.train, "train_loop_per_worker", loop_dying_once_after(4, 1, marker))
    out = tmp_path / "faulty"
    run_train(config(assets, out))
    assert marker.exists(), "the fault was never injected"
    reference = adapter_tensors(uninterrupted[0] / "adapter")
    recovered = adapter_tensors(out / "adapter")
    assert reference.keys() == recovered.keys()
    assert all(torch.equal(reference[k], recovered[k]) for k in reference)


def test_resume_continues_to_the_same_result(assets, uninterrupted, tmp_path, monkeypatch, caplog):
    # Paths relative to where the user is, as typed on a command line: the workers run elsewhere
    # (Ray Train moves each into its run's storage directory) and must still find them.
    monkeypatch.chdir(assets)
    relative = {"model": "model", "data": "train.jsonl", "expert_config": "expert_cfg.json", "general_data": "general.jsonl"}
    out = tmp_path / "resumed"
    run_train(config(assets, out, steps=4, **relative))
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_train(config(assets, out, **relative))
    caplog.set_level(logging.INFO, logger="esft")
    caplog.clear()
    metrics = run_train(config(assets, out, resume=True, **relative))
    assert [r["step"] for r in metrics["history"]] == list(range(1, 9))
    echoed = [r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("train: step ")]
    assert echoed == ["5/8", "6/8", "7/8", "8/8"]  # the driver shows this run's steps, not the first run's again
    reference = adapter_tensors(uninterrupted[0] / "adapter")
    resumed = adapter_tensors(out / "adapter")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_progress_echo_shows_new_whole_lines_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="esft")
    progress = tmp_path / "progress.log"
    progress.write_text("step 1/3  from an earlier run\n")
    with echo_progress(progress, poll_seconds=0.01):
        with open(progress, "a") as handle:
            handle.write("step 2/3  loss 1.0\nstep 3/3  lo")  # the last line half-written
            handle.flush()
            time.sleep(0.1)
            handle.write("ss 0.5\n")
    assert [r.getMessage() for r in caplog.records] == ["train: step 2/3  loss 1.0", "train: step 3/3  loss 0.5"]


class RunsCode:
    """Unpickling this creates `marker`: what a tampered checkpoint could do in every worker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_files_are_read_as_data_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pipeline.checkpoint import CheckpointError, load_checkpoint_file

    state = {"optimizer": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2),
                           "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]},
             "module": {"w": torch.ones(2, 2)}, "step": 3, "history": [{"loss": 1.5}]}
    torch.save(state, tmp_path / "good.pt")
    loaded = load_checkpoint_file(tmp_path / "good.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["module"]["w"], torch.ones(2, 2))

    marker = tmp_path / "code-ran"
    import pickle

    torch.save({"module": RunsCode(marker)}, tmp_path / "zip.pt")
    torch.save({"module": RunsCode(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"module": RunsCode(marker)}))
    for name in ("zip.pt", "legacy.pt", "raw.pt"):
        with pytest.raises(CheckpointError, match="refusing to load a checkpoint file that holds more than tensors"):
            load_checkpoint_file(tmp_path / name)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint file, truncated or corrupt"):
        load_checkpoint_file(tmp_path / "cut.pt")
    assert not marker.exists()


def test_a_tampered_checkpoint_cannot_run_code_on_resume(assets, tmp_path, monkeypatch):
    from pipeline.checkpoint import CheckpointError

    out = tmp_path / "tampered"
    small = dict(workers=1, steps=2, save_every=2, eval_every=2, max_failures=0)
    run_train(config(assets, out, **small))
    files = sorted((out / "ray").glob("**/checkpoint_*/**/*.pt"))
    assert files, "the run wrote no DeepSpeed checkpoint files"
    marker = tmp_path / "code-ran"
    for path in files:  # same names, but pickles that would run code when loaded
        torch.save({"module": RunsCode(marker)}, path)

    # --resume checks the run's checkpoints before any worker starts ...
    with pytest.raises(CheckpointError, match="refusing to load a checkpoint file .* tampered with"):
        run_train(config(assets, out, resume=True, **{**small, "steps": 4}))
    # ... and a worker (which also restores after a failure) reads them as data only
    from ray.train import TrainingFailedError

    monkeypatch.setattr("pipeline.checkpoint.check_run_checkpoints", lambda run_dir: 0)
    with pytest.raises(TrainingFailedError, match="refusing to load a checkpoint file"):
        run_train(config(assets, out, resume=True, **{**small, "steps": 4}))
    assert not marker.exists(), "a checkpoint ran code"


@pytest.mark.parametrize("method, export", [("fft", "model"), ("lora", "lora")])
def test_baselines_run_through_the_same_path(assets, tmp_path, method, export):
    metrics = run_train(config(assets, tmp_path / method, method=method, workers=1, steps=2, save_every=2, eval_every=2))
    assert metrics["method"] == method and len(metrics["history"]) == 2
    assert (tmp_path / method / export).is_dir()
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "model"), tmp_path / method / export)
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == metrics["trainable_parameters"]


def test_bad_inputs_fail_before_training(assets, tmp_path):
    out = tmp_path / "never"
    bad_cfg = tmp_path / "bad_cfg.json"
    ExpertConfig({"0": [1]}).save(bad_cfg)  # layer 0 is dense in DeepSeek-V2 tiny
    with pytest.raises(ValueError, match="not a MoE layer"):
        run_train(config(assets, out, expert_config=str(bad_cfg)))
    with pytest.raises(ConfigError, match="the cluster has 2 CPUs"):
        run_train(config(assets, out, workers=3))
    with pytest.raises(ConfigError, match="cannot read DeepSpeed config"):
        run_train(config(assets, out, deepspeed=str(tmp_path / "missing.json")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run_train(config(assets, out, data=str(empty)))
    with pytest.raises(ConfigError, match="needs --expert-config"):
        run_train(config(assets, out, expert_config=None))
    assert not out.exists()


def test_shipped_deepspeed_configs_are_the_presets():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
    for name in PRESETS:
        assert json.loads((folder / f"{name}.json").read_text()) == preset(name), name


def test_example_configs_parse():
    from pathlib import Path

    from pipeline.config import build_config, read_yaml
    from pipeline.profile import ProfileConfig

    folder = Path(__file__).resolve().parents[1] / "configs"
    assert build_config(TrainConfig, read_yaml(folder / "train.example.yaml"), {}).workers == 8
    assert build_config(ProfileConfig, read_yaml(folder / "profile.example.yaml"), {}).replicas == 8
