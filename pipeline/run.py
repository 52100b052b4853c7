"""The whole pipeline in one command:

    esft run --config configs/quickstart.yaml

profile -> select -> train -> evaluate -> register, each stage writing its artifact under the
run directory (select, train and evaluate are the functions every sweep trial calls too:
pipeline/stages.py). A stage whose inputs are unchanged since it last completed is skipped, so a
rerun after Ctrl-C or a killed driver resumes at the first incomplete stage (training itself
resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from esft.io import atomic_write_text
from pipeline.cache_keys import content_hash, digest, keyed, model_fingerprint
from pipeline.config import ConfigError, build_config

log = logging.getLogger("esft")
EMBEDDED = "embedded"


@dataclass
class SelectConfig:
    """The `select` section: ESFT's rule (the smallest set of experts per layer whose scores reach
    top_p of the layer's total), or a fixed number of experts per layer."""

    score_function: str = "token"  # token (ESFT-Token) or gate (ESFT-Gate)
    top_p: float | None = None  # the paper: 0.2 for token, 0.1 for gate
    experts_per_layer: int | None = None  # the fixed-budget alternative

    def validate(self, where: str) -> None:
        from esft.select import SCORE_FUNCTIONS, SelectionError, check_top_p

        if self.score_function not in SCORE_FUNCTIONS:
            raise ConfigError(f"{where}: score_function must be token or gate, got {self.score_function!r}")
        if (self.top_p is None) == (self.experts_per_layer is None):
            raise ConfigError(f"{where}: give exactly one of top_p (e.g. 0.2 for token, 0.1 for gate) or experts_per_layer")
        if self.top_p is not None:
            try:
                check_top_p(self.top_p)
            except SelectionError as error:
                raise ConfigError(f"{where}: {error}") from error
        if self.experts_per_layer is not None and self.experts_per_layer < 1:
            raise ConfigError(f"{where}: experts_per_layer must be a positive integer, got {self.experts_per_layer}")


@dataclass
class PipelineConfig:
    """`esft run`'s config file: the model and data, and one section per stage."""

    REGISTER_SETTINGS: ClassVar[frozenset[str]] = frozenset({"model_name", "metric", "tracking_uri"})

    name: str = "esft"
    run_dir: str = "runs/esft"
    model: str = EMBEDDED  # a hub id / directory, or "embedded": the project's default model and corpora
    train_data: str | None = None
    eval_data: str | None = None
    general_data: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    profile: dict = field(default_factory=dict)  # ProfileConfig settings
    select: dict = field(default_factory=lambda: {"score_function": "token", "top_p": 0.2})
    train: dict = field(default_factory=dict)  # TrainConfig settings
    eval: dict = field(default_factory=dict)  # EvalConfig settings
    register: dict = field(default_factory=dict)  # model_name, metric, tracking_uri, log_base_model, log_merged

    def selection(self, source: str = "run") -> SelectConfig:
        selection = build_config(SelectConfig, self.select, {}, where=f"{source}: select")
        selection.validate(f"{source}: select")
        return selection

    def stage_configs(self, model: str, data: dict, run: Path, source: str = "run"):
        """The typed config of every stage (unknown keys and wrong types in a section fail here,
        before any work); `source` (the config file) prefixes their errors."""
        from pipeline.evaluate import EvalConfig
        from pipeline.profile import ProfileConfig
        from pipeline.train import TrainConfig

        tokenizer, remote = self.tokenizer or model, self.trust_remote_code
        profile = build_config(ProfileConfig, self.profile, {"model": model, "data": [data["train_data"]],
                               "out": str(run / "profile"), "tokenizer": tokenizer, "overwrite": True,
                               "trust_remote_code": remote}, where=f"{source}: profile")
        train = build_config(TrainConfig, self.train, {"model": model, "data": data["train_data"], "out": str(run / "train"),
                             "expert_config": str(run / "select" / "expert_cfg.json"), "general_data": data["general_data"],
                             "tokenizer": tokenizer, "trust_remote_code": remote}, where=f"{source}: train")
        evaluate = build_config(EvalConfig, self.eval, {"model": model, "adapter": str(run / "train" / "adapter"),
                                "data": data["eval_data"], "out": str(run / "eval" / "metrics.json"),
                                "general_data": data["general_data"], "tokenizer": tokenizer, "trust_remote_code": remote},
                                where=f"{source}: eval")
        return profile, train, evaluate

    def inputs(self, run: Path) -> dict:
        """The model and data files the stages will read: the user's, or where the embedded
        default's are written (by the assets stage)."""
        if self.model == EMBEDDED:
            return embedded_inputs(run / "assets")
        return {"model": self.model, "train_data": self.train_data, "eval_data": self.eval_data,
                "general_data": self.general_data}

    def validate(self, source: str = "run") -> None:
        """Every section as a whole, before any compute or any file is written."""
        self.selection(source)
        self.validate_sections(source)

    def validate_sections(self, source: str) -> None:
        """The inputs, the register section and every stage's settings (all but the selection)."""
        if self.model != EMBEDDED and not (self.train_data and self.eval_data):
            raise ConfigError(f"{source}: give train_data and eval_data (or use model: embedded)")
        from pipeline.register import check_register_settings

        check_register_settings(self.register, set(self.REGISTER_SETTINGS), where=source)
        run = Path(self.run_dir).resolve()
        inputs = self.inputs(run)
        for stage_config in self.stage_configs(inputs["model"], inputs, run, source):
            try:
                stage_config.validate()
            except ConfigError as error:
                raise ConfigError(f"{source}: {error}") from error


# Each stage's settings that name data files (hashed by content) and models (fingerprinted).
STAGE_DATA = ("data", "general_data", "expert_config")
STAGE_MODELS = ("model", "tokenizer", "adapter")


def stage_key(settings: dict) -> str:
    """The cache key of a stage: its settings, with its input files by content and its models by
    fingerprint, so a file regenerated in place (same path, new rows) makes the stage run again."""
    return digest(keyed(settings, data=[k for k in STAGE_DATA if k in settings],
                        models=[k for k in STAGE_MODELS if k in settings]))


def stage(run_dir: Path, name: str, key: str, work: Callable[[], object]) -> dict:
    """Run `work` unless this stage already completed with the same inputs (`key`, from
    `stage_key`: computed once by the caller, since it reads the stage's data files); returns its
    record."""
    marker = run_dir / "stages" / f"{name}.json"
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("inputs") == key:
            log.info("[%s] up to date, skipped", name)
            return record
    started = time.perf_counter()
    log.info("[%s] running", name)
    result = work()
    record = {"inputs": key, "seconds": round(time.perf_counter() - started, 1), "result": result}
    atomic_write_text(marker, json.dumps(record, indent=1, default=str))
    return record


def embedded_inputs(out: Path) -> dict:
    """Where `prepare_embedded(out)` puts the embedded default's model and data."""
    from esft.demo.pretrain import ASSET_DIR

    data = out / "data"
    return {"model": str(ASSET_DIR), "train_data": str(data / "train.jsonl"), "eval_data": str(data / "eval.jsonl"),
            "general_data": str(data / "general.jsonl")}


def prepare_embedded(out: Path) -> dict:
    """The embedded default: mini-moe (shipped inside the package) and the math task its
    pretraining held out (train / eval), plus general-domain rows for forgetting, generated from
    fixed seeds."""
    from esft.demo import synthetic
    from esft.demo.pretrain import ASSET_DIR

    if not (ASSET_DIR / "model.safetensors").exists():
        raise ConfigError(f"the embedded model is missing at {ASSET_DIR}; "
                          "rebuild it with `esft pretrain` or reinstall the package")
    inputs = embedded_inputs(out)
    splits = {"train_data": synthetic.rows("math", 1100, seed=0), "eval_data": synthetic.rows("math", 64, seed=0, split="eval"),
              "general_data": synthetic.rows(synthetic.GENERAL, 200, seed=0, split="eval")}
    for name, rows in splits.items():
        atomic_write_text(Path(inputs[name]), "".join(json.dumps(r) + "\n" for r in rows))
    return inputs


def gain_lines(baseline: dict, tuned: dict, metrics: list[str]) -> list[str]:
    """`vanilla -> fine-tuned` for each task metric and for the general-domain loss (forgetting)."""
    lines = [f"{m}: vanilla {baseline[m]:.4f} -> fine-tuned {tuned[m]:.4f} ({tuned[m] - baseline[m]:+.4f})"
             for m in metrics if m in baseline and m in tuned]
    if "general_loss" in baseline and "general_loss" in tuned:
        lines.append(f"general-domain loss: vanilla {baseline['general_loss']:.4f} -> fine-tuned {tuned['general_loss']:.4f} "
                     f"({tuned['general_loss'] - baseline['general_loss']:+.4f} nats)")
    return lines


def run_pipeline(config: PipelineConfig, source: str = "run") -> dict:
    """The whole pipeline; `source` (the config file) names where a settings error comes from."""
    from pipeline import stages
    from pipeline.profile import run_profile
    from pipeline.register import register_adapter

    config.validate(source)
    selection = config.selection(source)
    run = Path(config.run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    if config.model == EMBEDDED:
        # Regenerated when the package's model or corpus generator changes (an upgrade).
        from esft.demo import synthetic
        from esft.demo.pretrain import ASSET_DIR

        embedded = {"embedded": "mini-moe", "model": model_fingerprint(str(ASSET_DIR)),
                    "generator": content_hash(synthetic.__file__)}
        inputs = stage(run, "assets", stage_key(embedded), lambda: prepare_embedded(run / "assets"))["result"]
    else:
        inputs = config.inputs(run)
    model = inputs["model"]
    profile_cfg, train_cfg, eval_cfg = config.stage_configs(model, inputs, run, source)
    profile_key = stage_key(asdict(profile_cfg))
    stage(run, "profile", profile_key, lambda: len(run_profile(profile_cfg)))

    expert_cfg = run / "select" / "expert_cfg.json"

    def select() -> int:
        chosen = stages.select(run / "profile", selection.score_function, selection.top_p, selection.experts_per_layer)
        chosen.save(expert_cfg)
        return chosen.num_selected

    selected = stage(run, "select", stage_key({"profile": profile_key, **asdict(selection)}), select)["result"]

    train_key = stage_key({"select": selected, **asdict(train_cfg), "resume": None})

    def train() -> dict:
        metrics = stages.train(train_cfg, train_key)
        return {k: metrics[k] for k in ("final_valid_loss", "final_general_loss", "trainable_parameters", "wall_seconds")}

    trained = stage(run, "train", train_key, train)["result"]

    evaluated = stage(run, "eval", stage_key({"train": trained, **asdict(eval_cfg)}), lambda: stages.evaluate(eval_cfg))["result"]
    # The same evaluation of the base model, so the run shows what fine-tuning changed.
    baseline_cfg = replace(eval_cfg, adapter=None, out=str(run / "eval" / "baseline.json"))
    baseline = stage(run, "baseline", stage_key(asdict(baseline_cfg)), lambda: stages.evaluate(baseline_cfg))["result"]

    register_cfg = {"model_name": config.name, "metric": eval_cfg.metric[0], **config.register}

    def register() -> dict:
        from esft.adapter import adapter_summary
        from pipeline.register import ModelLogging

        registration = register_adapter(
            run / "train" / "adapter", model_name=register_cfg["model_name"], run_dir=run, metric_name=register_cfg["metric"],
            metrics={**evaluated, **{k: v for k, v in trained.items() if isinstance(v, (int, float))}},
            params={**{k: v for k, v in asdict(selection).items() if v is not None}, "selected_experts": selected,
                    "method": train_cfg.method, "base_model": model},
            tags={"base_model": model, "family": adapter_summary(run / "train" / "adapter")["family"],
                  "score_function": selection.score_function,
                  "top_p": str(selection.top_p), "selected_experts": str(selected), "task": Path(inputs["train_data"]).stem},
            tracking_uri=register_cfg.get("tracking_uri"), base_model=model, tokenizer=config.tokenizer,
            options=ModelLogging.from_settings(register_cfg), trust_remote_code=config.trust_remote_code,
        )
        return asdict(registration)

    registered = stage(run, "register", stage_key({"eval": evaluated, **register_cfg}), register)["result"]
    summary = {"run_dir": str(run), "selected_experts": selected, **trained, **evaluated, "baseline": baseline,
               "registered": registered}
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=1, default=str))
    log.info("done: %d experts selected; registered %s v%s (champion: %s)", selected, registered["name"], registered["version"],
             registered["champion"])
    for line in gain_lines(baseline, evaluated, eval_cfg.metric):
        log.info("%s", line)
    log.info("artifacts: %s/{profile,select,train,eval}; MLflow UI: mlflow ui --backend-store-uri %s", run,
             registered["tracking_uri"])
    return summary
