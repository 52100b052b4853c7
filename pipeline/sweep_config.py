"""The settings of a sweep (`esft tune --config sweep.yaml`): the pipeline's sections (model, data,
profile, train, eval) plus what is searched (a grid, or Optuna's proposals), early stopping, the
objective and registration, each checked before any work (pipeline/tune.py runs the sweep)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from pipeline.cache_keys import digest
from pipeline.config import ConfigError, build_config
from pipeline.run import PipelineConfig

# Objectives that every validation step measures (valid_answer_accuracy: the share of validation answers the
# model writes exactly, teacher-forced; esft.training.answer_matches)
STEP_OBJECTIVE_METRICS = ("valid_loss", "valid_answer_accuracy", "general_loss")
SCHEDULER_METRICS = ("valid_loss", "valid_answer_accuracy", "general_loss", "loss")  # in every validation step's report


def default_mode(metric: str) -> str:
    """Losses are minimised; every other metric (accuracies, task metrics) is maximised."""
    return "min" if metric.endswith("loss") else "max"


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
    startup_trials: int = 3  # finished trials (starting points included) before TPE models them; the rest are random
    seed: int = 0
    kinds: list[str] = field(default_factory=lambda: ["token", "gate"])
    token_top_p: list[float] = field(default_factory=lambda: [0.05, 0.6])  # [low, high]
    gate_top_p: list[float] = field(default_factory=lambda: [0.02, 0.4])
    experts_per_layer: list[int] = field(default_factory=lambda: [1, 8])
    lr: list[float] = field(default_factory=list)  # [low, high] on a log scale; empty: the train section's lr
    train_shared_experts: list[bool] = field(default_factory=lambda: [False])  # [false, true]: searched on/off
    # Proposed first, before any random or modelled proposal (Tune's points_to_evaluate): e.g. the selection a
    # user already trusts, so the search starts from it. Each names a kind and that kind's setting, and may fix
    # lr and train_shared_experts (what a point leaves out is drawn). Part of num_samples.
    points_to_evaluate: list[dict] = field(default_factory=list)

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
        if not isinstance(self.points_to_evaluate, list) or len(self.points_to_evaluate) > self.num_samples:
            raise ConfigError("tune: searcher.points_to_evaluate must be a list of at most num_samples points")
        for index, point in enumerate(self.points_to_evaluate):
            self._check_point(point, f"tune: searcher.points_to_evaluate[{index}]")

    def _check_point(self, point: object, where: str) -> None:
        """A starting point holds a kind, that kind's setting, and optionally lr and train_shared_experts, each
        inside the searched range (Optuna would otherwise run it outside the space it models)."""
        if not isinstance(point, dict) or point.get("kind") not in self.kinds:
            raise ConfigError(f"{where} must be a mapping whose kind is one of searcher.kinds ({', '.join(self.kinds)})")
        kind = point["kind"]
        setting = f"{kind}_top_p" if kind in ("token", "gate") else "experts_per_layer"
        unknown = set(point) - {"kind", setting, "lr", "train_shared_experts"}
        if unknown or setting not in point:
            raise ConfigError(f"{where}: a {kind} point gives kind, {setting} and optionally lr, train_shared_experts "
                              f"(got {', '.join(sorted(point))})")
        ranges = {setting: getattr(self, setting), "lr": self.lr}
        for name, bounds in ranges.items():
            if name not in point:
                continue
            value = point[name]
            if not bounds:
                raise ConfigError(f"{where}: lr is not searched (searcher.lr is empty); leave it out of the point")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{where}: {name} must be a number, got {value!r} (YAML reads 1e-3 as text; write 0.001)")
            if not bounds[0] <= value <= bounds[1]:
                raise ConfigError(f"{where}: {name} {value!r} is outside searcher.{name} {bounds}")
        if setting == "experts_per_layer" and not isinstance(point[setting], int):
            raise ConfigError(f"{where}: experts_per_layer must be an integer")
        shared = point.get("train_shared_experts", self.train_shared_experts[0])
        if not isinstance(shared, bool) or shared not in self.train_shared_experts:
            raise ConfigError(f"{where}: train_shared_experts {shared!r} is not among "
                              f"searcher.train_shared_experts {self.train_shared_experts}")


@dataclass
class SchedulerConfig:
    """Early stopping (Tune's ASHAScheduler) on a metric that every validation step reports. A trial
    can be stopped at `grace_period` steps, then at grace_period x reduction_factor^k steps, when it is
    not in the best 1/reduction_factor of the trials that reached that step; never at its last step
    (a trial that trained to the end is evaluated)."""

    algorithm: str = "asha"
    metric: str = "valid_loss"  # one of SCHEDULER_METRICS, or objective when the objective is one of those
    mode: str | None = None  # default: min for losses, max for valid_answer_accuracy, the objective's mode for objective
    grace_period: int | None = None  # in training steps; default: the first validation (train.eval_every)
    reduction_factor: float = 2.0

    def validate(self, objective_per_step: bool) -> None:
        if self.algorithm != "asha":
            raise ConfigError(f"tune: scheduler.algorithm {self.algorithm!r} is not known; use asha")
        if self.metric not in SCHEDULER_METRICS and not (self.metric == "objective" and objective_per_step):
            raise ConfigError(f"tune: scheduler.metric must be one of {', '.join(SCHEDULER_METRICS)} (metrics every validation "
                              "step reports), or objective when objective.metric is one of "
                              f"{', '.join(STEP_OBJECTIVE_METRICS)}")
        if self.mode not in (None, "min", "max"):
            raise ConfigError("tune: scheduler.mode must be min or max")
        if self.grace_period is not None and (not isinstance(self.grace_period, int) or self.grace_period < 1):
            raise ConfigError("tune: scheduler.grace_period must be a positive number of training steps")
        if not (isinstance(self.reduction_factor, (int, float)) and self.reduction_factor > 1):
            raise ConfigError("tune: scheduler.reduction_factor must be greater than 1")


@dataclass
class SweepConfig(PipelineConfig):
    """A sweep's config file: a pipeline config (its sections and keys, pipeline/run.py) whose
    selection is searched instead of given, plus the search, early stopping and objective."""

    REGISTER_SETTINGS: ClassVar[frozenset[str]] = frozenset({"model_name", "tracking_uri", "enabled"})

    name: str = "esft-sweep"  # also the registered model's name unless register.model_name is given
    run_dir: str = "runs/sweep"
    search: dict = field(default_factory=dict)  # the grid (used when there is no searcher)
    searcher: dict = field(default_factory=dict)  # model-based search instead of the grid (SearcherConfig)
    scheduler: dict = field(default_factory=dict)  # early stopping (SchedulerConfig); empty: every trial runs to its end
    objective: dict = field(default_factory=dict)  # metric, mode (max|min), general_loss_weight
    max_concurrent_trials: int = 1

    def space(self) -> SearchSpace:
        return build_config(SearchSpace, self.search, {}, where="tune: search")

    def searcher_config(self) -> SearcherConfig | None:
        return build_config(SearcherConfig, self.searcher, {}, where="tune: searcher") if self.searcher else None

    def scheduler_config(self) -> SchedulerConfig | None:
        return build_config(SchedulerConfig, self.scheduler, {}, where="tune: scheduler") if self.scheduler else None

    def objective_spec(self, eval_metrics: list[str]) -> tuple[str, str, float]:
        """(metric, mode, general_loss_weight): the first eval metric by default, else validation loss."""
        metric = self.objective.get("metric") or (eval_metrics[0] if eval_metrics else "valid_loss")
        mode = self.objective.get("mode") or default_mode(metric)
        if mode not in ("max", "min"):
            raise ConfigError("tune: objective.mode must be max or min")
        return metric, mode, float(self.objective.get("general_loss_weight", 0.0))

    def validate(self, source: str = "tune") -> None:
        if self.select != PipelineConfig().select:
            raise ConfigError(f"{source}: a sweep searches the selection; set it under search (the grid) or searcher, "
                              "not select")
        self.validate_sections(source)
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

    def fingerprint(self) -> str:
        """What makes a run directory's sweep the same sweep (resume) or another one (sections this
        version added count only when given, so sweeps started before it still resume)."""
        settings = {k: v for k, v in asdict(self).items()
                    if k != "select" and not (k in ("searcher", "scheduler") and not v)}
        return digest({**settings, "run_dir": None})
