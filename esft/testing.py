"""Tiny MoE models and tokenizers built from configs in memory (no downloads), for the tests, the
benchmarks and the `tiny:<family>` model names (a random model of each supported family, for
trying the CLI). The method and the pipeline never import this module; `esft.model.load_model`
imports it only when a `tiny:` name is asked for. Each config builds and trains on a CPU in well
under a second per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from esft.demo.tokenizer import train_bpe_tokenizer
from esft.families import UnsupportedModelError

_COMMON = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    # Match the BPE tokenizers' special tokens (esft.demo.tokenizer): <s>=0, </s>=1, <pad>=2.
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)

_DEEPSEEK = dict(
    num_key_value_heads=4,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    moe_intermediate_size=32,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    topk_method="greedy",
    # Tiny routers at init give near-uniform gates; the real models use scaling factors > 1.
    routed_scaling_factor=1.0,
)

TINY_OVERRIDES: dict[str, dict] = {
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": {**_DEEPSEEK, "q_lora_rank": 32, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc"},
    "qwen2_moe": dict(
        num_experts=16, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
    ),
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(num_experts=16, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=16, num_experts_per_tok=2, head_dim=16, sliding_window=64,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
}

FAMILIES = tuple(TINY_OVERRIDES)


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """A tiny config of `family`; keyword overrides win (e.g. hidden_size=256 for benchmarks)."""
    if family not in TINY_OVERRIDES:
        raise UnsupportedModelError(f"no tiny config for family {family!r}; known: {', '.join(FAMILIES)}")
    kwargs = {**_COMMON, **TINY_OVERRIDES[family], **overrides}
    if family == "deepseek_v3":
        kwargs.pop("topk_method", None)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of `family`, deterministic for a given seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    _spread_routers(model, seed)
    return model.eval()


def _spread_routers(model: PreTrainedModel, seed: int) -> None:
    """Give router weights a usable scale: some families initialise them to zero, which routes
    every token by tie-breaking and makes routing tests meaningless."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.copy_(
                    torch.randn(param.shape, generator=generator, dtype=torch.float32, device="cpu").to(param.dtype) * 0.5
                )


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on `texts` (a small default corpus if None)."""
    return train_bpe_tokenizer(texts or _DEFAULT_CORPUS, vocab_size)


_DEFAULT_CORPUS = [
    "User: What is 12 plus 30?\n\nAssistant: 12 plus 30 is 42.",
    "User: Translate 'good morning' into French.\n\nAssistant: Bonjour.",
    "User: Write a function that adds two numbers.\n\nAssistant: def add(a, b): return a + b",
    "User: Book a table for two at seven.\n\nAssistant: {\"intent\": \"book_table\", \"people\": 2}",
    "The quick brown fox jumps over the lazy dog. Experts route tokens to specialists.",
] * 8


def save_shaped_model(out: Path, shape: dict, texts: list[str], device: str = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> Path:
    """A model directory for benchmarks: a random model of `shape` (a config.json's fields, `model_type`
    included, e.g. a real model's layer shape with a few layers) and a tokenizer trained on `texts`. Built on
    `device`: real shapes are too large to initialise on a CPU quickly."""
    values = dict(shape)
    family = values.pop("model_type")
    tokenizer = tiny_tokenizer(texts, vocab_size=1000)
    with torch.device(device):
        model = tiny_model(family, seed=seed, dtype=dtype, **{**values, "vocab_size": len(tokenizer)})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
