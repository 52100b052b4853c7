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

Beside this module: the settings (pipeline/sweep_config.py), the journal (pipeline/sweep_journal.py), the
summary table and the registration of the best trial (pipeline/sweep_summary.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from esft.io import atomic_write_text
from pipeline import stages
from pipeline.cache_keys import digest, keyed
from pipeline.config import ConfigError
from pipeline.sweep_config import (STEP_OBJECTIVE_METRICS, SchedulerConfig, SearcherConfig, SearchSpace, SweepConfig,
                                   default_mode)
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
from pipeline.sweep_summary import best_trial, register_best, summary_markdown, summary_rows

log = logging.getLogger("esft")
EXPERIMENT = "tune"  # Tune's experiment directory name under <run_dir>/ray


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
    its controller once, so that a trial stopped early can abort its Train run (`sweep_trainable`: its cleanup and reset)."""

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


# How long a reused trial process waits for the previous trial's thread to end after aborting its Train run.
TRIAL_THREAD_TIMEOUT_S = 600

# How long an abort may take before the controller is killed instead (its workers and placement group go with
# it): a controller blocked on a full report queue that no stopped trial reads cannot take the abort call.
ABORT_TIMEOUT_S = 30

# The trial this process is running (one at a time; Tune reuses the process for the next trial): the Train run
# that `cleanup` and `reset_config` abort when Tune stopped the trial, and whether they did.
_LIVE_TRAIN_RUN: dict = {}


def _abort_live_train_run() -> None:
    """Abort the trial's Train run through its controller: workers stopped, placement group removed, nothing
    left for Ray's own cleanup to find later (that needs the dashboard). The checkpoints stay."""
    from queue import Empty

    import ray
    from ray.exceptions import GetTimeoutError

    _LIVE_TRAIN_RUN["aborted"] = True  # also stops a trial whose training ended just before: no evaluation
    handoff = _LIVE_TRAIN_RUN.get("handoff")
    if handoff is None:
        return
    try:
        controller = handoff.get(block=False)
    except Empty:
        return  # no report yet, so Tune cannot have stopped the trial on one: the process is ending
    except Exception:  # the queue's actor is gone: nothing left to reach the controller through
        return
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except GetTimeoutError:
        with contextlib.suppress(Exception):
            ray.kill(controller, no_restart=True)
    except Exception:  # the controller exits as it aborts (RayActorError), or is gone already
        pass


def sweep_trainable(setup: dict):
    """The Tune trainable: `run_trial` as a function trainable whose cleanup (Tune's stop, e.g. ASHA's)
    first aborts a Train run still going. It reserves no CPU or GPU: Ray Train's workers and the evaluation
    replicas ask for them, so a trial cannot starve its own training run.

    Trial processes are reused (`reuse_actors`): a new trial would otherwise pay a fresh process and its
    imports (Ray Tune, torch, transformers: ~5-7 s on 2 cores) before it selects anything. A trial that
    Tune stopped early hands its process to the next trial, so the reset first aborts its Train run and
    waits for its thread to end (Tune's own reset gives the thread 2 s, then fails the *next* trial)."""
    from ray import tune
    from ray.train._internal.session import get_session
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(tune.with_parameters(run_trial, setup=setup))

    def cleanup(self):
        _abort_live_train_run()
        base.cleanup(self)

    def reset_config(self, new_config):
        _abort_live_train_run()
        get_session().finish(timeout=TRIAL_THREAD_TIMEOUT_S)  # the old trial's thread ends (a pending report exits it)
        return base.reset_config(self, new_config)

    trial_class = type(run_trial.__name__, (base,), {"cleanup": cleanup, "reset_config": reset_config})
    return tune.with_resources(trial_class, {"cpu": 0, "memory": 64 * 1024**2})


def _run_train_reporting_to_tune(train_cfg, key: str, context: dict) -> dict:
    """The training stage with every Train report (one per validation step in a sweep) forwarded to this
    Tune trial."""
    from ray.util.queue import Queue

    if _LIVE_TRAIN_RUN.get("aborted"):
        raise _StoppedByTune()
    _LIVE_TRAIN_RUN["handoff"] = Queue(actor_options={"num_cpus": 0})
    callbacks = [ValidationToTune(context, _LIVE_TRAIN_RUN["handoff"])]
    try:
        return stages.train(train_cfg, key, callbacks=callbacks)
    except Exception:
        if _LIVE_TRAIN_RUN.get("aborted"):
            raise _StoppedByTune() from None
        raise
    finally:
        _LIVE_TRAIN_RUN.pop("handoff", None)


class _StoppedByTune(Exception):
    """The Train run was aborted because Tune stopped the trial (the trial ends quietly)."""


def _train_and_evaluate(work: Path, key: str, expert_config, selection: dict, setup: dict, lr: float | None,
                        context: dict) -> dict:
    from esft.report import save_selection_plot
    from pipeline.evaluate import EvalConfig
    from pipeline.train import TrainConfig

    expert_config.save(work / "expert_cfg.json")
    save_selection_plot(expert_config, setup["num_experts"], work / "selection.png")
    shutil.copyfile(Path(setup["profile_dir"]) / f"heatmap_{selection['score_function']}.png", work / "heatmap.png")
    train_cfg = TrainConfig(**{**setup["train"], "out": str(work / "train"), "expert_config": str(work / "expert_cfg.json")})
    if lr is not None:
        train_cfg.lr = lr
    # An earlier attempt of this same selection (stopped early, or interrupted) continues from its checkpoint.
    trained = _run_train_reporting_to_tune(train_cfg, key, context)
    if _LIVE_TRAIN_RUN.get("aborted"):  # stopped by Tune as its training ended: not evaluated, not reported
        raise _StoppedByTune()
    evaluated = stages.evaluate(EvalConfig(**{**setup["eval"], "adapter": str(work / "train" / "adapter"),
                                              "out": str(work / "eval" / "metrics.json")}))
    return {
        **evaluated,
        "valid_loss": trained.get("final_valid_loss"),
        "valid_answer_accuracy": trained.get("final_valid_answer_accuracy"),
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
    _LIVE_TRAIN_RUN.clear()  # this process may have run an earlier trial
    run = Path(setup["run_dir"])
    expert_config = stages.select(Path(setup["profile_dir"]), **params["selection"],
                                  shared_experts=params["train_shared_experts"])
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
                trained = _train_and_evaluate(work, key, expert_config, params["selection"], setup, params["lr"], context)
            except _StoppedByTune:
                log.info("trial %s: stopped by Tune; its Train run was aborted, its checkpoints kept", trial_id)
                return
            if _LIVE_TRAIN_RUN.get("aborted"):  # stopped while it evaluated: no result for a later duplicate to reuse
                log.info("trial %s: stopped by Tune after training; its result is not kept", trial_id)
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
    were interrupted (`pending`), which it proposes first. The configured starting points (`start`) come
    next, those that neither an earlier life nor an interrupted trial already ran."""

    def __init__(self, *args, history: list[tuple[dict, float | None, str]] = (), pending: list[dict] = (),
                 start: list[dict] = (), **kwargs):
        self._history, self._pending = list(history), list(pending)
        ran = [params for params, _, _ in self._history] + self._pending
        # A point counts as run when a trial fixed every parameter it gives (the rest were drawn).
        self._start = [point for point in start if not any(point.items() <= params.items() for params in ran)]
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
        for params in self._pending + self._start:
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
                                  sampler=sampler, history=history, pending=pending, start=searcher.points_to_evaluate)


def make_scheduler(scheduler: SchedulerConfig, train: dict, objective_mode: str):
    """ASHA over training steps. Its last rung lies before the final step and trials past it are not stopped
    (stop_last_trials=False): a trial that trained to its end is always evaluated."""
    from ray.tune.schedulers import ASHAScheduler

    grace = scheduler.grace_period or train["eval_every"]
    if grace >= train["steps"]:
        raise ConfigError(f"tune: scheduler.grace_period ({grace}) must be below train.steps ({train['steps']}); "
                          "a trial can only be stopped before its last step")
    mode = scheduler.mode or (objective_mode if scheduler.metric == "objective" else default_mode(scheduler.metric))
    return ASHAScheduler(time_attr="step", metric=scheduler.metric, mode=mode, grace_period=grace,
                         reduction_factor=scheduler.reduction_factor, max_t=train["steps"] - 1, stop_last_trials=False)


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
        reuse_actors=True,  # see sweep_trainable
        **({} if searcher or scheduler else {"metric": "objective", "mode": mode}),
    )


def run_sweep(config: SweepConfig, restart: bool = False) -> dict:
    from ray import tune

    from pipeline.cluster import ensure_ray
    from pipeline.register import artifact_root, default_tracking_uri
    from pipeline.run import EMBEDDED, prepare_embedded
    from pipeline.tracking import SweepTracker, finish_parent_run, start_parent_run

    config.validate()
    run = Path(config.run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    inputs = prepare_embedded(run / "assets") if config.model == EMBEDDED else config.inputs(run)
    profile_cfg, train_cfg, eval_cfg = config.stage_configs(inputs["model"], inputs, run, source="tune")
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
    # Interrupted trials run again under new trial ids. They are remembered in sweep.json, not only in the journal
    # (which drops them now): a driver that dies again before their reruns finish must still know them.
    newly_interrupted = {e["trial_id"] for e in interrupted(journal)}
    rerun = newly_interrupted | set(state.get("interrupted_trials", []))
    state["interrupted_trials"] = sorted(rerun)
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
    tracker = SweepTracker(tracking_uri, state["parent_run_id"], inputs["model"], data_hash)
    if tracker.forget(rerun):
        log.info("tune: deleted the MLflow runs of interrupted trials; their reruns log them again")
    atomic_write_text(run / JOURNAL, json.dumps(journal, indent=1))

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
        if journal or newly_interrupted:
            log.info("tune: resuming the sweep in %s: %d trial(s) completed earlier are kept, %d interrupted one(s) continue",
                     run, len(journal), len(newly_interrupted))
        tuner = tune.Tuner(
            sweep_trainable(setup), tune_config=tune_config,
            # The journal after MLflow: a trial counts as completed once it is logged.
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(run / "ray"), callbacks=[tracker, trial_journal],
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
        tuner.fit()
    fit_seconds = time.perf_counter() - started
    rows = summary_rows(list(trial_journal.entries.values()), metric)
    best = best_trial(rows, mode)
    registered = None
    if best and config.register.get("enabled", True):
        registered = register_best(best, tracker, config, metric, mode, inputs["model"], Path(str(inputs["train_data"])).stem,
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
