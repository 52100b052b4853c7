"""The stages of ESFT after profiling, as `esft run` and every `esft tune` trial both call them:
select the experts, train them (one resumption rule), evaluate.

`esft run` caches each stage's result by a key of its inputs (pipeline/run.py); a sweep trial keys
its whole work directory by the selection and training settings (pipeline/tune.py). Training is
where work is lost when a process dies, so it resumes by one rule wherever it runs: a run started
with the same inputs continues from its last checkpoint; one started with other inputs is stale
and starts over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from esft.io import atomic_write_text


def select(profile_dir: Path, score_function: str, top_p: float | None = None, experts_per_layer: int | None = None,
           shared_experts: bool = False):
    """The expert config from a profile: ESFT's cumulative top-p rule, or a fixed number of experts
    per layer, over the token or gate scores."""
    from esft.select import load_layer_scores, select_experts

    return select_experts(load_layer_scores(profile_dir, score_function), top_p=top_p,
                          experts_per_layer=experts_per_layer, shared_experts=shared_experts)


def started_marker(out: Path) -> Path:
    """Where a training run records the inputs it was started with (beside its --out)."""
    return out.parent / f"{out.name}.started"


def train(train_cfg, key: str, callbacks: list | None = None) -> dict:
    """`run_train(train_cfg)` under the resumption rule: when training into `train_cfg.out` was
    started earlier with the same inputs (`key`), it continues from its last checkpoint (or, when it
    finished, its metrics are returned as they are); when it was started with other inputs (another
    selection, other settings), that run is removed and training starts over. Returns run_train's
    metrics."""
    from pipeline.train import run_train

    out = Path(train_cfg.out)
    marker = started_marker(out)
    same = marker.exists() and marker.read_text() == key
    if same and (out / "metrics.json").exists():  # written last, once the export is in place
        return json.loads((out / "metrics.json").read_text())
    if not same and out.exists():
        shutil.rmtree(out)
    train_cfg.resume = same and (out / "ray").exists()
    atomic_write_text(marker, key)
    return run_train(train_cfg, callbacks=callbacks)


def evaluate(eval_cfg) -> dict:
    """`run_eval(eval_cfg)`'s numbers (task metrics, general-domain loss, counts)."""
    from pipeline.evaluate import run_eval

    return {k: v for k, v in run_eval(eval_cfg).items() if isinstance(v, (int, float))}
