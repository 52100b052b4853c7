"""The routing knobs of mini-moe's pretraining, side by side: balance-loss coefficient and scope
(batch vs sequence), each a shorter run of the same recipe on the same data, measured by the
same gates as the shipped model (esft.pretrain.measure_specialisation).

    python bench/pretrain_ablation.py --preset mini-moe --steps 400 --out runs/pretrain_ablation

Writes one model directory per variant under --out and bench/results/pretrain_ablation.json, whose
rows go into the model card (`--card esft/assets/mini-moe`, or `esft pretrain --ablation FILE`).
Prints one JSON object last.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/profile.py shadows the standard library's `profile` module for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from dataclasses import replace  # noqa: E402

from esft.pretrain import GATES, PRESETS, pretrain, refresh_model_card  # noqa: E402

VARIANTS = (("batch", 0.0001), ("batch", 0.001), ("batch", 0.01), ("sequence", 0.001))
RESULTS = Path(__file__).resolve().parent / "results" / "pretrain_ablation.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini-moe", help="the recipe whose knobs are varied")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/pretrain_ablation")
    parser.add_argument("--only", nargs="*", help="variants as scope:coef, e.g. batch:0.001")
    parser.add_argument("--card", help="afterwards, rewrite this model directory's card with the ablation table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = [(s, float(c)) for s, c in (v.split(":") for v in args.only)] if args.only else VARIANTS
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for scope, coef in variants:
        recipe = replace(PRESETS[args.preset], steps=args.steps, balance_scope=scope, balance_loss_coef=coef, log_every=10,
                         measure_at=())
        report = pretrain(recipe, Path(args.out) / f"{scope}-{coef}", overwrite=True)
        spec = report["specialisation"]
        row = {"recipe": report["recipe"], "seconds": report["seconds"], "figures": spec["figures"],
               "answer_loss": spec["answer_loss"], "task_metric": spec.get("task_metric", {}),
               "gates_passed": sum(g["passed"] for g in spec["gates"]), "gates": len(spec["gates"])}
        rows = [r for r in rows if (r["recipe"]["balance_scope"], r["recipe"]["balance_loss_coef"], r["recipe"]["steps"])
                != (scope, coef, args.steps)] + [row]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(rows, indent=1))
    if args.card:
        refresh_model_card(Path(args.card), rows)
    summary = {f"{r['recipe']['balance_scope']}-{r['recipe']['balance_loss_coef']}-{r['recipe']['steps']}":
               {key: r["figures"][key] for _, key, *_ in GATES} for r in rows}
    print(json.dumps({"ratios": {f"{name}:{key}": value for name, figures in summary.items() for key, value in figures.items()},
                      "raw": rows, "config": {"steps": args.steps, "variants": [f"{s}:{c}" for s, c in variants]}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
