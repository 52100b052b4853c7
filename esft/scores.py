"""Expert relevance scores (ESFT-SPEC §2) as exactly mergeable raw sums.

Legend: L = MoE layers, E = routed experts per layer, T = tokens, K = routed experts per token,
B = sequences (rows) in a batch.

We keep, per layer: the number of profiled tokens, how often each expert was selected, and the
gate mass each expert received. Gate mass is stored in fixed point (units of 2**-30, int64) so
that partial results from any number of workers add up to the same integers in any order:
merging is exact and associative, and the same data gives the same selection however it was
split. The quantisation error is below 5e-10 per token, far under the 4-decimal rounding of the
reference summary. Scores are normalised per layer (never across layers: that is the reference
script's bug, ESFT-SPEC §2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from esft.errors import EsftError
from esft.families import family_of, moe_layers, num_experts, top_k
from esft.io import atomic_write_text
from esft.routing import routing_hooks, run_decoder

SCORES_FORMAT = "esft-scores/1"
SCORES_FILENAME = "expert_scores.json"
SUMMARY_FILENAME = "summary.json"
GATE_FIXED_POINT_BITS = 30
_GATE_SCALE = float(2**GATE_FIXED_POINT_BITS)
_INT64_HEADROOM = 2**62

ScoreFunction = Literal["token", "gate"]
Averaging = Literal["token", "sequence"]
SCORE_FUNCTIONS: tuple[str, ...] = ("token", "gate")
AVERAGINGS: tuple[str, ...] = ("token", "sequence")


class ScoresError(EsftError):
    """A scores file or scores object is invalid or incompatible."""


@dataclass
class ExpertScores:
    """Raw routing statistics of one corpus on one model; `a + b` merges two partials exactly."""

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    tokens_L: np.ndarray  # int64 [L]
    selections_LE: np.ndarray  # int64 [L, E]
    gate_mass_fixed_LE: np.ndarray  # int64 [L, E], units of 2**-30
    sequences: int = 0  # rows with at least one counted token
    seq_mean_selections_LE: np.ndarray | None = None  # float64 [L, E], sum over rows of per-row mean
    seq_mean_gate_LE: np.ndarray | None = None  # float64 [L, E]
    metadata: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, layers: tuple[int, ...], num_experts: int, top_k: int, metadata: dict | None = None) -> ExpertScores:
        L, E = len(layers), num_experts
        return cls(
            layers=tuple(layers),
            num_experts=E,
            top_k=top_k,
            tokens_L=np.zeros(L, np.int64),
            selections_LE=np.zeros((L, E), np.int64),
            gate_mass_fixed_LE=np.zeros((L, E), np.int64),
            seq_mean_selections_LE=np.zeros((L, E), np.float64),
            seq_mean_gate_LE=np.zeros((L, E), np.float64),
            metadata=dict(metadata or {}),
        )

    @property
    def total_tokens(self) -> int:
        return int(self.tokens_L.max(initial=0))

    def __add__(self, other: ExpertScores) -> ExpertScores:
        if (self.layers, self.num_experts, self.top_k) != (other.layers, other.num_experts, other.top_k):
            raise ScoresError(
                f"cannot merge scores of different models: layers {self.layers} x {self.num_experts} experts "
                f"top-{self.top_k} vs layers {other.layers} x {other.num_experts} experts top-{other.top_k}"
            )
        gate = self.gate_mass_fixed_LE + other.gate_mass_fixed_LE
        if gate.max(initial=0) >= _INT64_HEADROOM:
            raise ScoresError("gate mass overflows int64 fixed point; profile fewer tokens per scores file")
        return ExpertScores(
            layers=self.layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            tokens_L=self.tokens_L + other.tokens_L,
            selections_LE=self.selections_LE + other.selections_LE,
            gate_mass_fixed_LE=gate,
            sequences=self.sequences + other.sequences,
            seq_mean_selections_LE=_add_optional(self.seq_mean_selections_LE, other.seq_mean_selections_LE),
            seq_mean_gate_LE=_add_optional(self.seq_mean_gate_LE, other.seq_mean_gate_LE),
            metadata={**other.metadata, **self.metadata},
        )

    def scores(self, function: ScoreFunction, averaging: Averaging = "token") -> np.ndarray:
        """Per-layer normalised scores [L, E]: token selection ratio R or average gate score G."""
        if function not in SCORE_FUNCTIONS:
            raise ScoresError(f"unknown score function {function!r}; use one of {', '.join(SCORE_FUNCTIONS)}")
        if averaging not in AVERAGINGS:
            raise ScoresError(f"unknown averaging {averaging!r}; use one of {', '.join(AVERAGINGS)}")
        if self.total_tokens == 0:
            raise ScoresError("no tokens were profiled; give the profiler a corpus with at least one usable token")
        if averaging == "sequence":
            if self.seq_mean_gate_LE is None or self.sequences == 0:
                raise ScoresError("these scores carry no per-sequence sums; re-profile or use token averaging")
            if function == "token":
                return self.seq_mean_selections_LE / (self.sequences * self.top_k)
            return self.seq_mean_gate_LE / self.sequences
        tokens = self.tokens_L[:, None].astype(np.float64)
        if function == "token":
            return self.selections_LE / (tokens * self.top_k)
        return self.gate_mass_fixed_LE / _GATE_SCALE / tokens

    def to_summary(self, averaging: Averaging = "token") -> dict:
        """The reference `summary.json` content: scores rounded to 4 decimals, layer keys in the
        reference's (string-sorted) order."""
        return {
            f"{function}_scores": layer_score_dict(self.layers, self.scores(function, averaging))
            for function in SCORE_FUNCTIONS
        }

    def to_json(self) -> dict:
        return {
            "format": SCORES_FORMAT,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "gate_fixed_point_bits": GATE_FIXED_POINT_BITS,
            "tokens": self.tokens_L.tolist(),
            "selections": self.selections_LE.tolist(),
            "gate_mass_fixed": self.gate_mass_fixed_LE.tolist(),
            "sequences": self.sequences,
            "seq_mean_selections": None if self.seq_mean_selections_LE is None else self.seq_mean_selections_LE.tolist(),
            "seq_mean_gate": None if self.seq_mean_gate_LE is None else self.seq_mean_gate_LE.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "scores") -> ExpertScores:
        if not isinstance(data, dict) or data.get("format") != SCORES_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ScoresError(f"{where}: not an ESFT scores file (format {found!r}, expected {SCORES_FORMAT!r})")
        if data.get("gate_fixed_point_bits") != GATE_FIXED_POINT_BITS:
            raise ScoresError(f"{where}: unsupported gate fixed-point precision {data.get('gate_fixed_point_bits')}")
        layers = tuple(_count(x, "layers", where) for x in _field(data, "layers", where))
        E, K = (_count(_field(data, "num_experts", where), "num_experts", where),
                _count(_field(data, "top_k", where), "top_k", where))
        optional = {k: data.get(k) for k in ("seq_mean_selections", "seq_mean_gate")}
        return cls(
            layers=layers,
            num_experts=E,
            top_k=K,
            tokens_L=_checked_array(_field(data, "tokens", where), np.int64, (len(layers),), "tokens", where),
            selections_LE=_checked_array(_field(data, "selections", where), np.int64, (len(layers), E), "selections", where),
            gate_mass_fixed_LE=_checked_array(_field(data, "gate_mass_fixed", where), np.int64, (len(layers), E),
                                              "gate_mass_fixed", where),
            sequences=_count(data.get("sequences", 0), "sequences", where),
            seq_mean_selections_LE=None if optional["seq_mean_selections"] is None else _checked_array(
                optional["seq_mean_selections"], np.float64, (len(layers), E), "seq_mean_selections", where),
            seq_mean_gate_LE=None if optional["seq_mean_gate"] is None else _checked_array(
                optional["seq_mean_gate"], np.float64, (len(layers), E), "seq_mean_gate", where),
            metadata=dict(data.get("metadata") or {}),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpertScores:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ScoresError(f"cannot read scores file {path}: {error}") from error
        return cls.from_json(data, where=str(path))


def is_score_value(value) -> bool:
    """A usable score or count: a finite, non-negative number (JSON true/false are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _field(data: dict, key: str, where: str):
    if key not in data:
        raise ScoresError(f"{where}: the scores file lacks {key!r}; re-run esft profile to write a complete one")
    return data[key]


def _count(value, key: str, where: str) -> int:
    if not (is_score_value(value) and float(value).is_integer()):
        raise ScoresError(f"{where}: {key} must be non-negative integers, found {value!r}; re-run esft profile")
    return int(value)


def _checked_array(values, dtype, shape: tuple[int, ...], key: str, where: str) -> np.ndarray:
    """`values` as an array of `shape`, every entry a finite, non-negative number (integers for
    counts): a NaN, a string or a negative count is a corrupted file, not a score."""
    try:
        found_shape = np.shape(values)
        flat = np.asarray(values, dtype=object).reshape(-1) if found_shape else [values]
    except ValueError:  # ragged nested lists
        found_shape, flat = "ragged", []
    if found_shape != shape:
        declared = f"{shape[0]} layers" + (f" x {shape[1]} experts" if len(shape) > 1 else "")
        raise ScoresError(f"{where}: {key} has shape {found_shape} but the file declares {declared}; "
                          "the file is corrupted or was edited: re-run esft profile")
    bad = next((v for v in flat if not is_score_value(v) or (dtype == np.int64 and not float(v).is_integer())), None)
    if bad is not None:
        kind = "non-negative integers" if dtype == np.int64 else "finite, non-negative numbers"
        raise ScoresError(f"{where}: {key} holds {bad!r}, but must hold {kind}; "
                          "the file is corrupted or was edited: re-run esft profile")
    return np.asarray(values, dtype=dtype)


def _add_optional(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    return None if a is None or b is None else a + b


def layer_score_dict(layers: tuple[int, ...], scores_LE: np.ndarray) -> dict[str, dict[str, float]]:
    """{"<layer>": {"<expert>": score rounded to 4 decimals}}, layers in string-sorted order as the
    reference writes them."""
    rows = {str(layer): {str(e): round(float(v), 4) for e, v in enumerate(row)} for layer, row in zip(layers, scores_LE)}
    return {key: rows[key] for key in sorted(rows)}


@dataclass
class RowSums:
    """Raw routing sums of B rows, kept per row (leading axis) so that a driver can merge rows in
    a fixed order and stop at a token budget exactly, however the rows were batched."""

    tokens_BL: np.ndarray  # int64 [B, L]
    selections_BLE: np.ndarray  # int64 [B, L, E]
    gate_mass_fixed_BLE: np.ndarray  # int64 [B, L, E]

    def __len__(self) -> int:
        return self.tokens_BL.shape[0]

    def row(self, b: int) -> RowSums:
        return RowSums(self.tokens_BL[b : b + 1], self.selections_BLE[b : b + 1], self.gate_mass_fixed_BLE[b : b + 1])


def layer_row_sums(
    topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, counted_BS: torch.Tensor, num_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's routing of one batch -> per-row (tokens [B], selections [B, E], gate mass
    [B, E] in fixed point), counting only tokens where `counted_BS` is true."""
    B, S = counted_BS.shape
    ids_BN = topk_ids_TK.reshape(B, -1).long()  # N = S * K pairs per row
    keep_BN = counted_BS.reshape(B, S, 1).expand(B, S, topk_ids_TK.shape[-1]).reshape(B, -1).long()
    fixed_BN = torch.round(topk_weights_TK.reshape(B, -1).double() * _GATE_SCALE).long() * keep_BN
    selections_BE = torch.zeros(B, num_experts, dtype=torch.long).scatter_add_(1, ids_BN, keep_BN)
    gate_BE = torch.zeros(B, num_experts, dtype=torch.long).scatter_add_(1, ids_BN, fixed_BN)
    return counted_BS.sum(dim=1).numpy(), selections_BE.numpy(), gate_BE.numpy()


def add_rows(scores: ExpertScores, rows: RowSums) -> ExpertScores:
    """Add rows to `scores` in place, in row order (which fixes the float order of the
    per-sequence sums, so a fixed row order gives bit-identical results)."""
    scores.tokens_L += rows.tokens_BL.sum(axis=0)
    scores.selections_LE += rows.selections_BLE.sum(axis=0)
    scores.gate_mass_fixed_LE += rows.gate_mass_fixed_BLE.sum(axis=0)
    for b in range(len(rows)):
        tokens_L = rows.tokens_BL[b]
        if tokens_L[0] == 0:
            continue
        scores.sequences += 1
        scores.seq_mean_selections_LE += rows.selections_BLE[b] / tokens_L[:, None]
        scores.seq_mean_gate_LE += rows.gate_mass_fixed_BLE[b] / _GATE_SCALE / tokens_L[:, None]
    return scores


def empty_scores_for(model: nn.Module, metadata: dict | None = None) -> ExpertScores:
    """Empty scores shaped for `model`, with its identity in the metadata."""
    layers = moe_layers(model)
    meta = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "family": family_of(model).name,
        **(metadata or {}),
    }
    return ExpertScores.empty(tuple(layer.index for layer in layers), num_experts(layers[0]), top_k(layers[0]), meta)


def profile_rows(
    model: nn.Module,
    input_ids_BS: torch.Tensor,
    attention_mask_BS: torch.Tensor,
    token_mask_BS: torch.Tensor | None = None,
) -> RowSums:
    """Run one batch through the decoder (inference mode, no LM head) and return its per-row
    routing sums. Counted tokens are the non-padding ones (`attention_mask`), further restricted
    by `token_mask` when given (e.g. `labels != -100` to count only loss tokens)."""
    layers = moe_layers(model)
    position = {layer.index: i for i, layer in enumerate(layers)}
    B, E = input_ids_BS.shape[0], num_experts(layers[0])
    counted_BS = attention_mask_BS.bool()
    if token_mask_BS is not None:
        counted_BS = counted_BS & token_mask_BS.bool()
    counted_BS = counted_BS.cpu()
    sums = RowSums(
        np.zeros((B, len(layers)), np.int64), np.zeros((B, len(layers), E), np.int64), np.zeros((B, len(layers), E), np.int64)
    )

    def on_routing(layer: int, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> None:
        tokens, selections, gate = layer_row_sums(ids_TK.cpu(), weights_TK.float().cpu(), counted_BS, E)
        i = position[layer]
        sums.tokens_BL[:, i], sums.selections_BLE[:, i], sums.gate_mass_fixed_BLE[:, i] = tokens, selections, gate

    with torch.inference_mode(), routing_hooks(model, on_routing, layers):
        run_decoder(model, input_ids_BS, attention_mask_BS)
    return sums


def profile_batch(
    model: nn.Module,
    input_ids_BS: torch.Tensor,
    attention_mask_BS: torch.Tensor,
    token_mask_BS: torch.Tensor | None = None,
    into: ExpertScores | None = None,
) -> ExpertScores:
    """Profile one batch and add it to `into` (or to new empty scores for `model`)."""
    scores = into if into is not None else empty_scores_for(model)
    return add_rows(scores, profile_rows(model, input_ids_BS, attention_mask_BS, token_mask_BS))
