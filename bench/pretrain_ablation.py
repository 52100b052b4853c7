"""The routing knobs of mini-moe's pretraining, side by side: balance-loss coefficient and scope
(batch vs sequence), each a shorter run of the same recipe on the same data, measured by the
same gates as the shipped model (esft.demo.pretrain.measure_specialisation).

    python bench/pretrain_ablation.py --preset mini-moe --steps 400 --out runs/pretrain_ablation

Writes one model directory per variant under --out and bench/results/pretrain_ablation.json, whose
rows go into the model card (`--card esft/demo/assets/mini-moe`, or `esft pretrain --ablation FILE`).
`--from-report DIR ...` adds the rows of full `esft pretrain` runs instead (their final weights and
every step measured along the way), without training anything. Prints one JSON object last.
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

from esft.demo.pretrain import EXTRA_RAW_TEXT, GATES, PRESETS, pretrain, refresh_model_card  # noqa: E402

VARIANTS = (("batch", 0.0001), ("batch", 0.001), ("batch", 0.01), ("sequence", 0.001))
RESULTS = Path(__file__).resolve().parent / "results" / "pretrain_ablation.json"


def _architecture_knobs(recipe: dict) -> tuple:
    """The router and attention knobs, with the defaults of rows written before they existed."""
    return (recipe.get("architecture", "deepseek_v2"), recipe.get("bias_update_rate", 0.0),
            recipe.get("attention_heads", 4), recipe.get("kv_lora_rank", 32), recipe.get("expert_groups", 1),
            recipe.get("groups_per_token", 1))


def row_key(row: dict) -> tuple:
    recipe = row["recipe"]
    return (*_architecture_knobs(recipe), recipe["balance_scope"],
            recipe.get("balance_window") if recipe["balance_scope"] == "global" else None,
            recipe["balance_loss_coef"], recipe.get("balance_decay_start", 1.0), recipe["steps"], row.get("data_tokens"))


def variant_name(row: dict) -> str:
    """A row's knobs in one unique name, e.g. batch-0.005-decay0.5-phrasebook+digest-600of2400, or
    v3-bias0.001-kv64-batch-0.0-phrasebook+digest-2400."""
    recipe = row["recipe"]
    architecture, rate, heads, latent, groups, per_token = _architecture_knobs(recipe)
    parts = ["v3"] if architecture == "deepseek_v3" else []
    parts += [f"groups{per_token}of{groups}"] if groups > 1 else []
    parts += [f"bias{rate}"] if rate else []
    parts += [f"heads{heads}"] if heads != 4 else []
    parts += [f"kv{latent}"] if latent != 32 else []
    parts += [recipe["balance_scope"], str(recipe["balance_loss_coef"])]
    if recipe.get("balance_decay_start", 1.0) < 1:
        parts.append(f"decay{recipe['balance_decay_start']}")
    extra = "+".join(name for key, name in EXTRA_RAW_TEXT if recipe.get(key))
    parts += [extra] if extra else []
    length = row.get("of_steps", recipe["steps"])
    parts.append(f"{recipe['steps']}" if length == recipe["steps"] else f"{recipe['steps']}of{length}")
    return "-".join(parts)


def merge_rows(rows: list[dict], new: list[dict]) -> list[dict]:
    """`rows` with `new` added, replacing rows of the same variant, length and data."""
    keys = {row_key(row) for row in new}
    return [row for row in rows if row_key(row) not in keys] + new


def report_rows(report: dict) -> list[dict]:
    """Rows of one full pretraining run: each step measured along the way (figures and losses at that
    step of the same run, whose learning-rate schedule is the full run's), then the final weights."""
    spec = report["specialisation"]
    final = {"step": report["recipe"]["steps"], "figures": spec["figures"], "answer_loss": spec["answer_loss"]}
    rows = []
    for measured in [*report.get("measured_at", []), final]:
        rows.append({"recipe": {**report["recipe"], "steps": measured["step"]}, "data_tokens": report["data"]["tokens"],
                     "of_steps": report["recipe"]["steps"], "figures": measured["figures"],
                     "answer_loss": measured["answer_loss"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini-moe", help="the recipe whose knobs are varied")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/pretrain_ablation")
    parser.add_argument("--only", nargs="*", help="variants as scope:coef, e.g. batch:0.001")
    parser.add_argument("--from-report", nargs="*", default=[], metavar="DIR",
                        help="model directories of full `esft pretrain` runs: tabulate their pretrain_report.json "
                             "instead of training")
    parser.add_argument("--card", help="afterwards, rewrite this model directory's card with the ablation table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = [(s, float(c)) for s, c in (v.split(":") for v in args.only)] if args.only else VARIANTS
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for directory in args.from_report:
        report = json.loads((Path(directory) / "pretrain_report.json").read_text())
        rows = merge_rows(rows, report_rows(report))
    for scope, coef in [] if args.from_report else variants:
        recipe = replace(PRESETS[args.preset], steps=args.steps, balance_scope=scope, balance_loss_coef=coef, log_every=10,
                         measure_at=())
        report = pretrain(recipe, Path(args.out) / f"{scope}-{coef}", overwrite=True)
        spec = report["specialisation"]
        row = {"recipe": report["recipe"], "data_tokens": report["data"]["tokens"], "seconds": report["seconds"],
               "figures": spec["figures"], "answer_loss": spec["answer_loss"], "task_metric": spec.get("task_metric", {}),
               "gates_passed": sum(g["passed"] for g in spec["gates"]), "gates": len(spec["gates"])}
        rows = merge_rows(rows, [row])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1))
    if args.card:
        refresh_model_card(Path(args.card), rows)
    summary = {variant_name(r): {key: r["figures"][key] for _, key, *_ in GATES} for r in rows}
    print(json.dumps({"ratios": {f"{name}:{key}": value for name, figures in summary.items() for key, value in figures.items()},
                      "raw": rows, "config": {"steps": args.steps, "variants": [f"{s}:{c}" for s, c in variants]}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
