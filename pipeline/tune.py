"""Ray Tune sweeps over expert selection, tracked in MLflow, the best adapter registered:

    esft tune --config configs/sweep.yaml          # the grid
    esft tune --config configs/sweep_asha.yaml     # Optuna's model-based search + ASHA early stopping

profile once (cached by a hash of the model files, the data bytes and the profiling settings) -> one Tune trial
per point of the grid, or per proposal of the searcher: select (cheap) -> train (a Ray Train run inside the
trial) -> evaluate -> report. Every validation step of the Ray Train run reaches Tune as a result (Ray's
Train-to-Tune report callback), so a scheduler such as ASHA stops a trial whose validation loss falls behind;
its last checkpoint is kept. A trial whose selection (and training settings) equals an earlier trial's
reuses that result (or continues that checkpoint) instead of retraining. The driver logs a parent MLflow run and
one nested run per trial (early-stopped ones tagged `esft.early_stopped=true`, never registered), registers
the best trial's adapter as a new version of the registered model (the `champion` alias moves only if it
beats the current champion) and prints a summary table.

Rerunning the same command after the driver died resumes the sweep from its own JSON journal (never from
Tune's pickled experiment state, see pipeline.sweep_journal): completed trials are kept, the searcher is told
all of them, interrupted trials run again and their training continues from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from esft.io import atomic_write_text
from pipeline.cache_keys import digest, keyed
from pipeline.config import ConfigError, build_config
from pipeline.sweep_journal import (
    JOURNAL,
    TrialJournal,
    completed,
    interrupted,
    load_journal,
    optuna_history,
    optuna_params,
    remaining_grid,
)

log = logging.getLogger("esft")
EXPERIMENT = "tune"  # Tune's experiment directory name under <run_dir>/ray
STEP_OBJECTIVE_METRICS = ("valid_loss", "general_loss")  # objectives that every validation step measures
SCHEDULER_METRICS = ("valid_loss", "general_loss", "loss")  # what a Train report carries at every validation step


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
        points += [{"score_function": f, "experts_per_layer": n}
                   for f in self.budget_score_functions for n in self.experts_per_layer]
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


SELECTION_KINDS = ("token", "gate", "token_budget", "gate_budget")


@dataclass
class SearcherConfig:
    """Model-based search instead of the grid: Optuna's TPE (through Tune's OptunaSearch) proposes
    `num_samples` trials, each a selection kind and its setting drawn from that kind's [low, high]
    range, learning from the finished trials (early-stopped ones count as pruned). Kinds: token / gate
    (top-p over that score; token and gate ranges differ), token_budget / gate_budget (a fixed number of
    experts per layer ranked by that score)."""

    algorithm: str = "optuna"
    num_samples: int = 8
    startup_trials: int = 3  # random proposals before TPE models the finished trials
    seed: int = 0
    kinds: list[str] = field(default_factory=lambda: ["token", "gate"])
    token_top_p: list[float] = field(default_factory=lambda: [0.05, 0.6])  # [low, high]
    gate_top_p: list[float] = field(default_factory=lambda: [0.02, 0.4])
    experts_per_layer: list[int] = field(default_factory=lambda: [1, 8])
    lr: list[float] = field(default_factory=list)  # [low, high] on a log scale; empty: the train section's lr
    train_shared_experts: list[bool] = field(default_factory=lambda: [False])  # [false, true]: searched on/off

    def validate(self) -> None:
        from esft.select import check_top_p

        if self.algorithm != "optuna":
            raise ConfigError(f"tune: searcher.algorithm {self.algorithm!r} is not known; "
                              "use optuna (or leave searcher out for the grid)")
        for name in ("num_samples", "startup_trials"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "num_samples" else 0):
                raise ConfigError(f"tune: searcher.{name} must be a "
                                  f"{'positive' if name == 'num_samples' else 'non-negative'} integer")
        if not self.kinds or any(k not in SELECTION_KINDS for k in self.kinds):
            raise ConfigError(f"tune: searcher.kinds must name some of {', '.join(SELECTION_KINDS)}")
        for name in ("token_top_p", "gate_top_p", "experts_per_layer", "lr"):
            values = getattr(self, name)
            if name == "lr" and not values:
                continue
            if (len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                    or values[0] > values[1]):
                raise ConfigError(f"tune: searcher.{name} must be a range [low, high] with low <= high, got {values!r}")
        for p in self.token_top_p + self.gate_top_p:
            check_top_p(p)
        if any(not isinstance(n, int) or n < 1 for n in self.experts_per_layer):
            raise ConfigError("tune: searcher.experts_per_layer must be a range of positive integers")
        if self.lr and self.lr[0] <= 0:
            raise ConfigError("tune: searcher.lr must be a range of positive numbers")
        if not self.train_shared_experts or any(not isinstance(v, bool) for v in self.train_shared_experts):
            raise ConfigError("tune: searcher.train_shared_experts must list true and/or false")


@dataclass
class SchedulerConfig:
    """Early stopping (Tune's ASHAScheduler) on a metric that every validation step reports. A trial
    can be stopped at `grace_period` steps, then at grace_period x reduction_factor^k steps, when it is
    not in the best 1/reduction_factor of the trials that reached that step; never at its last step
    (a trial that trained to the end is evaluated)."""

    algorithm: str = "asha"
    metric: str = "valid_loss"  # valid_loss, general_loss, loss, or objective when the objective is a loss
    mode: str | None = None  # default: min for losses, else the objective's mode
    grace_period: int | None = None  # in training steps; default: the first validation (train.eval_every)
    reduction_factor: float = 2.0

    def validate(self, objective_per_step: bool) -> None:
        if self.algorithm != "asha":
            raise ConfigError(f"tune: scheduler.algorithm {self.algorithm!r} is not known; use asha")
        if self.metric not in SCHEDULER_METRICS and not (self.metric == "objective" and objective_per_step):
            raise ConfigError(f"tune: scheduler.metric must be one of {', '.join(SCHEDULER_METRICS)} (metrics every validation "
                              "step reports), or objective when objective.metric is valid_loss or general_loss")
        if self.mode not in (None, "min", "max"):
            raise ConfigError("tune: scheduler.mode must be min or max")
        if self.grace_period is not None and (not isinstance(self.grace_period, int) or self.grace_period < 1):
            raise ConfigError("tune: scheduler.grace_period must be a positive number of training steps")
        if not (isinstance(self.reduction_factor, (int, float)) and self.reduction_factor > 1):
            raise ConfigError("tune: scheduler.reduction_factor must be greater than 1")


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
    search: dict = field(default_factory=dict)  # the grid (used when there is no searcher)
    searcher: dict = field(default_factory=dict)  # model-based search instead of the grid (SearcherConfig)
    scheduler: dict = field(default_factory=dict)  # early stopping (SchedulerConfig); empty: every trial runs to its end
    objective: dict = field(default_factory=dict)  # metric, mode (max|min), general_loss_weight
    max_concurrent_trials: int = 1
    register: dict = field(default_factory=dict)  # model_name, tracking_uri, enabled, log_base_model, log_merged

    def space(self) -> SearchSpace:
        return build_config(SearchSpace, self.search, {}, where="tune: search")

    def searcher_config(self) -> SearcherConfig | None:
        return build_config(SearcherConfig, self.searcher, {}, where="tune: searcher") if self.searcher else None

    def scheduler_config(self) -> SchedulerConfig | None:
        return build_config(SchedulerConfig, self.scheduler, {}, where="tune: scheduler") if self.scheduler else None

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
        self.pipeline().validate("tune")
        unknown = set(self.objective) - {"metric", "mode", "general_loss_weight"}
        if unknown:
            raise ConfigError(f"tune: unknown objective setting(s) {', '.join(sorted(unknown))}; "
                              "known: metric, mode, general_loss_weight")
        searcher = self.searcher_config()
        if searcher:
            if self.search:
                raise ConfigError("tune: give either search (the grid) or searcher (model-based search), not both")
            searcher.validate()
        else:
            self.space().validate()
        scheduler = self.scheduler_config()
        if scheduler:
            scheduler.validate(objective_per_step=self.objective.get("metric") in STEP_OBJECTIVE_METRICS)
        if int(self.max_concurrent_trials) < 1:
            raise ConfigError("tune: max_concurrent_trials must be a positive integer")
        from pipeline.register import check_register_settings

        check_register_settings(self.register, {"model_name", "tracking_uri", "enabled"}, where="tune")

    def fingerprint(self) -> str:
        """What makes a run directory's sweep the same sweep (resume) or another one (sections this
        version added count only when given, so sweeps started before it still resume)."""
        settings = {k: v for k, v in asdict(self).items() if not (k in ("searcher", "scheduler") and not v)}
        return digest({**settings, "run_dir": None})


def cached_profile(profile_cfg, run: Path) -> Path:
    """Profile once per (model, data, profiling settings): the result lives under a directory
    named by their hash and is reused by every trial and every later sweep."""
    from pipeline.profile import run_profile

    settings = {k: v for k, v in asdict(profile_cfg).items() if k not in ("out", "overwrite")}
    key = digest(keyed(settings, data=("data",), models=("model",)))
    target = run / "profiles" / key
    if (target / "expert_scores.json").exists():
        log.info("tune: profile %s cached (same model, data and settings), not recomputed", key)
        return target
    profile_cfg.out, profile_cfg.overwrite = str(target), True
    run_profile(profile_cfg)
    return target


# ------------------------------------------------------------------------------ one trial


@contextlib.contextmanager
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


def trained_history(work: Path) -> list[dict]:
    """A trial's per-step training records: the finished run's, else those of its latest checkpoint
    (a run stopped early or interrupted), else none."""
    finished = work / "train" / "metrics.json"
    if finished.exists():
        return json.loads(finished.read_text()).get("history", [])
    checkpoints = sorted((work / "train" / "ray" / "train").glob("checkpoint_*/metrics.json"))
    for metrics in reversed(checkpoints):  # the newest complete one
        try:
            return json.loads(metrics.read_text()).get("history", [])
        except (OSError, json.JSONDecodeError):
            continue
    return []


def step_result(record: dict, context: dict) -> dict:
    """What Tune sees of one validation step: the Train record, the trial's work directory and size,
    and the objective where the step measures it (None otherwise: a searcher then waits for the end)."""
    metric, mode, weight = context["objective"]
    measured = metric in STEP_OBJECTIVE_METRICS and record.get(metric) is not None
    objective = objective_value(record, metric, mode, weight) if measured else None
    return {**record, "objective": objective, "work_dir": context["work_dir"], "selected_experts": context["selected_experts"]}


class ValidationToTune(TuneReportCallback):
    """Ray's Train-to-Tune report callback (it runs in the Train controller and hands each report to the
    Tune trial that launched the run), each record completed by `step_result`. It also hands the trial
    its controller once, so that a trial stopped early can abort its Train run (`SweepTrial.cleanup`)."""

    def __init__(self, context: dict, controller_handoff):
        super().__init__()
        self.context = context
        self.controller_handoff = controller_handoff  # a ray.util.queue.Queue owned by the trial
        self.handed_over = False  # per controller: the callback is a copy inside each one

    def after_report(self, run_context, metrics, checkpoint):
        if not self.handed_over:
            import ray

            self.controller_handoff.put(ray.get_runtime_context().current_actor)
            self.handed_over = True
        super().after_report(run_context, [step_result(metrics[0], self.context), *metrics[1:]], checkpoint)


# The Train run this trial's process is driving (a trial process runs one trial): what `SweepTrial.cleanup`
# aborts when Tune stops the trial before its run ended.
_LIVE_TRAIN_RUN: dict = {}


def _abort_live_train_run() -> None:
    """Abort the trial's Train run through its controller: workers stopped, placement group removed, nothing
    left for Ray's own cleanup to find later (that needs the dashboard). The checkpoints stay."""
    from queue import Empty

    import ray

    handoff = _LIVE_TRAIN_RUN.get("handoff")
    if handoff is None:
        return
    _LIVE_TRAIN_RUN["aborted"] = True
    try:
        controller = handoff.get(block=False)
    except Empty:
        return  # no report yet: the controller dies with this process and Ray cleans up after it
    with contextlib.suppress(Exception):  # the controller exits as it aborts (RayActorError), or is gone already
        ray.get(controller.abort.remote(), timeout=120)


def sweep_trainable(setup: dict):
    """The Tune trainable: `run_trial` as a function trainable whose cleanup (Tune's stop, e.g. ASHA's)
    first aborts a Train run still going. It reserves no CPU or GPU: Ray Train's workers and the evaluation
    replicas ask for them, so a trial cannot starve its own training run."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(tune.with_parameters(run_trial, setup=setup))

    def cleanup(self):
        _abort_live_train_run()
        base.cleanup(self)

    trial_class = type(run_trial.__name__, (base,), {"cleanup": cleanup})  # trials named as before
    return tune.with_resources(trial_class, {"cpu": 0, "memory": 64 * 1024**2})


def _run_train_reporting_to_tune(train_cfg, context: dict) -> dict:
    """run_train with every Train report (one per validation step in a sweep) forwarded to this Tune trial."""
    from ray.util.queue import Queue

    from pipeline.train import run_train

    _LIVE_TRAIN_RUN.update(handoff=Queue(actor_options={"num_cpus": 0}), aborted=False)
    callbacks = [ValidationToTune(context, _LIVE_TRAIN_RUN["handoff"])]
    try:
        return run_train(train_cfg, callbacks=callbacks)
    except Exception:
        if _LIVE_TRAIN_RUN.get("aborted"):
            raise _StoppedByTune() from None
        raise
    finally:
        _LIVE_TRAIN_RUN.pop("handoff", None)


class _StoppedByTune(Exception):
    """The Train run was aborted because Tune stopped the trial (the trial ends quietly)."""


def _train_and_evaluate(work: Path, expert_config, selection: dict, setup: dict, lr: float | None, context: dict) -> dict:
    from esft.report import save_selection_plot
    from pipeline.evaluate import EvalConfig, run_eval
    from pipeline.train import TrainConfig

    expert_config.save(work / "expert_cfg.json")
    save_selection_plot(expert_config, setup["num_experts"], work / "selection.png")
    shutil.copyfile(Path(setup["profile_dir"]) / f"heatmap_{selection['score_function']}.png", work / "heatmap.png")
    train_cfg = TrainConfig(**{**setup["train"], "out": str(work / "train"), "expert_config": str(work / "expert_cfg.json")})
    if lr is not None:
        train_cfg.lr = lr
    # An earlier attempt of this same selection (stopped early, or interrupted) continues from its checkpoint.
    checkpoints = list((work / "train" / "ray" / "train").glob("checkpoint_*"))
    train_cfg.resume = bool(checkpoints) and not (work / "train" / "metrics.json").exists()
    if (work / "train").exists() and not train_cfg.resume:
        shutil.rmtree(work / "train")
    trained = _run_train_reporting_to_tune(train_cfg, context)
    eval_cfg = EvalConfig(**{**setup["eval"], "adapter": str(work / "train" / "adapter"),
                             "out": str(work / "eval" / "metrics.json")})
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
    """One Tune trial: select -> train -> evaluate, or reuse an identical earlier selection's result.

    Tune sees every validation step (the scheduler may stop the trial at any of them). A selection
    trained before, to its end or only partly (stopped early, interrupted), first replays its recorded
    validation steps, so the scheduler judges it on the same curve; then it reuses the result, or
    training continues from the last checkpoint."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    run = Path(setup["run_dir"])
    expert_config = select_for_trial(Path(setup["profile_dir"]), params["selection"], params["train_shared_experts"])
    experts = {layer: sorted(ids) for layer, ids in expert_config.experts.items()}  # order does not change training
    key = digest({"experts": experts, "shared": expert_config.shared_experts, "lr": params["lr"], "train": setup["train"]})
    work = run / "trials" / key
    context = {"objective": setup["objective"], "work_dir": str(work), "selected_experts": expert_config.num_selected}
    with _claimed(run / "trials" / f"{key}.lock"):
        for record in trained_history(work):
            if record.get("valid_loss") is not None:
                ray.tune.report(step_result(record, context))
        result_file = work / "result.json"
        if result_file.exists():
            result = json.loads(result_file.read_text())
            if result["trained_by"] in setup["interrupted_trials"]:
                # Trained by a trial whose driver died before the trial was reported: this one, its rerun, owns it.
                result["trained_by"] = trial_id
                atomic_write_text(result_file, json.dumps(result, indent=1))
            else:
                log.info("trial %s: same selection as trial %s, not retrained", trial_id, result["trained_by"])
        else:
            try:
                trained = _train_and_evaluate(work, expert_config, params["selection"], setup, params["lr"], context)
            except _StoppedByTune:
                log.info("trial %s: stopped by Tune; its Train run was aborted, its checkpoints kept", trial_id)
                return
            result = {"trained_by": trial_id, "work_dir": str(work), "selected_experts": expert_config.num_selected, **trained}
            atomic_write_text(result_file, json.dumps(result, indent=1))
    metric, mode, weight = setup["objective"]
    report = {**result, "step": setup["train"]["steps"], "objective": objective_value(result, metric, mode, weight),
              "evaluated": True, "duplicate_of": result["trained_by"] if result["trained_by"] != trial_id else ""}
    ray.tune.report(report)


# ------------------------------------------------------------------------------ search and early stopping


class GridPoints(Searcher):
    """The grid's points still to run, proposed in order. (Tune's own grid is a cartesian product of its keys,
    so it cannot leave out the points that a resumed sweep completed earlier.)"""

    def __init__(self, points: list[dict]):
        super().__init__()
        self.points = list(points)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # it proposes fixed points: Tune's metric and mode do not change them

    def suggest(self, trial_id: str) -> dict | str:
        return self.points.pop(0) if self.points else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


def grid_points(space: SearchSpace) -> list[dict]:
    """Every point of the grid as a trial config: each selection x each lr x each train_shared_experts value."""
    return [{"selection": selection, "lr": lr, "train_shared_experts": shared}
            for selection in space.selections() for lr in (space.lr or [None]) for shared in space.train_shared_experts]


def suggest_trial(trial, searcher: SearcherConfig) -> dict:
    """Optuna's define-by-run space: a selection kind, then only that kind's setting (so TPE models token
    and gate top-p apart), the learning rate on a log scale, shared experts on or off. Returns the trial's
    config in the grid's shape (selection, lr, train_shared_experts)."""
    kind = trial.suggest_categorical("kind", searcher.kinds)
    if kind in ("token", "gate"):
        low, high = getattr(searcher, f"{kind}_top_p")
        selection = {"score_function": kind, "top_p": trial.suggest_float(f"{kind}_top_p", low, high)}
    else:
        low, high = searcher.experts_per_layer
        selection = {"score_function": kind.removesuffix("_budget"),
                     "experts_per_layer": trial.suggest_int("experts_per_layer", low, high)}
    lr = trial.suggest_float("lr", *searcher.lr, log=True) if searcher.lr else None
    shared = searcher.train_shared_experts
    train_shared = trial.suggest_categorical("train_shared_experts", shared) if len(set(shared)) > 1 else shared[0]
    return {"selection": selection, "lr": lr, "train_shared_experts": train_shared}


class StepAwareOptunaSearch(OptunaSearch):
    """OptunaSearch, given only the results that measure the objective: a validation step of a trial whose
    objective is an evaluation metric carries objective None, and Optuna hears of the trial at its end
    (complete, or pruned when it was stopped early).

    A resumed sweep hands it the trials that earlier driver lives completed (`history`: parameters,
    objective, state), which its study records as if it had proposed them, and the configs of trials that
    were interrupted (`pending`), which it proposes first."""

    def __init__(self, *args, history: list[tuple[dict, float | None, str]] = (), pending: list[dict] = (), **kwargs):
        self._history, self._pending = list(history), list(pending)
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        import optuna

        super()._setup_study(mode)
        for params, value, state in self._history:
            # Asked with its parameters fixed, so the define-by-run space itself records their distributions.
            self._ot_study.enqueue_trial(params)
            trial = self._ot_study.ask()
            self._space(trial)
            self._ot_study.tell(trial, value, state=optuna.trial.TrialState[state])
        for params in self._pending:
            self._ot_study.enqueue_trial(params)

    def on_trial_result(self, trial_id: str, result: dict):
        if result.get(self.metric) is not None:
            super().on_trial_result(trial_id, result)


def make_searcher(searcher: SearcherConfig, mode: str, history=(), pending=()):
    """Tune's OptunaSearch over `suggest_trial`, with a TPE sampler that starts modelling after a few trials
    (`history` / `pending`: what a resumed sweep already knows, see StepAwareOptunaSearch)."""
    import warnings

    try:
        import optuna
    except ImportError as error:
        raise ConfigError("tune: searcher.algorithm optuna needs Optuna: pip install 'esft[sweep]'") from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # multivariate/group TPE (conditional spaces) is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(n_startup_trials=searcher.startup_trials, seed=searcher.seed,
                                             multivariate=True, group=True)
    return StepAwareOptunaSearch(space=functools.partial(suggest_trial, searcher=searcher), metric="objective", mode=mode,
                                  sampler=sampler, history=history, pending=pending)


def make_scheduler(scheduler: SchedulerConfig, train: dict, objective_mode: str):
    """ASHA over training steps. Its last rung lies before the final step and trials past it are not stopped
    (stop_last_trials=False): a trial that trained to its end is always evaluated."""
    from ray.tune.schedulers import ASHAScheduler

    grace = scheduler.grace_period or train["eval_every"]
    if grace >= train["steps"]:
        raise ConfigError(f"tune: scheduler.grace_period ({grace}) must be below train.steps ({train['steps']}); "
                          "a trial can only be stopped before its last step")
    mode = scheduler.mode or ("min" if scheduler.metric.endswith("loss") else objective_mode)
    return ASHAScheduler(time_attr="step", metric=scheduler.metric, mode=mode, grace_period=grace,
                         reduction_factor=scheduler.reduction_factor, max_t=train["steps"] - 1, stop_last_trials=False)


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


def _best(rows: list[dict], mode: str) -> dict | None:
    """The best evaluated trial (early-stopped and failed ones never qualify)."""
    finished = [r for r in rows if r["objective"] is not None and math.isfinite(r["objective"])
                and (r["status"] == "trained" or r["status"].startswith("same selection"))]
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
            "score_function": best["score_function"], "selection": best["setting"],
            "top_p": str(best["selection"].get("top_p")), "selected_experts": str(best["experts"]),
            "sweep": config.name, **model_tags}
    registration = register_version(client, config.register.get("model_name") or config.name, model_id, run_id, metric,
                                    float(best["metric"]), tags, tracker.tracking_uri, higher_is_better=mode == "max")
    return asdict(registration)


def _sweep_state(run: Path, fingerprint: str, inputs_key: str, restart: bool) -> tuple[dict, dict[str, dict]]:
    """Whether this run directory holds the same sweep (resume: its state and trial journal) or must
    start over. `inputs_key`: the model and data by content (a state written before it was kept
    resumes on its settings alone)."""
    state_file = run / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state and not restart:
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(f"tune: {run} holds a sweep with other settings; "
                              "pass --restart to start over there, or choose another run_dir")
        if state.get("inputs", inputs_key) != inputs_key:
            raise ConfigError(f"tune: {run} holds a sweep on another model or other data (the files changed since); "
                              "pass --restart to start over there, or choose another run_dir")
    if restart:
        state = {}
    state["fingerprint"], state["inputs"] = fingerprint, inputs_key
    return state, {} if restart else load_journal(run)


def _tune_config(config: SweepConfig, train: dict, mode: str, journal: dict[str, dict]):
    """The trials still to run, as Tune's search: the grid's points that no earlier life of the sweep completed,
    or the searcher's remaining proposals (knowing the completed trials); with or without early stopping.
    None when nothing is left. A scheduler and a searcher carry their own metric (validation loss per step vs
    the final objective), so Tune's own metric is set only for a plain grid."""
    from ray import tune

    searcher, scheduler = config.searcher_config(), config.scheduler_config()
    concurrency = int(config.max_concurrent_trials)
    if searcher:
        samples = searcher.num_samples - len(completed(journal))
        search_alg = make_searcher(searcher, mode, history=optuna_history(journal),
                                   pending=[optuna_params(e["config"]) for e in interrupted(journal)])
    else:
        points = remaining_grid(grid_points(config.space()), journal)
        samples, search_alg = len(points), GridPoints(points)
    if samples <= 0:
        return None
    return tune.TuneConfig(
        search_alg=search_alg,
        scheduler=make_scheduler(scheduler, train, mode) if scheduler else None,
        num_samples=samples,
        max_concurrent_trials=concurrency,
        **({} if searcher or scheduler else {"metric": "objective", "mode": mode}),
    )


def run_sweep(config: SweepConfig, restart: bool = False) -> dict:
    from ray import tune

    from pipeline.cluster import ensure_ray
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
        inputs = {"model": config.model, "train_data": config.train_data, "eval_data": config.eval_data,
                  "general_data": config.general_data}
    profile_cfg, train_cfg, eval_cfg = pipeline.stage_configs(inputs["model"], inputs, run)
    train_cfg.validate()
    eval_cfg.validate()
    metric, mode, weight = config.objective_spec(eval_cfg.metric)
    train = {k: v for k, v in asdict(train_cfg).items() if k not in ("out", "expert_config", "resume")}
    # Every validation step is a checkpoint and a Train report, so it reaches Tune (a scheduler stops trials
    # there) and a trial stopped at it can be continued.
    train["eval_every"] = min(train["eval_every"], train["steps"])
    train["save_every"] = train["eval_every"]
    hashed = keyed(inputs, data=("train_data", "eval_data", "general_data"), models=("model",))  # each file read once
    inputs_key = digest(hashed)
    state, journal = _sweep_state(run, config.fingerprint(), inputs_key, restart)
    tune_config = _tune_config(config, train, mode, journal)  # settings errors before any work
    rerun = {e["trial_id"] for e in interrupted(journal)}  # they run again under new trial ids
    journal = {trial_id: entry for trial_id, entry in journal.items() if trial_id not in rerun}

    ensure_ray()
    profile_dir = cached_profile(profile_cfg, run)
    from esft.scores import SCORES_FILENAME, ExpertScores

    scores = ExpertScores.load(profile_dir / SCORES_FILENAME)
    data_hash = digest([hashed["train_data"], hashed["eval_data"]])
    tracking_uri = config.register.get("tracking_uri") or default_tracking_uri(run)
    searched = ({"searcher": json.dumps(asdict(config.searcher_config()))} if config.searcher
                else {"search": json.dumps(asdict(config.space()))})
    if config.scheduler:
        searched["scheduler"] = json.dumps(asdict(config.scheduler_config()))
    state["parent_run_id"] = start_parent_run(tracking_uri, "esft-sweeps", artifact_root(tracking_uri, run), config.name,
                                              {"base_model": inputs["model"], "data_hash": data_hash, "objective": metric,
                                               **searched},
                                              state.get("parent_run_id"))
    atomic_write_text(run / "sweep.json", json.dumps(state, indent=1))
    atomic_write_text(run / JOURNAL, json.dumps(journal, indent=1))
    tracker = SweepTracker(tracking_uri, state["parent_run_id"], inputs["model"], data_hash)

    setup = {"run_dir": str(run), "profile_dir": str(profile_dir), "num_experts": scores.num_experts,
             "objective": [metric, mode, weight],
             "train": train, "eval": {k: v for k, v in asdict(eval_cfg).items() if k not in ("out", "adapter")},
             "interrupted_trials": sorted(rerun)}
    trial_journal = TrialJournal(run, journal)
    # Tune's own experiment directory is never restored (that unpickles it): each driver life starts afresh.
    shutil.rmtree(run / "ray" / EXPERIMENT, ignore_errors=True)
    started = time.perf_counter()
    if tune_config is None:
        log.info("tune: every trial of this sweep completed earlier; summarising")
    else:
        if journal or rerun:
            log.info("tune: resuming the sweep in %s: %d trial(s) completed earlier are kept, %d interrupted one(s) continue",
                     run, len(journal), len(rerun))
        tuner = tune.Tuner(
            sweep_trainable(setup), tune_config=tune_config,
            # The journal after MLflow: a trial counts as completed once it is logged.
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(run / "ray"), callbacks=[tracker, trial_journal],
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
        tuner.fit()
    fit_seconds = time.perf_counter() - started
    rows = summary_rows(list(trial_journal.entries.values()), metric)
    best = _best(rows, mode)
    registered = None
    if best and config.register.get("enabled", True):
        registered = _register_best(best, tracker, config, metric, mode, inputs["model"], Path(str(inputs["train_data"])).stem,
                                    config.tokenizer)
    markdown = summary_markdown(rows, metric, registered)
    atomic_write_text(run / "sweep_summary.md", markdown)
    atomic_write_text(run / "sweep_summary.json",
                      json.dumps({"rows": rows, "best": best, "registered": registered}, indent=1, default=str))
    failed = sum(r["status"].startswith("failed") for r in rows)
    stopped = sum(r["status"].startswith("stopped early") for r in rows)
    finish_parent_run(tracking_uri, state["parent_run_id"], {f"best_{metric}": best["metric"] if best else float("nan"),
                      "trials": len(rows), "failed_trials": failed, "early_stopped_trials": stopped, "fit_seconds": fit_seconds},
                      [run / "sweep_summary.md"], "FINISHED" if best else "FAILED")
    print(markdown, flush=True)
    log.info("tune: %d trials (%d stopped early, %d failed) in %.0f s; profile %s; MLflow UI: mlflow ui --backend-store-uri %s",
             len(rows), stopped, failed, fit_seconds, profile_dir, tracking_uri)
    return {"rows": rows, "best": best, "registered": registered, "profile_dir": str(profile_dir), "tracking_uri": tracking_uri,
            "parent_run_id": state["parent_run_id"], "fit_seconds": fit_seconds}
