"""Greedy generation from already formatted prompts: the one decoding path that evaluation, the
registry loader and the pretraining recipe's model card all use (pure PyTorch + transformers)."""

from __future__ import annotations

import torch


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to (not including) the first of `stops` it contains."""
    cut = min((text.index(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, stops: list[str]) -> list[str]:
    """Greedy continuations of already formatted prompts (left-padded batch), cut at the first stop."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(len(ids) for ids in encoded)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad)
    return [cut_at_stop(t, stops) for t in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]
