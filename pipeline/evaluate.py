"""Evaluation on Ray Data: batch generation through model replicas, task metrics, general loss.

    esft eval --model MODEL --adapter runs/train/adapter --data eval.jsonl --metric numeric --out runs/eval.json

Eval rows are the reference format (`{"prompt": str, "answers": [str]}`, prompts already
formatted) or our messages format (the prompt is the reference template up to the last assistant
turn, whose content is the answer). Prompts stream through an actor pool of replicas (the same
placement as profiling) that decode greedily; predictions are cut at the first stop sequence.
Writes the metrics JSON to --out and `<out>.predictions.jsonl` (prompt, prediction, answers) beside it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from esft.generation import generate_batch
from esft.io import atomic_write_text
from esft.metrics import METRICS, score
from pipeline.config import ConfigError, absolute_local_paths

log = logging.getLogger("esft")


@dataclass
class EvalConfig:
    model: str = ""
    data: str = ""
    out: str = ""
    adapter: str | None = None  # an ESFT adapter applied on top of --model
    merged: str | None = None  # or a merged model directory used instead of --model
    metric: list[str] = field(default_factory=lambda: ["exact_match"])
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=lambda: ["\n\n", "User:"])
    batch_size: int = 8
    replicas: int = 1
    gpus_per_replica: float = 0.0
    general_data: str | None = None  # loss / perplexity on a general-domain corpus
    seq_len: int = 1024  # packed row length for the general loss
    lm_eval_tasks: list[str] = field(default_factory=list)  # run lm-eval tasks when it is installed
    tokenizer: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"eval: --{name} is required")
        if self.adapter and self.merged:
            raise ConfigError("eval: give --adapter or --merged, not both")
        unknown = [m for m in self.metric if m not in METRICS]
        if unknown:
            raise ConfigError(f"eval: unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        for name in ("max_new_tokens", "batch_size", "replicas", "seq_len"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"eval: {name} must be a positive integer")
        if self.model.startswith("tiny:") and not self.tokenizer:
            raise ConfigError("eval: built-in tiny models have no tokenizer; pass --tokenizer DIR")

    @property
    def weights(self) -> str:
        return self.merged or self.model


def read_eval_rows(path: str) -> list[dict]:
    """[{"prompt": str, "answers": [str]}] from the reference format or our messages format."""
    from esft.data import PROMPT_ASSISTANT, PROMPT_USER, DataError, parse_record

    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as error:
        raise DataError(f"cannot read eval data {path}: {error}") from error
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from error
        if (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and ("answers" in record or "raw_answers" in record)):
            answers = record.get("answers", record.get("raw_answers"))
            answers = [answers] if isinstance(answers, str) else answers
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise DataError(f"{where}: 'answers' must be a non-empty list of strings")
            rows.append({"prompt": record["prompt"], "answers": answers})
            continue
        messages = parse_record(record, where).messages
        if [m.role for m in messages] != ["user", "assistant"]:
            raise DataError(f"{where}: a messages row for evaluation must be one user turn and its answer; "
                            "use the reference format (prompt, answers) for multi-turn prompts")
        prompt = PROMPT_USER.format(input=messages[0].content.strip()) + PROMPT_ASSISTANT
        rows.append({"prompt": prompt, "answers": [messages[1].content.strip()]})
    if not rows:
        raise DataError(f"{path}: no evaluation rows; give JSONL rows with 'prompt' and 'answers', or 'messages'")
    return rows


def load_evaluated_model(config: EvalConfig):
    """The model under evaluation: --merged weights, or --model plus an ESFT --adapter, spread over
    the GPUs Ray gave this process (if any)."""
    from esft.model import load_model

    device_map = "auto" if config.gpus_per_replica > 0 else None
    model = load_model(config.weights, dtype=config.dtype, trust_remote_code=config.trust_remote_code, device_map=device_map)
    if config.adapter:
        from esft.adapter import load_adapter

        load_adapter(model, config.adapter, master_dtype=None)
    return model.eval()


class Generator:
    """A model replica in the actor pool: prompts in, greedy predictions out."""

    def __init__(self, config: dict, threads: int):
        import torch

        from esft.memory import keep_freed_memory
        from pipeline.data import cached_tokenizer

        keep_freed_memory()  # or every generation step re-faults its temporaries (esft/memory.py)
        self.threads = threads
        self.config = EvalConfig(**config)
        torch.set_num_threads(threads)
        self.model = load_evaluated_model(self.config)
        self.tokenizer = cached_tokenizer(self.config.tokenizer or self.config.model, self.config.trust_remote_code)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        torch.set_num_threads(self.threads)  # Ray Data calls us on its own thread (see pipeline/profile.py)
        texts = generate_batch(self.model, self.tokenizer, list(batch["prompt"]), self.config.max_new_tokens, self.config.stop)
        return {"index": batch["index"], "prediction": np.asarray(texts, dtype=object)}


def general_loss(config: EvalConfig) -> dict:
    """Token-weighted loss and perplexity on a general-domain corpus (forgetting)."""
    import math

    import torch

    from esft.data import (
        collate_rows,
        pack_samples,
        read_conversations,
        tokenize_conversations,
    )
    from esft.training import mean_loss
    from pipeline.data import cached_tokenizer, pad_id_of

    tokenizer = cached_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    model = load_evaluated_model(config)
    device = next(model.parameters()).device
    # Rows longer than the model's context would measure position extrapolation, not forgetting.
    seq_len = min(config.seq_len, getattr(model.config, "max_position_embeddings", None) or config.seq_len)
    rows = pack_samples(tokenize_conversations(read_conversations(config.general_data), tokenizer), seq_len,
                        pad_id=pad_id_of(tokenizer), bos_id=tokenizer.bos_token_id, random_concat_ratio=0.0)
    batches = [{k: v.to(device) for k, v in collate_rows(rows[i:i + config.batch_size]).items()}
               for i in range(0, len(rows), config.batch_size)]
    with torch.inference_mode():
        loss = mean_loss(model, batches)
    return {"general_loss": loss, "general_perplexity": math.exp(loss)}


def run_lm_eval(config: EvalConfig) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise ConfigError("eval: --lm-eval-tasks needs lm-eval; `pip install lm-eval` (and its task data)") from error
    from esft.trainable import merge_adapter
    from pipeline.data import cached_tokenizer

    model = merge_adapter(load_evaluated_model(config))  # lm-eval drives a plain transformers model
    tokenizer = cached_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=config.lm_eval_tasks)
    return {"lm_eval": results["results"]}


def run_eval(config: EvalConfig) -> dict:
    """Validate, generate on Ray Data, score, write metrics and predictions."""
    config.validate()
    absolute_local_paths(config, "model", "tokenizer", "adapter", "merged")
    rows = read_eval_rows(config.data)
    if config.adapter:
        from esft.adapter import check_adapter
        from esft.model import load_skeleton

        check_adapter(load_skeleton(config.model, trust_remote_code=config.trust_remote_code), config.adapter)
    if config.lm_eval_tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError as error:
            raise ConfigError("eval: --lm-eval-tasks needs lm-eval; `pip install lm-eval` (and its task data)") from error
    from ray.data import ActorPoolStrategy

    from pipeline.cluster import ensure_ray, placement_for

    ensure_ray()
    placement = placement_for(config.replicas, config.gpus_per_replica, None, reading_cpus=0)  # rows come from memory
    started = time.perf_counter()
    import ray

    dataset = ray.data.from_items([{"index": i, "prompt": r["prompt"]} for i, r in enumerate(rows)]).map_batches(
        Generator, batch_size=config.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=config.replicas), num_cpus=placement["num_cpus"],
        num_gpus=config.gpus_per_replica or None,
        fn_constructor_kwargs={"config": asdict(config), "threads": placement["threads"]},
    )
    predictions = [""] * len(rows)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for index, prediction in zip(batch["index"], batch["prediction"]):
            predictions[int(index)] = str(prediction)
    metrics = {"n": len(rows), **score(predictions, [r["answers"] for r in rows], config.metric),
               "generation_seconds": time.perf_counter() - started}
    # Both load the model: run them where a replica would run (on the GPU nodes, not the driver).
    # "DEFAULT" scheduling: inside a Tune trial, tasks would otherwise be confined to the trial's own
    # (deliberately empty) placement group.
    resources = {"num_cpus": placement["num_cpus"], "scheduling_strategy": "DEFAULT",
                 **({"num_gpus": config.gpus_per_replica} if config.gpus_per_replica else {})}
    on_replica = ray.remote(**resources)
    if config.general_data:
        metrics.update(ray.get(on_replica(general_loss).remote(config)))
    if config.lm_eval_tasks:
        metrics.update(ray.get(on_replica(run_lm_eval).remote(config)))
    out = Path(config.out)
    predictions_file = out.with_suffix(".predictions.jsonl")
    atomic_write_text(predictions_file, "".join(
        json.dumps({"prompt": r["prompt"], "prediction": p, "answers": r["answers"]}) + "\n" for r, p in zip(rows, predictions)))
    metrics["config"] = asdict(config)
    atomic_write_text(out, json.dumps(metrics, indent=1))
    log.info("eval: %s on %d rows -> %s (predictions: %s)",
             ", ".join(f"{m} {metrics[m]:.4f}" for m in config.metric), len(rows), out, predictions_file)
    return metrics
