"""Read-only capture of routing decisions through forward hooks on the routers.

Every supported router returns `(router_logits, topk_weights, topk_indices)` for the flattened
tokens of the batch, in the row-major order of `input_ids`. A forward hook sees exactly what the
model used, with no rewritten forward and no file I/O.

Legend: T = tokens in the batch (batch x sequence, flattened), K = routed experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from esft.families import MoELayer, moe_layers

# Called once per MoE layer per forward with (layer index, topk_ids_TK, topk_weights_TK).
RoutingCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@contextmanager
def routing_hooks(model: nn.Module, on_routing: RoutingCallback, layers: list[MoELayer] | None = None) -> Iterator[None]:
    """Call `on_routing` with every MoE layer's routing while the context is open."""
    handles = []
    for layer in layers or moe_layers(model):

        def hook(_module, _args, output, index=layer.index):
            _logits, topk_weights_TK, topk_ids_TK = output
            on_routing(index, topk_ids_TK, topk_weights_TK)

        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_decoder(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Run the decoder stack only: profiling needs the routers, not the LM head's logits."""
    decoder = getattr(model, "model", model)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # full rows: let attention take its causal fast path, no 4D mask
    decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def capture_routing(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One inference forward; returns {layer: (topk_ids_TK, topk_weights_TK)} for ALL T tokens
    (padding included; callers mask with `attention_mask.reshape(-1)`)."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(index: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        captured[index] = (ids.detach().clone(), weights.detach().float().clone())

    with torch.inference_mode(), routing_hooks(model, keep):
        run_decoder(model, input_ids, attention_mask)
    return captured
