"""How close two computations of the same maths must be when different kernels compute them.

Bit-identity is a property of a computation repeated on the same path (same kernels, shapes,
batch and thread count), not of the maths. It holds by construction for: frozen tensors and
unselected rows (never written), integer counts, and a computation repeated on the same path and
batch. Those are compared with `torch.equal`.

Where different kernels compute the same maths (the selective grouped forward vs the fused one, a
merged model vs base + adapter, GEMMs split over another number of threads), sums are added in
another order and round differently: ~5e-7 on fp32 logits on some CPUs, nothing on others. Those
are compared with `rounding_tolerance`, defined here once and used by tests and product code.

The bound. Two summation orders of n terms differ by at most about 2·n·u·Σ|x_i|, u = eps/2 the
unit roundoff (Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2): n·eps relative to
the terms' magnitude. Kernels accumulate bf16/fp16 inputs in fp32 and round the result once to
the output dtype, which can move it by one unit in the last place; a forward chains a few such
roundings (each layer's output). For outputs of dtype d made by reductions of length n:

    rtol = atol = n · eps(accumulation dtype) + ROUNDINGS · eps(d)

atol equals rtol because the values compared (normalised activations, logits) are of order one;
atol covers outputs near zero. The worst-case (linear in n) bound leaves room for the few chained
reductions of a forward; it is still orders of magnitude below what a real bug moves (a wrong
expert row, a missed update: 1e-3 and more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# One-ulp flips of the output dtype's rounding can compound over a few chained roundings (the
# grouped and eager experts kernels differ by 1 bf16 ulp on tiny models); 4 leaves margin.
ROUNDINGS = 4


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def allows(self, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        """True when |actual - expected| <= atol + rtol·|expected| everywhere (and shapes match)."""
        return actual.shape == expected.shape and torch.allclose(actual.double(), expected.double(),
                                                                 rtol=self.rtol, atol=self.atol)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels sum in: fp32 for half-precision inputs, the dtype itself otherwise."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def rounding_tolerance(dtype: torch.dtype, reduction: int) -> Tolerance:
    """Tolerance for outputs of `dtype` computed by sums of up to `reduction` terms, when two
    kernels may add them in different orders (see the module docstring for the derivation).
    Wrong arguments are a caller's bug, not user input: plain ValueError."""
    if not dtype.is_floating_point:
        raise ValueError(f"rounding tolerance is for floating-point dtypes, not {dtype}; compare integers exactly")
    if reduction < 1:
        raise ValueError(f"reduction length must be a positive integer, got {reduction!r}")
    bound = reduction * torch.finfo(_accumulation_dtype(dtype)).eps + ROUNDINGS * torch.finfo(dtype).eps
    return Tolerance(rtol=bound, atol=bound)


def forward_reduction(config) -> int:
    """The longest sum in a transformer forward: over the hidden size (attention and expert
    projections, LM head) or an MLP's intermediate size (its down projection)."""
    sizes = [getattr(config, name, None) for name in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    return max(int(size) for size in sizes if size)


def forward_tolerance(model: torch.nn.Module) -> Tolerance:
    """Tolerance for a model's logits or hidden states computed by two kernel paths."""
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    return rounding_tolerance(dtype, forward_reduction(model.config))
