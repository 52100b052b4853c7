"""A sweep's outcome: one summary row per trial of every driver life (from the journal,
pipeline/sweep_journal.py), the best finished trial, its adapter logged and registered in MLflow,
and the markdown table `esft tune` prints and writes to sweep_summary.md."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from pipeline.sweep_config import SweepConfig


def _describe(selection: dict) -> str:
    return f"p={selection['top_p']:.4g}" if "top_p" in selection else f"n={selection['experts_per_layer']}"


def _status(entry: dict) -> str:
    values = entry["result"]
    if entry["status"] == "failed":
        return "failed: " + (entry.get("error") or "unknown error")[:80]
    if entry["status"] == "running":
        return "interrupted"
    if not values.get("evaluated"):
        return f"stopped early at step {values.get('step')}" if values.get("step") else "stopped early"
    return f"same selection as {values['duplicate_of']}" if values.get("duplicate_of") else "trained"


def summary_rows(entries: list[dict], metric: str) -> list[dict]:
    """One row per journal entry (pipeline.sweep_journal): every trial of every driver life of the sweep."""
    rows = []
    for entry in entries:
        config, values = entry["config"], entry["result"]
        rows.append({
            "trial": entry["trial_id"], "score_function": config["selection"]["score_function"],
            "setting": _describe(config["selection"]), "selection": config["selection"], "lr": config.get("lr"),
            "shared": config.get("train_shared_experts"), "experts": values.get("selected_experts"),
            "metric": values.get(metric) if values.get("evaluated") else None,
            "objective": values.get("objective"), "general_loss": values.get("general_loss"),
            "valid_loss": values.get("valid_loss"), "status": _status(entry),
            "work_dir": values.get("work_dir"), "trial_id": entry["trial_id"],
        })
    return rows


def summary_markdown(rows: list[dict], metric: str, registered: dict | None) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)

    lines = [f"| trial | score fn | setting | lr | shared | experts | {metric} | "
             "objective | general loss | valid loss | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['score_function']} | {r['setting']} | {cell(r['lr']) or 'default'} | {cell(r['shared'])} | "
              f"{cell(r['experts'])} | {cell(r['metric'])} | {cell(r['objective'])} | {cell(r['general_loss'])} | "
              f"{cell(r['valid_loss'])} | {r['status']} |" for r in rows]
    if registered:
        lines += ["", (f"Registered: `models:/{registered['name']}/{registered['version']}` (champion alias "
                      f"{'moved to it' if registered['champion'] else 'kept on the better earlier version'}); "
                      f"tracking URI `{registered['tracking_uri']}`")]
    return "\n".join(lines) + "\n"


def best_trial(rows: list[dict], mode: str) -> dict | None:
    """The best evaluated trial (early-stopped and failed ones never qualify)."""
    finished = [r for r in rows if r["objective"] is not None and math.isfinite(r["objective"])
                and (r["status"] == "trained" or r["status"].startswith("same selection"))]
    if not finished:
        return None
    sign = -1 if mode == "max" else 1
    return min(finished, key=lambda r: (sign * r["objective"], r["experts"] or 0))  # ties: fewer experts


def register_best(best: dict, tracker, config: SweepConfig, metric: str, mode: str, base_model: str, task: str,
                   tokenizer: str | None) -> dict:
    """The best trial's adapter, logged as an MLflow Model of its trial run and registered."""
    from esft.adapter import adapter_summary
    from pipeline.register import ModelLogging, log_models, mlflow_client, register_version

    trained_by = json.loads((Path(best["work_dir"]) / "result.json").read_text())["trained_by"]
    run_id = tracker.trial_run_id(trained_by)
    client = mlflow_client(tracker.tracking_uri)
    adapter = Path(best["work_dir"]) / "train" / "adapter"
    model_id, model_tags = log_models(client, run_id, adapter, base_model, tokenizer, ModelLogging.from_settings(config.register),
                                      config.trust_remote_code)
    tags = {"base_model": base_model, "family": adapter_summary(adapter)["family"], "task": task,
            "score_function": best["score_function"], "selection": best["setting"],
            "top_p": str(best["selection"].get("top_p")), "selected_experts": str(best["experts"]),
            "sweep": config.name, **model_tags}
    registration = register_version(client, config.register.get("model_name") or config.name, model_id, run_id, metric,
                                    float(best["metric"]), tags, tracker.tracking_uri, higher_is_better=mode == "max")
    return asdict(registration)
