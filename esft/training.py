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


def answer_matches(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Teacher-forced exact match of the answers in a batch of packed rows: (answers whose every
    labelled token is the model's argmax given the gold text before it, answers). An answer is a
    maximal run of labelled positions in a row (one assistant turn and its EOS; an answer cut by the
    row's end counts as its own). A greedy decoder writes exactly the gold answer, and stops, iff every
    one of its tokens is the argmax after the gold prefix, so this is greedy generation's exact match on
    the same prompts, read from the forward that computes the loss instead of a decoding loop."""
    targets = labels[:, 1:]
    labelled = targets != -100
    missed = labelled & (logits[:, :-1].argmax(-1) != targets)
    starts = labelled & ~torch.nn.functional.pad(labelled[:, :-1], (1, 0), value=False)  # per row: a row starts a run
    answer_ids = starts.flatten().cumsum(0).view_as(starts)
    answers = int(starts.sum())
    return answers - int(answer_ids[missed].unique().numel()), answers
