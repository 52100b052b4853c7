"""Bad input at the command line (issue 17): one line `esft: error: ...` naming the input and the
fix, exit 2, before any compute, nothing written. No test here starts Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from esft.tiny import tiny_model
from pipeline.cli import main as esft
from tests.conftest import save_model_with_tokenizer, write_jsonl

ROW = {"messages": [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"}]}


def one_error_line(capsys) -> str:
    """The command's stderr, which must be exactly one `esft: error:` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("esft: error: ") and "\n" not in err, err
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- a damaged adapter: the file is named, no SafetensorError traceback ---------------------------

@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    from esft.adapter import save_adapter
    from esft.families import moe_layers
    from esft.select import ExpertConfig
    from esft.trainable import apply_expert_config

    model = tiny_model("deepseek_v2")
    config = ExpertConfig({str(layer.index): [0, 2] for layer in moe_layers(model)})
    apply_expert_config(model, config)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", config)


def _damage(adapter: Path, how: str) -> None:
    weights = adapter / "model.safetensors"
    raw = weights.read_bytes()
    if how == "empty":
        weights.write_bytes(b"")
    elif how == "truncated":  # an interrupted copy
        weights.write_bytes(raw[: len(raw) // 2])
    else:  # "tampered": the JSON header edited by hand
        weights.write_bytes(raw[:8] + b"{{{{" + raw[12:])


@pytest.mark.parametrize("how", ["empty", "truncated", "tampered"])
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_a_damaged_adapter_file_is_named(good_adapter, tmp_path, capsys, how, command):
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    _damage(adapter, how)
    out = tmp_path / ("merged" if command == "merge" else "metrics.json")
    if command == "merge":
        argv = ["merge", "--model", "tiny:deepseek_v2", "--adapter", str(adapter), "--out", str(out)]
    else:  # checked on the model's skeleton before Ray starts and generation begins
        data = write_jsonl(tmp_path / "eval.jsonl", [ROW])
        argv = ["eval", "--model", "tiny:deepseek_v2", "--tokenizer", str(tmp_path), "--adapter", str(adapter),
                "--data", str(data), "--out", str(out)]
    assert esft(argv) == 2
    error = one_error_line(capsys)
    assert f"{adapter / 'model.safetensors'} is not a readable safetensors file" in error
    assert "copy it again or re-export it" in error
    assert not out.exists()


# --- model paths and types -------------------------------------------------------------------------

def test_a_missing_model_directory_is_one_line(tmp_path, capsys):
    for missing in (str(tmp_path / "no-such-model"), "./no-such-model", "runs/a/no-such-model"):
        assert esft(["inspect", missing]) == 2
        error = one_error_line(capsys)
        assert f"no model directory at {missing}; give an existing model directory or a hub id" in error
        assert "Repo id" not in error
    assert esft(["merge", "--model", str(tmp_path / "gone"), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "no model directory at" in one_error_line(capsys)


def test_an_unknown_model_type_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "brand_new_moe", "architectures": ["BrandNewMoeForCausalLM"]}))
    for command in (["inspect", str(model)], ["merge", "--model", str(model), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]):
        assert esft(command) == 2
        error = one_error_line(capsys)
        assert "has model_type 'brand_new_moe', which transformers" in error and "ESFT supports the MoE families deepseek_v2" in error
        assert "pip install" not in error


# --- a malformed training line names what a CLI user can do -----------------------------------------

def test_a_malformed_training_line_says_fix_or_delete(tmp_path, capsys):
    model = save_model_with_tokenizer(tmp_path / "model", [ROW])
    data = write_jsonl(tmp_path / "train.jsonl", [ROW] * 3)
    with data.open("a") as handle:
        handle.write('{"messages": [oops\n')
    out = tmp_path / "run"
    capsys.readouterr()  # the model's saving progress is not the command's output
    assert esft(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--method", "fft", "--steps", "1"]) == 2
    error = one_error_line(capsys)
    assert f"{data}:4: invalid JSON" in error and "fix or delete these lines" in error
    assert not out.exists()
