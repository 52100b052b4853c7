"""The paper's findings on the embedded model, by the protocol pre-registered in bench/README.md
("The fidelity protocol"): vanilla, FFT, LoRA, ESFT-Token, ESFT-Gate and three controls (Gate at
matched expert count, random experts, least relevant experts), each method's learning rate chosen
on validation from its own grid, 3 data seeds, 500 eval rows per task, forgetting measured on the
domains the vanilla model already solves, 95% paired-bootstrap confidence intervals.

    python bench/fidelity.py --out runs/fidelity               # the whole protocol (hours on 2 CPU cores; resumable)
    python bench/fidelity.py --out runs/fidelity --tasks math --seeds 0     # a subset
    python bench/fidelity.py --check                            # one cell again vs bench/results/fidelity.json

Every training run goes through the project's trainer (`esft train`: Ray Train + DeepSpeed, one
worker, fp32, ZeRO-0); evaluation runs in this process (greedy generation, the same decoding as
`esft eval`) so that every eval row's score is kept for the paired bootstrap. Each cell (task, seed,
method, learning rate, draw) writes `result.json` under --out and is skipped when rerun, so an
interrupted run continues where it stopped. Writes `fidelity.json` (`ratios`, `raw`, `config`),
`fidelity.md` and `tradeoff.png` into --out, and prints one JSON object last.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/profile.py shadows the standard library's `profile` module for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from esft.demo import synthetic  # noqa: E402
from esft.data import PROMPT_ASSISTANT, PROMPT_USER  # noqa: E402
from esft.io import atomic_write_text  # noqa: E402
from esft.metrics import CORPUS, PER_SAMPLE, clean_prediction, unit_scale  # noqa: E402
from esft.demo.pretrain import ASSET_DIR, MAX_NEW_TOKENS, domain_batches  # noqa: E402
from esft.report import selection_jaccard  # noqa: E402
from esft.scores import SCORES_FILENAME, ExpertScores  # noqa: E402
from esft.select import ExpertConfig, load_layer_scores, select_experts  # noqa: E402
from esft.training import mean_loss  # noqa: E402

log = logging.getLogger("esft")
RESULTS = Path(__file__).resolve().parent / "results"
ALIGNED = synthetic.PRETRAIN_TASKS  # what the vanilla model already solves: forgetting is measured there
# The pre-registered grids (bench/README.md). The controls use ESFT-Token's chosen rate.
GRID = {"fft": (3e-5, 1e-4, 3e-4), "lora": (3e-4, 1e-3, 3e-3), "esft_token": (1e-3, 3e-3, 1e-2), "esft_gate": (1e-3, 3e-3, 1e-2)}
CONTROLS = ("esft_gate_matched", "esft_random", "esft_least")
RANDOM_DRAWS = 3
SIZES = {"train": 2000, "valid": 200, "eval": 500, "aligned_eval": 200, "general_eval": 500}
BUDGET = {"steps": 200, "batch_size": 4, "seq_len": 256, "profile_tokens": 32768}
BOOTSTRAP = 10_000


@dataclass(frozen=True)
class Cell:
    task: str
    seed: int
    method: str  # vanilla, fft, lora, esft_token, esft_gate, or a control
    lr: float | None = None
    draw: int = 0  # random experts: which draw

    @property
    def name(self) -> str:
        lr = "" if self.lr is None else f"/lr{self.lr:g}"
        draw = f"-d{self.draw}" if self.method == "esft_random" else ""
        return f"{self.task}/s{self.seed}/{self.method}{draw}{lr}"


# ------------------------------------------------------------------------------ data and selections


def write_rows(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def task_data(out: Path, task: str, seed: int) -> dict[str, Path]:
    """Training rows of the seed; validation: the next training-split rows of the same stream whose
    prompts are not among them; the eval rows are the same for every seed."""
    root = out / "data" / task / f"s{seed}"
    if not (root / "valid.jsonl").exists():
        stream = synthetic.rows(task, SIZES["train"] + 4 * SIZES["valid"], seed=seed)
        train = stream[: SIZES["train"]]
        seen = {r["messages"][0]["content"] for r in train}
        valid = [r for r in stream[SIZES["train"]:] if r["messages"][0]["content"] not in seen][: SIZES["valid"]]
        write_rows(root / "train.jsonl", train)
        write_rows(root / "valid.jsonl", valid)
    return {"train": root / "train.jsonl", "valid": root / "valid.jsonl"}


def profile_dir(out: Path, task: str, seed: int, tokens: int = BUDGET["profile_tokens"], replicas: int = 1) -> Path:
    from pipeline.profile import ProfileConfig, run_profile

    target = out / "profiles" / task / f"s{seed}-t{tokens}-r{replicas}"
    if not (target / SCORES_FILENAME).exists():
        run_profile(ProfileConfig(model=str(ASSET_DIR), data=[str(task_data(out, task, seed)["train"])], out=str(target),
                                  n_sample_tokens=tokens, seq_len=BUDGET["seq_len"], batch_size=8, replicas=replicas,
                                  seed=seed, overwrite=True))
    return target


def expert_selection(out: Path, cell: Cell) -> ExpertConfig:
    scores_dir = profile_dir(out, cell.task, cell.seed)
    token = select_experts(load_layer_scores(scores_dir, "token"), top_p=0.2)
    counts = {layer: len(ids) for layer, ids in token.experts.items()}
    if cell.method == "esft_token":
        return token
    if cell.method == "esft_gate":
        return select_experts(load_layer_scores(scores_dir, "gate"), top_p=0.1)
    num_experts = ExpertScores.load(scores_dir / SCORES_FILENAME).num_experts
    if cell.method == "esft_random":  # from the experts ESFT-Token did not select, a stream per (task, seed, draw)
        rng = random.Random(f"random-experts:{cell.task}:{cell.seed}:{cell.draw}")
        return ExpertConfig({layer: sorted(rng.sample(sorted(set(range(num_experts)) - set(token.experts[layer])), n))
                             for layer, n in counts.items()})
    function = "gate" if cell.method == "esft_gate_matched" else "token"
    layer_scores = load_layer_scores(scores_dir, function)
    ranked = {layer: sorted(range(num_experts), key=lambda e: (-float(layer_scores[layer][str(e)]), e)) for layer in counts}
    if cell.method == "esft_gate_matched":
        return ExpertConfig({layer: sorted(ranked[layer][:n]) for layer, n in counts.items()})
    if cell.method == "esft_least":
        return ExpertConfig({layer: sorted(ranked[layer][-n:]) for layer, n in counts.items()})
    raise ValueError(f"no expert selection for method {cell.method!r}")


# ------------------------------------------------------------------------------ training and evaluation


def train(out: Path, cell: Cell, work: Path) -> tuple[dict, Path]:
    """One fine-tune through the project's trainer; returns its metrics and the exported weights."""
    from pipeline.train import EXPORT_DIR, TrainConfig, run_train

    method = "esft" if cell.method.startswith("esft") else cell.method
    expert_config = None
    if method == "esft":
        expert_config = expert_selection(out, cell).save(work / "expert_cfg.json")
    data = task_data(out, cell.task, cell.seed)
    shutil.rmtree(work / "train", ignore_errors=True)  # an interrupted attempt starts over
    metrics = run_train(TrainConfig(
        model=str(ASSET_DIR), data=str(data["train"]), eval_data=str(data["valid"]), out=str(work / "train"),
        expert_config=str(expert_config) if expert_config else None, method=method, workers=1, deepspeed="zero0",
        steps=BUDGET["steps"], batch_size=BUDGET["batch_size"], seq_len=BUDGET["seq_len"], lr=cell.lr,
        eval_every=BUDGET["steps"], save_every=BUDGET["steps"], eval_rows=SIZES["valid"], seed=cell.seed))
    return metrics, work / "train" / EXPORT_DIR[method]


def load_trained(method: str, export: Path | None):
    from transformers import AutoModelForCausalLM

    if method == "fft":
        return AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(ASSET_DIR, dtype=torch.float32)
    if method == "lora":
        from esft.lora import merge_lora

        return merge_lora(model, str(export))
    if method.startswith("esft"):
        from esft.adapter import load_adapter

        load_adapter(model, export)
    return model


def row_scores(task: str, predictions: list[str], answers: list[str]) -> list[float]:
    """The task metric of each eval row, in [0, 1] (corpus metrics on the one row: sentence-level)."""
    metric = synthetic.METRIC[task]
    cleaned = [clean_prediction(p) for p in predictions]
    if metric in PER_SAMPLE:
        return [float(PER_SAMPLE[metric](p, [a])) for p, a in zip(cleaned, answers)]
    return [unit_scale(metric, float(CORPUS[metric]([p], [[a]]))) for p, a in zip(cleaned, answers)]


def answer_rows(model, tokenizer, task: str, n: int) -> list[float]:
    rows = synthetic.rows(task, n, seed=0, split="eval")
    prompts = [PROMPT_USER.format(input=r["messages"][0]["content"].strip()) + PROMPT_ASSISTANT for r in rows]
    from esft.generation import generate_batch

    predictions = [p for i in range(0, len(prompts), 50)
                   for p in generate_batch(model, tokenizer, prompts[i : i + 50], MAX_NEW_TOKENS[task], ["\n\n", "User:"])]
    return row_scores(task, predictions, [r["messages"][1]["content"] for r in rows])


def evaluate(model, tokenizer, task: str) -> dict:
    """Per-row task metric on the task's eval rows, the aligned domains' metrics and the general loss."""
    model.eval()
    return {"task_rows": answer_rows(model, tokenizer, task, SIZES["eval"]),
            "aligned_rows": {d: answer_rows(model, tokenizer, d, SIZES["aligned_eval"]) for d in ALIGNED},
            "general_loss": mean_loss(model, domain_batches(tokenizer, synthetic.GENERAL, 0, SIZES["general_eval"], "eval"))}


def run_cell(out: Path, cell: Cell) -> dict:
    work = out / "cells" / cell.name
    result_file = work / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    from transformers import AutoTokenizer

    log.info("=== %s", cell.name)
    started = time.perf_counter()
    trained, export = ({}, None) if cell.method == "vanilla" else train(out, cell, work)
    evaluated = evaluate(load_trained(cell.method, export), AutoTokenizer.from_pretrained(ASSET_DIR), cell.task)
    result = {"cell": cell.name, "task": cell.task, "seed": cell.seed, "method": cell.method, "lr": cell.lr, "draw": cell.draw,
              "valid_loss": trained.get("final_valid_loss"), "trainable_parameters": trained.get("trainable_parameters"),
              "train_seconds": trained.get("wall_seconds"), "seconds": round(time.perf_counter() - started, 1),
              "task_metric": float(np.mean(evaluated["task_rows"])),
              "aligned_metric": float(np.mean([np.mean(v) for v in evaluated["aligned_rows"].values()])), **evaluated}
    shutil.rmtree(work / "train", ignore_errors=True)  # checkpoints and exports: the scores are what is kept
    atomic_write_text(result_file, json.dumps(result))
    return result


# ------------------------------------------------------------------------------ the protocol


def chosen_rates(out: Path, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per task and method, the grid's rate with the lowest validation answer loss on seed 0."""
    chosen: dict[str, dict[str, float]] = {}
    for task in tasks:
        chosen[task] = {}
        for method, grid in GRID.items():
            losses = {lr: run_cell(out, Cell(task, 0, method, lr))["valid_loss"] for lr in grid}
            # a diverged run (NaN or no loss) is never chosen
            finite = {lr: loss if loss is not None and np.isfinite(loss) else float("inf") for lr, loss in losses.items()}
            chosen[task][method] = min(grid, key=lambda lr: (finite[lr], lr))
    return chosen


def seed_cells(task: str, seed: int, rates: dict[str, float]) -> list[Cell]:
    token_lr = rates["esft_token"]
    return [Cell(task, seed, "vanilla"), *(Cell(task, seed, m, rates[m]) for m in GRID),
            Cell(task, seed, "esft_gate_matched", token_lr), Cell(task, seed, "esft_least", token_lr),
            *(Cell(task, seed, "esft_random", token_lr, draw) for draw in range(RANDOM_DRAWS))]


def prompt_clusters(task: str, n: int) -> list[int]:
    """Per eval row, the id of its prompt: the eval split repeats some prompts (e.g. 347 distinct among
    code's 500), and a model answers a repeated prompt identically, so repeats are one observation."""
    ids: dict[str, int] = {}
    return [ids.setdefault(r["messages"][0]["content"], len(ids)) for r in synthetic.rows(task, n, seed=0, split="eval")]


def bootstrap_diff(a: dict[tuple, list[float]], b: dict[tuple, list[float]], clusters: dict[str, list[int]] | None = None,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over (task, seed) strata of paired rows, and its 95% paired-bootstrap interval.
    Every seed scores the same eval rows, so a resample draws rows once per task and applies the draw
    to every seed (the per-row difference averaged over seeds); rows sharing a prompt (`clusters`:
    per task, a cluster id per row; default: every row its own) are drawn together. Tasks are averaged."""
    rng = np.random.default_rng(seed)
    means, samples = [], []
    for task in sorted({task for task, _ in a}):
        diff = np.mean([np.asarray(a[key]) - np.asarray(b[key]) for key in sorted(a) if key[0] == task], axis=0)
        cluster = np.asarray(clusters[task] if clusters else range(len(diff)))
        if len(cluster) != len(diff):
            raise ValueError(f"{task}: {len(cluster)} cluster ids for {len(diff)} rows")
        ids, inverse = np.unique(cluster, return_inverse=True)
        sums, sizes = np.bincount(inverse, weights=diff), np.bincount(inverse).astype(float)
        draws = rng.integers(0, len(ids), (BOOTSTRAP, len(ids)))
        means.append(diff.mean())
        samples.append(sums[draws].sum(axis=1) / sizes[draws].sum(axis=1))
    resampled = np.mean(samples, axis=0)
    return float(np.mean(means)), float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))


def per_method_rows(results: list[dict], method: str, field: str = "task_rows") -> dict[tuple, list[float]]:
    """Per (task, seed), the method's per-row scores (random experts: the mean over draws)."""
    rows: dict[tuple, list[np.ndarray]] = {}
    for r in results:
        if r["method"] == method:
            values = r[field] if field == "task_rows" else [np.mean(v) for v in zip(*r["aligned_rows"].values())]
            rows.setdefault((r["task"], r["seed"]), []).append(np.asarray(values, dtype=float))
    return {key: list(np.mean(v, axis=0)) for key, v in rows.items()}


def forgetting(results: list[dict], method: str) -> float:
    """Mean drop of the aligned domains' metric from vanilla (same task and seed)."""
    vanilla = {(r["task"], r["seed"]): r["aligned_metric"] for r in results if r["method"] == "vanilla"}
    drops = [vanilla[(r["task"], r["seed"])] - r["aligned_metric"] for r in results if r["method"] == method]
    return float(np.mean(drops))


def grid_point(results: list[dict], method: str, lr: float) -> tuple[float, float]:
    """(forgetting, task metric) of a method at one learning rate on seed 0, means over tasks."""
    cells = [r for r in results if r["seed"] == 0 and ((r["method"] == method and r["lr"] == lr) or r["method"] == "vanilla")]
    return forgetting(cells, method), float(np.mean([r["task_metric"] for r in cells if r["method"] == method]))


def matched_forgetting(grid_points: dict[str, list[tuple[float, float]]], level: float) -> dict[str, float | None]:
    """Each method's task metric interpolated at a given forgetting level along its learning-rate
    curve (None when the level is outside what its grid reached)."""
    matched = {}
    for method, points in grid_points.items():
        by_x: dict[float, list[float]] = {}
        for x, y in points:  # rates that forget equally (coarse aligned metrics): their mean metric
            by_x.setdefault(x, []).append(y)
        xs = sorted(by_x)
        ys = [float(np.mean(by_x[x])) for x in xs]
        matched[method] = float(np.interp(level, xs, ys)) if xs[0] <= level <= xs[-1] else None
    return matched


def stability(out: Path, tasks: list[str], seeds: list[int]) -> dict:
    """Jaccard of ESFT-Token's (layer, expert) selections across seeds, token budgets and replicas."""
    def token_sets(path: Path) -> list[set[int]]:
        config = select_experts(load_layer_scores(path, "token"), top_p=0.2)
        return [set(config.experts[layer]) for layer in sorted(config.experts, key=int)]

    result = {}
    for task in tasks:
        by_seed = [token_sets(profile_dir(out, task, s)) for s in seeds]
        by_budget = [token_sets(profile_dir(out, task, 0, tokens)) for tokens in (8192, 32768, 131072)]
        by_replicas = [token_sets(profile_dir(out, task, 0, replicas=r)) for r in (1, 2)]
        result[task] = {name: round(float(np.mean([selection_jaccard(a, b)
                                                   for i, a in enumerate(group) for b in group[i + 1 :]])), 4)
                        for name, group in (("seeds", by_seed), ("token_budgets", by_budget), ("replicas", by_replicas))
                        if len(group) > 1}
        # the largest budget can exceed what the 2,000 training rows hold: the tokens each profile really saw
        result[task]["token_budgets_used"] = [ExpertScores.load(profile_dir(out, task, 0, tokens) / SCORES_FILENAME).total_tokens
                                              for tokens in (8192, 32768, 131072)]
    return result


def summarise(results: list[dict], rates: dict, tasks: list[str], seeds: list[int], out: Path) -> dict:
    final = [r for r in results if r["seed"] in seeds and (r["method"] == "vanilla" or r["lr"] == rates[r["task"]].get(
        r["method"], rates[r["task"]]["esft_token"]))]
    methods = ["vanilla", *GRID, *CONTROLS]
    metric = {m: float(np.mean([r["task_metric"] for r in final if r["method"] == m])) for m in methods}
    forget = {m: forgetting(final, m) for m in methods if m != "vanilla"}
    general = {m: float(np.mean([r["general_loss"] for r in final if r["method"] == m])) for m in methods}
    clusters = {task: prompt_clusters(task, SIZES["eval"]) for task in tasks}
    intervals = {f"{a}_minus_{b}": bootstrap_diff(per_method_rows(final, a), per_method_rows(final, b), clusters)
                 for a, b in (("esft_token", "fft"), ("esft_token", "lora"), ("esft_token", "esft_random"),
                              ("esft_token", "esft_least"), ("esft_gate", "fft"), ("esft_gate", "lora"),
                              ("esft_gate_matched", "esft_token"), ("esft_gate", "esft_gate_matched"))}
    # forgetting: the aligned domains' per-row metric (row i: the mean of the three domains' row i);
    # positive = ESFT-Token keeps more of what the vanilla model solved than FFT does
    intervals["aligned_esft_token_minus_fft"] = bootstrap_diff(per_method_rows(final, "esft_token", "aligned_rows"),
                                                               per_method_rows(final, "fft", "aligned_rows"))
    grid_points = {m: [grid_point(results, m, lr) for lr in GRID[m]] for m in GRID}
    # compared at ESFT-Token's chosen point on the curves' own seed (0)
    matched = matched_forgetting(grid_points, forgetting([r for r in final if r["seed"] == 0], "esft_token"))

    def over(a: float, b: float) -> float | None:
        return round(a / b, 3) if b > 0 else None  # None (JSON null): the reference did not move (or improved)

    ratios = {
        "task_metric_esft_token_over_fft": over(metric["esft_token"], metric["fft"]),
        "task_metric_esft_gate_over_fft": over(metric["esft_gate"], metric["fft"]),
        "task_metric_esft_token_over_lora": over(metric["esft_token"], metric["lora"]),
        "task_metric_esft_gate_over_lora": over(metric["esft_gate"], metric["lora"]),
        "forgetting_esft_token_over_fft": over(forget["esft_token"], forget["fft"]),
        "forgetting_esft_gate_over_fft": over(forget["esft_gate"], forget["fft"]),
        "relevant_minus_random_ci_low": round(intervals["esft_token_minus_esft_random"][1], 4),
        "relevant_minus_least_ci_low": round(intervals["esft_token_minus_esft_least"][1], 4),
    }
    save_tradeoff_plot(grid_points, out / "tradeoff.png")
    return {"ratios": ratios,
            "raw": {"task_metric": metric, "forgetting_aligned_drop": forget, "general_loss": general, "chosen_lr": rates,
                    "ci95": {k: [round(v, 4) for v in t] for k, t in intervals.items()}, "tradeoff_seed0": grid_points,
                    "at_esft_token_forgetting": matched, "stability_jaccard": stability(out, tasks, seeds),
                    # per cell, its task rows too (rounded): --check pairs a re-run with them row by row
                    "cells": [{**{k: v for k, v in r.items() if k not in ("task_rows", "aligned_rows")},
                               "task_rows": [round(x, 4) for x in r["task_rows"]]} for r in results]},
            "config": {"model": str(ASSET_DIR), "tasks": tasks, "seeds": seeds, "grid": GRID, "sizes": SIZES, "budget": BUDGET,
                       "random_draws": RANDOM_DRAWS, "bootstrap": BOOTSTRAP}}


def save_tradeoff_plot(grid_points: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, points in grid_points.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=method)
        for (x, y), lr in zip(points, GRID[method]):
            ax.annotate(f"{lr:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("forgetting: drop of the aligned domains' metric from vanilla")
    ax.set_ylabel("task metric (mean over tasks)")
    ax.set_title("Task vs forgetting across each method's learning rates (seed 0)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: dict) -> str:
    raw = summary["raw"]
    lines = ["# ESFT fidelity (the pre-registered protocol)", "",
             "| method | task metric | forgetting (aligned drop) | general loss | learning rate per task |",
             "|---|---|---|---|---|"]
    for method, value in raw["task_metric"].items():
        rates = {t: r.get(method, r["esft_token"]) for t, r in raw["chosen_lr"].items()} if method != "vanilla" else {}
        lines.append(f"| {method} | {value:.3f} | {raw['forgetting_aligned_drop'].get(method, 0.0):+.3f} | "
                     f"{raw['general_loss'][method]:.3f} | {', '.join(f'{t} {lr:g}' for t, lr in rates.items()) or '-'} |")
    lines += ["", "Task metric: math numeric accuracy, code exact match, translation chrF / 100 per row (mean of sentence-level "
              "chrF); forgetting: drop from vanilla of the mean metric of intent, law and summary.",
              "", "| difference | mean | 95% CI (paired bootstrap) |", "|---|---|---|"]
    lines += [f"| {k}{'' if k.startswith('aligned') else ' (task metric)'} | {v[0]:+.4f} | [{v[1]:+.4f}, {v[2]:+.4f}] |"
              for k, v in raw["ci95"].items()]
    lines += ["", "At ESFT-Token's forgetting level on seed 0 (interpolated along each learning-rate curve; '-': the "
              "method's grid never forgot that little, or never that much): "
              + ", ".join(f"{m} {'-' if v is None else f'{v:.3f}'}" for m, v in raw["at_esft_token_forgetting"].items()),
              "", "Selection stability (Jaccard of ESFT-Token's selections): "
              + "; ".join(f"{t}: {v}" for t, v in raw["stability_jaccard"].items()), "",
              "![trade-off](tradeoff.png)", "", "```json", json.dumps(summary["ratios"]), "```"]
    return "\n".join(lines) + "\n"


def check(committed: Path) -> dict:
    """One cell again (math, seed 0: vanilla, FFT and ESFT-Token at the committed rates) in a fresh
    directory; within_ci: for each, the 95% paired-bootstrap interval of (re-run - committed) task
    metric over the same eval rows contains 0."""
    summary = json.loads(committed.read_text())
    rates = summary["raw"]["chosen_lr"]["math"]
    cells = {c["cell"]: c for c in summary["raw"]["cells"]}
    clusters = {"math": prompt_clusters("math", SIZES["eval"])}
    diffs, inside = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in (Cell("math", 0, "vanilla"), Cell("math", 0, "fft", rates["fft"]),
                     Cell("math", 0, "esft_token", rates["esft_token"])):
            new, old = run_cell(Path(tmp), cell), cells[cell.name]
            mean, low, high = bootstrap_diff({("math", 0): new["task_rows"]}, {("math", 0): old["task_rows"]}, clusters)
            diffs.append(abs(mean))
            inside.append(low <= 0.0 <= high)
    return {"within_ci": all(inside), "max_abs_diff": round(max(diffs), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(synthetic.HELD_OUT_TASKS), choices=synthetic.HELD_OUT_TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/fidelity")
    parser.add_argument("--check", action="store_true", help="re-run one cell against bench/results/fidelity.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (ASSET_DIR / "model.safetensors").exists():
        print(f"the embedded model is missing at {ASSET_DIR}; build it with `esft pretrain`", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps({"check": check(RESULTS / "fidelity.json")}))
        return 0
    out = Path(args.out).resolve()
    started = time.perf_counter()
    rates = chosen_rates(out, args.tasks)
    results = ([run_cell(out, cell) for seed in args.seeds for task in args.tasks for cell in seed_cells(task, seed, rates[task])]
               + [run_cell(out, Cell(t, 0, m, lr)) for t in args.tasks for m in GRID for lr in GRID[m]])
    unique = list({r["cell"]: r for r in results}.values())
    summary = summarise(unique, rates, args.tasks, args.seeds, out)
    summary["config"]["seconds"] = round(time.perf_counter() - started)
    atomic_write_text(out / "fidelity.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "fidelity.md", markdown(summary))
    print(markdown(summary))
    print(json.dumps({k: summary[k] for k in ("ratios", "config")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
