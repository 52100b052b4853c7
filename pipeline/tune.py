"""Ray Tune sweeps over expert selection, tracked in MLflow, the best adapter registered:

    esft tune --config configs/sweep.yaml

profile once (cached by a hash of the model files, the data bytes and the profiling settings) -> one Tune trial
per point of the search space: select (cheap) -> train (a Ray Train run inside the trial) ->
evaluate -> report. A trial whose selection (and training settings) equals an earlier trial's
reuses that result instead of retraining. The driver logs a parent MLflow run and one nested run
per trial, registers the best trial's adapter as a new version of the registered model (the
`champion` alias moves only if it beats the current champion) and prints a summary table.

Rerunning the same command after the driver died restores the sweep with Tune: finished trials
are kept, unfinished ones run again (their training resumes from its last checkpoint).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from esft.io import atomic_write_text
from pipeline.config import ConfigError, build_config

log = logging.getLogger("esft")
EXPERIMENT = "tune"  # Tune's experiment directory name under <run_dir>/ray


@dataclass
class SearchSpace:
    """A grid: every selection below x every lr x every train_shared_experts value. The default
    top-p values span the useful ranges (token scores are shares of routing slots, gate scores
    absolute gate mass, so gate needs smaller p)."""

    token_top_p: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    gate_top_p: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])
    experts_per_layer: list[int] = field(default_factory=list)  # the fixed-budget alternative
    budget_score_functions: list[str] = field(default_factory=lambda: ["token"])  # ranks experts for the budget
    lr: list[float] = field(default_factory=list)  # empty: the train section's learning rate
    train_shared_experts: list[bool] = field(default_factory=lambda: [False])

    def selections(self) -> list[dict]:
        points = [{"score_function": "token", "top_p": p} for p in self.token_top_p]
        points += [{"score_function": "gate", "top_p": p} for p in self.gate_top_p]
        points += [{"score_function": f, "experts_per_layer": n} for f in self.budget_score_functions for n in self.experts_per_layer]
        return points

    def validate(self) -> None:
        from esft.select import check_top_p

        for p in self.token_top_p + self.gate_top_p:
            check_top_p(p)
        if any(not isinstance(n, int) or n < 1 for n in self.experts_per_layer):
            raise ConfigError("tune: search.experts_per_layer must hold positive integers")
        if any(f not in ("token", "gate") for f in self.budget_score_functions):
            raise ConfigError("tune: search.budget_score_functions must be token and/or gate")
        if any(not (isinstance(lr, (int, float)) and lr > 0) for lr in self.lr):
            raise ConfigError("tune: search.lr values must be positive numbers")
        if not self.selections():
            raise ConfigError("tune: the search space is empty; give token_top_p, gate_top_p or experts_per_layer values")


@dataclass
class SweepConfig:
    name: str = "esft-sweep"  # also the registered model's name unless register.model_name is given
    run_dir: str = "runs/sweep"
    model: str = "embedded"
    train_data: str | None = None
    eval_data: str | None = None
    general_data: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    profile: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)  # metric, mode (max|min), general_loss_weight
    max_concurrent_trials: int = 1
    register: dict = field(default_factory=dict)  # model_name, tracking_uri, enabled, log_base_model, log_merged

    def space(self) -> SearchSpace:
        return build_config(SearchSpace, self.search, {}, where="tune: search")

    def pipeline(self):
        from pipeline.run import PipelineConfig

        shared = {k: getattr(self, k) for k in ("name", "run_dir", "model", "train_data", "eval_data", "general_data",
                                                "tokenizer", "trust_remote_code", "profile", "train", "eval")}
        return PipelineConfig(**shared)

    def objective_spec(self, eval_metrics: list[str]) -> tuple[str, str, float]:
        """(metric, mode, general_loss_weight): the first eval metric by default, else validation loss."""
        metric = self.objective.get("metric") or (eval_metrics[0] if eval_metrics else "valid_loss")
        mode = self.objective.get("mode") or ("min" if metric.endswith("loss") else "max")
        if mode not in ("max", "min"):
            raise ConfigError("tune: objective.mode must be max or min")
        return metric, mode, float(self.objective.get("general_loss_weight", 0.0))

    def validate(self) -> None:
        self.pipeline().validate()
        unknown = set(self.objective) - {"metric", "mode", "general_loss_weight"}
        if unknown:
            raise ConfigError(f"tune: unknown objective setting(s) {', '.join(sorted(unknown))}; known: metric, mode, general_loss_weight")
        self.space().validate()
        if int(self.max_concurrent_trials) < 1:
            raise ConfigError("tune: max_concurrent_trials must be a positive integer")
        from pipeline.register import check_register_settings

        check_register_settings(self.register, {"model_name", "tracking_uri", "enabled"}, where="tune")


def _hash(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_hash(spec: str | None) -> str | None:
    """Hash of a local data file's or directory's bytes (a hub dataset hashes as its name)."""
    if spec is None:
        return None
    path = Path(spec)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        digest.update(spec.encode())
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_fingerprint(spec: str) -> str:
    """A model directory's identity without reading its weights (tens of GB for real models): the
    config's bytes and each file's name, size and modification time. A hub id is its name."""
    path = Path(spec)
    if not path.is_dir():
        return spec
    digest = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_profile(profile_cfg, run: Path) -> Path:
    """Profile once per (model, data, profiling settings): the result lives under a directory
    named by their hash and is reused by every trial and every later sweep."""
    from pipeline.profile import run_profile

    settings = {k: v for k, v in asdict(profile_cfg).items() if k not in ("out", "overwrite")}
    key = _hash({**settings, "model": model_fingerprint(profile_cfg.model), "data": [content_hash(d) for d in profile_cfg.data]})
    target = run / "profiles" / key
    if (target / "expert_scores.json").exists():
        log.info("tune: profile %s cached (same model, data and settings), not recomputed", key)
        return target
    profile_cfg.out, profile_cfg.overwrite = str(target), True
    run_profile(profile_cfg)
    return target


# ------------------------------------------------------------------------------ one trial


@contextmanager
def _claimed(lock_path: Path):
    """Exclusive ownership of one selection's work directory (concurrent trials with the same
    selection wait for the first instead of training it twice)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def select_for_trial(profile_dir: Path, selection: dict, train_shared_experts: bool):
    from esft.select import load_layer_scores, select_experts

    return select_experts(load_layer_scores(profile_dir, selection["score_function"]), top_p=selection.get("top_p"),
                          experts_per_layer=selection.get("experts_per_layer"), shared_experts=train_shared_experts)


def objective_value(metrics: dict, metric: str, mode: str, general_loss_weight: float) -> float:
    """The number Tune ranks trials by: the metric, minus (max) or plus (min) the weighted general loss."""
    value = float(metrics[metric])
    if general_loss_weight:
        penalty = general_loss_weight * float(metrics.get("general_loss", 0.0))
        value = value - penalty if mode == "max" else value + penalty
    return value


def _train_and_evaluate(work: Path, expert_config, selection: dict, setup: dict, lr: float | None) -> dict:
    from esft.report import save_selection_plot
    from pipeline.evaluate import EvalConfig, run_eval
    from pipeline.train import TrainConfig, run_train

    expert_config.save(work / "expert_cfg.json")
    save_selection_plot(expert_config, setup["num_experts"], work / "selection.png")
    shutil.copyfile(Path(setup["profile_dir"]) / f"heatmap_{selection['score_function']}.png", work / "heatmap.png")
    train_cfg = TrainConfig(**{**setup["train"], "out": str(work / "train"), "expert_config": str(work / "expert_cfg.json")})
    if lr is not None:
        train_cfg.lr = lr
    train_cfg.eval_every = min(train_cfg.eval_every, train_cfg.steps)
    # An interrupted earlier attempt of this same selection continues from its checkpoint.
    checkpoints = list((work / "train" / "ray" / "train").glob("checkpoint_*"))
    train_cfg.resume = bool(checkpoints) and not (work / "train" / "metrics.json").exists()
    if (work / "train").exists() and not train_cfg.resume:
        shutil.rmtree(work / "train")
    trained = run_train(train_cfg)
    eval_cfg = EvalConfig(**{**setup["eval"], "adapter": str(work / "train" / "adapter"), "out": str(work / "eval" / "metrics.json")})
    evaluated = run_eval(eval_cfg)
    return {
        **{k: v for k, v in evaluated.items() if isinstance(v, (int, float))},
        "valid_loss": trained.get("final_valid_loss"),
        "general_loss_during_training": trained.get("final_general_loss"),
        "trainable_parameters": trained["trainable_parameters"],
        "tokens_per_second": trained["tokens_per_second"],
        "train_seconds": trained["wall_seconds"],
    }


def run_trial(params: dict, setup: dict) -> None:
    """One Tune trial: select -> train -> evaluate, or reuse an identical earlier selection's result."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    run = Path(setup["run_dir"])
    expert_config = select_for_trial(Path(setup["profile_dir"]), params["selection"], params["train_shared_experts"])
    experts = {layer: sorted(ids) for layer, ids in expert_config.experts.items()}  # order does not change training
    key = _hash({"experts": experts, "shared": expert_config.shared_experts, "lr": params["lr"], "train": setup["train"]})
    work = run / "trials" / key
    with _claimed(run / "trials" / f"{key}.lock"):
        result_file = work / "result.json"
        if result_file.exists():
            result = json.loads(result_file.read_text())
            log.info("trial %s: same selection as trial %s, not retrained", trial_id, result["trained_by"])
        else:
            result = {"trained_by": trial_id, "work_dir": str(work), "selected_experts": expert_config.num_selected,
                      **_train_and_evaluate(work, expert_config, params["selection"], setup, params["lr"])}
            atomic_write_text(result_file, json.dumps(result, indent=1))
    metric, mode, weight = setup["objective"]
    report = {**result, "objective": objective_value(result, metric, mode, weight),
              "duplicate_of": result["trained_by"] if result["trained_by"] != trial_id else ""}
    ray.tune.report(report)


# ------------------------------------------------------------------------------ the sweep


def _param_space(space: SearchSpace) -> dict:
    from ray import tune

    return {"selection": tune.grid_search(space.selections()),
            "lr": tune.grid_search(space.lr or [None]),
            "train_shared_experts": tune.grid_search(space.train_shared_experts)}


def _describe(selection: dict) -> str:
    return f"p={selection['top_p']}" if "top_p" in selection else f"n={selection['experts_per_layer']}"


def summary_rows(results, metric: str) -> list[dict]:
    rows = []
    for result in results:
        config, values = result.config, result.metrics or {}
        rows.append({
            "trial": values.get("trial_id") or Path(result.path).name, "score_function": config["selection"]["score_function"],
            "setting": _describe(config["selection"]), "lr": config.get("lr"), "shared": config.get("train_shared_experts"),
            "experts": values.get("selected_experts"), "metric": values.get(metric), "objective": values.get("objective"),
            "general_loss": values.get("general_loss"), "valid_loss": values.get("valid_loss"),
            "status": "failed: " + str(result.error).strip().splitlines()[-1][:80] if result.error
            else (f"same selection as {values['duplicate_of']}" if values.get("duplicate_of") else "trained"),
            "work_dir": values.get("work_dir"), "trial_id": values.get("trial_id"),
        })
    return rows


def summary_markdown(rows: list[dict], metric: str, registered: dict | None) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)

    lines = [f"| trial | score fn | setting | lr | experts | {metric} | objective | general loss | valid loss | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['score_function']} | {r['setting']} | {cell(r['lr']) or 'default'} | {cell(r['experts'])} | "
              f"{cell(r['metric'])} | {cell(r['objective'])} | {cell(r['general_loss'])} | {cell(r['valid_loss'])} | {r['status']} |"
              for r in rows]
    if registered:
        lines += ["", (f"Registered: `models:/{registered['name']}/{registered['version']}` (champion alias "
                      f"{'moved to it' if registered['champion'] else 'kept on the better earlier version'}); "
                      f"tracking URI `{registered['tracking_uri']}`")]
    return "\n".join(lines) + "\n"


def _best(rows: list[dict], mode: str) -> dict | None:
    finished = [r for r in rows if r["objective"] is not None and math.isfinite(r["objective"]) and not r["status"].startswith("failed")]
    if not finished:
        return None
    sign = -1 if mode == "max" else 1
    return min(finished, key=lambda r: (sign * r["objective"], r["experts"] or 0))  # ties: fewer experts


def _register_best(best: dict, tracker, config: SweepConfig, metric: str, mode: str, base_model: str, task: str,
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
            "score_function": best["score_function"], "selection": best["setting"], "top_p": best["setting"].removeprefix("p="),
            "selected_experts": str(best["experts"]), "sweep": config.name, **model_tags}
    registration = register_version(client, config.register.get("model_name") or config.name, model_id, run_id, metric,
                                    float(best["metric"]), tags, tracker.tracking_uri, higher_is_better=mode == "max")
    return asdict(registration)


def _sweep_state(run: Path, fingerprint: str, restart: bool) -> dict:
    """Whether this run directory holds the same sweep (resume) or must start over."""
    state_file = run / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state and state.get("fingerprint") != fingerprint:
        if not restart:
            raise ConfigError(f"tune: {run} holds a sweep with other settings; pass --restart to start over there, or choose another run_dir")
        state = {}
    if restart and (run / "ray" / EXPERIMENT).exists():
        shutil.rmtree(run / "ray" / EXPERIMENT)
        state = {}
    state["fingerprint"] = fingerprint
    return state


def run_sweep(config: SweepConfig, restart: bool = False) -> dict:
    from ray import tune

    from pipeline.profile import ensure_ray
    from pipeline.register import artifact_root, default_tracking_uri
    from pipeline.run import prepare_embedded
    from pipeline.tracking import SweepTracker, finish_parent_run, start_parent_run

    config.validate()
    run = Path(config.run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    pipeline = config.pipeline()
    if config.model == "embedded":
        inputs = prepare_embedded(run / "assets")
    else:
        inputs = {"model": config.model, "train_data": config.train_data, "eval_data": config.eval_data, "general_data": config.general_data}
    profile_cfg, train_cfg, eval_cfg = pipeline.stage_configs(inputs["model"], inputs, run)
    train_cfg.validate()
    eval_cfg.validate()
    metric, mode, weight = config.objective_spec(eval_cfg.metric)
    state = _sweep_state(run, _hash({**asdict(config), "run_dir": None}), restart)

    ensure_ray()
    profile_dir = cached_profile(profile_cfg, run)
    from esft.scores import SCORES_FILENAME, ExpertScores

    scores = ExpertScores.load(profile_dir / SCORES_FILENAME)
    data_hash = _hash([content_hash(inputs["train_data"]), content_hash(inputs["eval_data"])])
    tracking_uri = config.register.get("tracking_uri") or default_tracking_uri(run)
    state["parent_run_id"] = start_parent_run(tracking_uri, "esft-sweeps", artifact_root(tracking_uri, run), config.name,
                                              {"base_model": inputs["model"], "data_hash": data_hash, "objective": metric,
                                               "search": json.dumps(asdict(config.space()))}, state.get("parent_run_id"))
    atomic_write_text(run / "sweep.json", json.dumps(state, indent=1))
    tracker = SweepTracker(tracking_uri, state["parent_run_id"], inputs["model"], data_hash)

    setup = {"run_dir": str(run), "profile_dir": str(profile_dir), "num_experts": scores.num_experts, "objective": [metric, mode, weight],
             "train": {k: v for k, v in asdict(train_cfg).items() if k not in ("out", "expert_config", "resume")},
             "eval": {k: v for k, v in asdict(eval_cfg).items() if k not in ("out", "adapter")}}
    # The trial itself only drives: Ray Train's workers and the evaluation replicas ask for the
    # CPUs/GPUs, so a trial holding none of them cannot starve its own training run.
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 0, "memory": 64 * 1024**2})
    experiment = run / "ray" / EXPERIMENT
    if tune.Tuner.can_restore(experiment):
        log.info("tune: resuming the sweep in %s (finished trials are kept)", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable)
    else:
        tuner = tune.Tuner(
            trainable, param_space=_param_space(config.space()),
            tune_config=tune.TuneConfig(metric="objective", mode=mode, max_concurrent_trials=int(config.max_concurrent_trials)),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(run / "ray"), callbacks=[tracker],
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
    results = tuner.fit()
    rows = summary_rows(results, metric)
    best = _best(rows, mode)
    registered = None
    if best and config.register.get("enabled", True):
        registered = _register_best(best, tracker, config, metric, mode, inputs["model"], Path(str(inputs["train_data"])).stem,
                                    config.tokenizer)
    markdown = summary_markdown(rows, metric, registered)
    atomic_write_text(run / "sweep_summary.md", markdown)
    atomic_write_text(run / "sweep_summary.json", json.dumps({"rows": rows, "best": best, "registered": registered}, indent=1, default=str))
    failed = sum(r["status"].startswith("failed") for r in rows)
    finish_parent_run(tracking_uri, state["parent_run_id"], {f"best_{metric}": best["metric"] if best else float("nan"),
                      "trials": len(rows), "failed_trials": failed}, [run / "sweep_summary.md"], "FINISHED" if best else "FAILED")
    print(markdown, flush=True)
    log.info("tune: %d trials (%d failed); profile %s; MLflow UI: mlflow ui --backend-store-uri %s", len(rows), failed, profile_dir, tracking_uri)
    return {"rows": rows, "best": best, "registered": registered, "profile_dir": str(profile_dir), "tracking_uri": tracking_uri,
            "parent_run_id": state["parent_run_id"]}

