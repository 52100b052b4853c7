"""The paper's optimisation recipe (ESFT-SPEC §5) as two small functions, shared by every loop
(the quickstart, the benchmarks, and the distributed trainer's workers)."""

from __future__ import annotations

import torch
from torch import nn

from esft.data import DataError
from esft.errors import EsftError

PAPER_LR = {"esft": 1e-5, "fft": 3e-5, "lora": 1e-4}
PAPER_BETAS = (0.9, 0.95)
PAPER_WEIGHT_DECAY = 0.1
PAPER_GRAD_CLIP = 1.0


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = PAPER_WEIGHT_DECAY) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, so no state is allocated for frozen ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EsftError("the model has no trainable parameters; apply an expert config first")
    # The fused kernel does the whole update in one pass (CPU and CUDA, fp32/bf16/fp16).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=PAPER_BETAS, weight_decay=weight_decay, fused=fused)


def train_step(
    model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, grad_clip: float = PAPER_GRAD_CLIP
) -> float:
    """One optimisation step on a packed batch; returns the loss."""
    model.train()
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over `batches` (validation / general-domain loss)."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            total += float(loss) * n
            tokens += n
    if tokens == 0:
        raise DataError("no loss tokens in the evaluation batches")
    return total / tokens
