"""Adapters: only trained tensors, reference naming, exact reload, standalone merge, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from esft.adapter import AdapterError, adapter_summary, check_adapter, load_adapter, save_adapter
from esft.families import moe_layers
from esft.numerics import forward_tolerance
from esft.select import ExpertConfig
from esft.testing import tiny_model
from esft.trainable import apply_expert_config, merge_adapter
from pipeline.cli import main as esft


def trained_model(family: str, input_ids: torch.Tensor, **flags):
    model = tiny_model(family)
    config = ExpertConfig({str(layer.index): [0, 2] for layer in moe_layers(model)[1:]}, **flags)
    apply_expert_config(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), config


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_roundtrip_and_standalone_merge(family, batch, tmp_path):
    input_ids, _ = batch
    model, config = trained_model(family, input_ids, shared_experts=True)
    expected = logits(model, input_ids)
    save_adapter(model, tmp_path / "adapter", config)

    fresh = tiny_model(family)
    assert load_adapter(fresh, tmp_path / "adapter") == config
    # The same weights on the same (selective) path and batch: bit-identical by construction.
    assert torch.equal(logits(fresh, input_ids), expected)

    merge_adapter(fresh).save_pretrained(tmp_path / "merged")
    standalone = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # no project code involved
    # The merged weights are exactly the trained ones ...
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(standalone.state_dict()[name], tensor), name
    # ... but the plain fused forward groups its GEMMs differently: equal within rounding.
    assert_forward_close(standalone, input_ids, expected)


def assert_forward_close(model, input_ids: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = forward_tolerance(model)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=tolerance.rtol, atol=tolerance.atol)


def test_adapter_holds_only_trained_tensors_in_reference_naming(batch, tmp_path):
    input_ids, _ = batch
    model, config = trained_model("deepseek_v2", input_ids)
    save_adapter(model, tmp_path / "adapter", config)
    with safe_open(tmp_path / "adapter" / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    expected = {
        f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
        for layer in (2, 3)
        for expert in (0, 2)
        for proj in ("gate_proj", "up_proj", "down_proj")
    }
    assert keys == expected
    assert metadata["family"] == "deepseek_v2" and metadata["num_experts"] == "16"
    assert json.loads((tmp_path / "adapter" / "expert_cfg.json").read_text())["experts"] == {"2": [0, 2], "3": [0, 2]}
    # size = the trained experts' bytes plus a small header
    expert_bytes = 4 * (3 * 32 * 64) * 4  # 4 experts x 3 matrices of 32x64 fp32
    assert expert_bytes <= adapter_summary(tmp_path / "adapter")["bytes"] <= expert_bytes + 8192


def test_mixtral_adapter_uses_its_own_checkpoint_names(batch, tmp_path):
    input_ids, _ = batch
    model, config = trained_model("mixtral", input_ids)
    save_adapter(model, tmp_path / "adapter", config)
    with safe_open(tmp_path / "adapter" / "model.safetensors", "pt") as handle:
        assert "model.layers.1.block_sparse_moe.experts.2.w1.weight" in handle.keys()


def test_reference_style_adapter_loads(batch, tmp_path):
    """An adapter as the reference writes it (no metadata, per-expert names) loads the same way."""
    input_ids, _ = batch
    base = tiny_model("deepseek_v2")
    experts = moe_layers(base)[1].experts  # decoder layer 2
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2 * 32, 64, generator=generator)
    down = torch.randn(64, 32, generator=generator)
    save_file(
        {
            "model.layers.2.mlp.experts.5.gate_proj.weight": gate_up[:32].contiguous(),
            "model.layers.2.mlp.experts.5.up_proj.weight": gate_up[32:].contiguous(),
            "model.layers.2.mlp.experts.5.down_proj.weight": down,
        },
        tmp_path / "model.safetensors",
    )
    (tmp_path / "expert_cfg.json").write_text(json.dumps({"experts": {"2": [5]}, "shared_experts": False,
                                                          "non_expert_modules": False}))
    load_adapter(base, tmp_path)
    merge_adapter(base)
    assert torch.equal(experts.gate_up_proj[5], gate_up)
    assert torch.equal(experts.down_proj[5], down)


def test_mismatched_adapters_are_rejected_before_writing(batch, tmp_path, capsys):
    input_ids, _ = batch
    model, config = trained_model("deepseek_v2", input_ids)
    save_adapter(model, tmp_path / "adapter", config)
    out = tmp_path / "merged"

    # another family
    assert esft(["merge", "--model", "tiny:qwen2_moe", "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    assert "trained on a deepseek_v2 model, not qwen2_moe" in capsys.readouterr().err
    assert not out.exists()

    # another expert count
    with pytest.raises(AdapterError, match="for 16 experts per layer; this model has 32"):
        check_adapter(tiny_model("deepseek_v2", n_routed_experts=32), tmp_path / "adapter")
    # other tensor shapes
    with pytest.raises(AdapterError, match="has shape"):
        check_adapter(tiny_model("deepseek_v2", moe_intermediate_size=16), tmp_path / "adapter")
    # a layer that is not MoE in this model
    with pytest.raises(AdapterError, match="not a MoE layer"):
        check_adapter(tiny_model("deepseek_v2", first_k_dense_replace=3), tmp_path / "adapter")
    # missing tensors
    cfg = json.loads((tmp_path / "adapter" / "expert_cfg.json").read_text())
    cfg["experts"]["3"].append(7)
    (tmp_path / "adapter" / "expert_cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="lacks 3 expert tensors"):
        check_adapter(tiny_model("deepseek_v2"), tmp_path / "adapter")
    # not an adapter at all
    with pytest.raises(AdapterError, match="model.safetensors is missing"):
        check_adapter(tiny_model("deepseek_v2"), tmp_path)


def _add_tensor(adapter_dir, name: str, value: torch.Tensor) -> None:
    with safe_open(adapter_dir / "model.safetensors", "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    save_file({**tensors, name: value.contiguous()}, adapter_dir / "model.safetensors", metadata=metadata)


@pytest.mark.parametrize(
    "name, flag, message",
    [
        ("model.embed_tokens.weight", "non_expert_modules",
         "holds the non-expert tensor 'model.embed_tokens.weight' but its expert_cfg.json says non_expert_modules: false"),
        ("model.layers.2.self_attn.o_proj.weight", "non_expert_modules", "says non_expert_modules: false"),
        ("model.layers.2.mlp.shared_experts.down_proj.weight", "shared_experts",
         "holds the shared-expert tensor .* says shared_experts: false"),
        ("model.layers.2.mlp.experts.down_proj", None, "holds the whole fused tensor"),
    ],
)
def test_adapters_carry_only_tensors_their_config_declares(batch, tmp_path, name, flag, message):
    """Any tensor whose name and shape fit used to be copied in: an adapter claiming to train only
    experts could replace the embeddings."""
    input_ids, _ = batch
    model, config = trained_model("deepseek_v2", input_ids)
    save_adapter(model, tmp_path / "adapter", config)
    base = tiny_model("deepseek_v2")
    _add_tensor(tmp_path / "adapter", name, torch.zeros_like(dict(base.named_parameters())[name]))
    with pytest.raises(AdapterError, match=message):
        load_adapter(base, tmp_path / "adapter")
    assert all(p.requires_grad for p in base.parameters()), "a refused adapter must leave the model untouched"
    if flag is None:
        return
    cfg = json.loads((tmp_path / "adapter" / "expert_cfg.json").read_text())
    (tmp_path / "adapter" / "expert_cfg.json").write_text(json.dumps({**cfg, flag: True}))
    loaded = tiny_model("deepseek_v2")
    load_adapter(loaded, tmp_path / "adapter")  # declared: accepted and applied
    assert torch.count_nonzero(dict(loaded.named_parameters())[name]) == 0


def test_cli_merge_writes_a_loadable_model(batch, tmp_path):
    input_ids, _ = batch
    model, config = trained_model("qwen3_moe", input_ids)
    save_adapter(model, tmp_path / "adapter", config)
    assert esft(["merge", "--model", "tiny:qwen3_moe", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert_forward_close(merged, input_ids, logits(model, input_ids))  # fused vs selective kernels


def test_save_refuses_to_overwrite_and_leaves_no_partial_directory(batch, tmp_path):
    input_ids, _ = batch
    model, config = trained_model("olmoe", input_ids)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter(model, tmp_path / "adapter", config)
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
