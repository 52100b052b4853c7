"""Expert selection (ESFT-SPEC §3) and the reference expert-config format (ESFT-SPEC §4).

The rule is the reference's, exactly: per layer, sort experts by score descending (ties keep
ascending expert id: a stable sort), walk the list with a running sum and stop before adding an
expert once the sum has reached p. The crossing expert is included, so at least one expert is
selected for any p > 0, and a layer whose total is below p selects all of its experts. Like the
reference, the rule runs on scores rounded to 4 decimals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from esft.errors import EsftError
from esft.io import atomic_write_text
from esft.scores import (
    SCORE_FUNCTIONS, SCORES_FILENAME, SUMMARY_FILENAME, Averaging, ExpertScores, ScoresError, is_score_value, layer_score_dict,
)

CONFIG_FILENAME = "expert_cfg.json"


class SelectionError(EsftError):
    """Invalid selection parameters or an invalid expert config."""


@dataclass
class ExpertConfig:
    """Which parameters ESFT trains: routed experts per decoder layer, plus two switches."""

    experts: dict[str, list[int]]  # "<decoder layer>" -> expert ids in selection order
    shared_experts: bool = False
    non_expert_modules: bool = False

    @property
    def layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.experts)

    def experts_of(self, layer: int) -> list[int]:
        return list(self.experts.get(str(layer), []))

    @property
    def num_selected(self) -> int:
        return sum(len(ids) for ids in self.experts.values())

    def to_json(self) -> str:
        # The reference writes json.dump(cfg) with default separators and no trailing newline.
        return json.dumps(
            {"experts": self.experts, "shared_experts": self.shared_experts, "non_expert_modules": self.non_expert_modules}
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict, where: str = "expert config") -> ExpertConfig:
        experts = data.get("experts") if isinstance(data, dict) else None
        if not isinstance(experts, dict):
            raise SelectionError(f"{where}: missing 'experts' mapping of layer -> expert ids")
        cleaned: dict[str, list[int]] = {}
        for layer, ids in experts.items():
            if not str(layer).isdigit() or not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise SelectionError(f"{where}: layer {layer!r} must map a decoder-layer index to a list of expert ids")
            if len(set(ids)) != len(ids):
                raise SelectionError(f"{where}: layer {layer} lists an expert twice: {ids}")
            cleaned[str(layer)] = list(ids)
        return cls(cleaned, bool(data.get("shared_experts", False)), bool(data.get("non_expert_modules", False)))


def load_expert_config(path: str | Path) -> ExpertConfig:
    """Read an expert config (reference format) from a file or from an adapter directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SelectionError(f"cannot read expert config {path}: {error}") from error
    return ExpertConfig.from_dict(data, where=str(path))


def check_top_p(top_p: float) -> None:
    if not (isinstance(top_p, (int, float)) and math.isfinite(top_p) and 0 < top_p <= 1):
        raise SelectionError(f"top_p must be in (0, 1], got {top_p!r}; e.g. 0.2 for token scores, 0.1 for gate scores")


def select_top_p(scores: Sequence[float], top_p: float) -> list[int]:
    """The reference rule on one layer's scores (index = expert id); returns ids in selection order."""
    check_top_p(top_p)
    ranked = sorted(enumerate(scores), key=lambda item: item[1], reverse=True)  # stable: ties keep id order
    selected, running = [], 0.0
    for expert, score in ranked:
        if running >= top_p:
            break
        selected.append(expert)
        running += score
    return selected


def select_top_n(scores: Sequence[float], experts_per_layer: int) -> list[int]:
    """A fixed budget: the `experts_per_layer` best experts of one layer, in rank order."""
    if not isinstance(experts_per_layer, int) or not 0 < experts_per_layer <= len(scores):
        raise SelectionError(f"experts_per_layer must be an integer in [1, {len(scores)}], got {experts_per_layer!r}")
    ranked = sorted(enumerate(scores), key=lambda item: item[1], reverse=True)
    return [expert for expert, _ in ranked[:experts_per_layer]]


def select_experts(
    layer_scores: dict[str, dict[str, float]],
    top_p: float | None = None,
    experts_per_layer: int | None = None,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
) -> ExpertConfig:
    """Apply the rule to every layer of a reference-style score mapping (layer order preserved)."""
    if (top_p is None) == (experts_per_layer is None):
        raise SelectionError("give exactly one of top_p or experts_per_layer")
    if top_p is not None:
        check_top_p(top_p)
    experts = {}
    for layer, by_expert in layer_scores.items():
        ordered = [by_expert[str(e)] for e in range(len(by_expert))]
        experts[layer] = select_top_p(ordered, top_p) if top_p is not None else select_top_n(ordered, experts_per_layer)
    return ExpertConfig(experts, shared_experts, non_expert_modules)


def load_layer_scores(path: str | Path, score_function: str, averaging: Averaging = "token") -> dict[str, dict[str, float]]:
    """Scores as {"<layer>": {"<expert>": score}} (4 decimals) from our scores file, a directory
    holding one (or a summary.json), or a reference `summary.json`."""
    if score_function not in SCORE_FUNCTIONS:
        raise SelectionError(f"unknown score function {score_function!r}; use 'token' or 'gate'")
    path = Path(path)
    if path.is_dir():
        candidates = [path / SCORES_FILENAME, path / SUMMARY_FILENAME]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise SelectionError(f"{path} holds neither {SCORES_FILENAME} nor {SUMMARY_FILENAME}; run `esft profile` first")
        path = found
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SelectionError(f"cannot read scores {path}: {error}") from error
    if isinstance(data, dict) and "format" in data:
        scores = ExpertScores.from_json(data, where=str(path))
        return layer_score_dict(scores.layers, scores.scores(score_function, averaging))
    return _validated_summary(data, score_function, path)


def _validated_summary(data: dict, score_function: str, path: Path) -> dict[str, dict[str, float]]:
    key = f"{score_function}_scores"
    layers = data.get(key) if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ScoresError(f"{path}: no {key!r} in this summary; is it an ESFT summary.json?")
    expected = None
    for layer, by_expert in layers.items():
        ids = sorted(int(e) for e in by_expert) if isinstance(by_expert, dict) else None
        if not str(layer).isdigit() or not ids or ids != list(range(len(ids))):
            raise ScoresError(f"{path}: layer {layer!r} must map expert ids 0..E-1 to scores")
        expected = expected or len(ids)
        if len(ids) != expected:
            raise ScoresError(f"{path}: layer {layer} has {len(ids)} experts but other layers have {expected}")
        bad = next(((e, v) for e, v in by_expert.items() if not is_score_value(v)), None)
        if bad is not None:
            raise ScoresError(f"{path}: layer {layer}, expert {bad[0]} has score {bad[1]!r}; scores must be finite, "
                              "non-negative numbers (re-run esft profile, or fix the file)")
    return layers
