"""Distributed expert profiling on Ray Data.

    esft profile --model deepseek-ai/DeepSeek-V2-Lite --data datasets/train/intent.jsonl --out runs/profile

Ray Data reads and shuffles each corpus (seeded), tokenizes and packs it in CPU tasks, and
streams the packed rows through an actor pool of model replicas (each loads the model once; a
replica may span several GPUs, layers split across them). Every batch comes back as small
per-row raw sums, which the driver merges in the stream's fixed order until the token budget is
reached. The corpus is never gathered on the driver.

Replica independence, exactly: packing depends on the corpus size alone, and Ray Data bundles
the packed stream, in order, into batches of --batch-size rows before it hands them to replicas,
so every row is computed in the same batch whatever the replica count. With a fixed thread count
per replica (`threads_per_replica`; GPU replicas compute the same way whatever it is) each batch
is the same computation, so 1 or 8 replicas give bit-identical sums. By default CPU replicas
share the node's cores (threads = cores / replicas); another thread count splits the GEMMs
differently, which on some CPUs rounds router weights differently (relative ~1e-7, see
`esft.numerics`): gate mass may then differ in its last digits, and a selection only where two
experts' router scores tie within that rounding.

Outputs in --out (in --out/<task> when several corpora are given): `expert_scores.json` (raw,
mergeable sums), the reference `summary.json`, `heatmap_token.png` / `heatmap_gate.png`,
`concentration.md` / `.json`; with several corpora also `overlap.md` / `.json`. Selection is
its own stage: `esft select --scores DIR ...`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from esft.io import atomic_directory, atomic_write_text
from esft.report import concentration_markdown, concentration_table, overlap, save_heatmaps
from esft.scores import SCORES_FILENAME, SUMMARY_FILENAME, ExpertScores, RowSums, ScoresError, add_rows
from pipeline.cluster import auto_cpu_replicas, ensure_ray, placement_for
from pipeline.config import ConfigError, absolute_local_paths
from pipeline.data import Source, check_readable, packed_dataset, resolve_source, unique_task_names

log = logging.getLogger("esft")


@dataclass
class ProfileConfig:
    model: str = ""
    data: list[str] = field(default_factory=list)
    out: str = ""
    n_sample_tokens: int = 131072  # the paper: 32 rows x 4096 tokens
    seq_len: int = 4096
    batch_size: int = 4
    replicas: int | None = None  # None: 1 with GPUs; on CPUs `auto_cpu_replicas` (by budget, up to one per CPU)
    gpus_per_replica: float = 0.0
    cpus_per_replica: float | None = None  # default: leave one CPU of the node for reading
    threads_per_replica: int | None = None  # CPU replicas; default: the node's cores / replicas (see above)
    seed: int = 0
    loss_tokens_only: bool = False
    template: str = "reference"  # or "chat": the tokenizer's chat template
    tokenizer: str | None = None  # default: the model's own
    dtype: str = "auto"
    trust_remote_code: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("profile: --model is required")
        if not self.data:
            raise ConfigError("profile: give at least one --data corpus")
        if not self.out:
            raise ConfigError("profile: --out is required")
        for name in ("n_sample_tokens", "seq_len", "batch_size", "replicas"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"profile: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.threads_per_replica is not None and int(self.threads_per_replica) < 1:
            raise ConfigError(f"profile: threads_per_replica must be a positive integer, got {self.threads_per_replica!r}")
        if self.gpus_per_replica < 0:
            raise ConfigError("profile: gpus_per_replica must be >= 0")
        if self.template not in ("reference", "chat"):
            raise ConfigError(f"profile: template must be 'reference' or 'chat', got {self.template!r}")
        if self.model.startswith("tiny:") and not self.tokenizer:
            raise ConfigError("profile: built-in tiny models have no tokenizer; pass --tokenizer DIR")


class RoutingProfiler:
    """A model replica in the actor pool: packed rows in, per-row routing sums out."""

    def __init__(self, config: dict):
        from esft.memory import keep_freed_memory
        from esft.model import load_model

        keep_freed_memory()  # or every batch re-faults its temporaries (esft/memory.py): ~25% of the CPU
        self.threads = config["threads"]
        device_map = "auto" if config["gpus_per_replica"] > 0 else None
        self.model = load_model(config["model"], dtype=config["dtype"], trust_remote_code=config["trust_remote_code"],
                                device_map=device_map).eval()
        self.device = next(self.model.parameters()).device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from esft.scores import profile_rows

        # Ray Data runs this method on its own worker thread, and OpenMP thread counts are
        # per-thread state (Ray starts workers with OMP_NUM_THREADS=1): set it where we compute.
        torch.set_num_threads(self.threads)

        def tensor(name):
            return torch.from_numpy(np.array(batch[name], dtype=np.int64)).to(self.device)

        sums = profile_rows(self.model, tensor("input_ids"), tensor("attention_mask"), tensor("token_mask"))
        return {
            "tokens": sums.tokens_BL,
            "selections": sums.selections_BLE,
            "gate_mass_fixed": sums.gate_mass_fixed_BLE,
            "skipped_rows": batch["skipped_rows"],
            "skipped_example": batch["skipped_example"],
        }


@dataclass
class TaskProfile:
    task: str
    source: str
    scores: ExpertScores
    skipped_rows: int
    skipped_example: str
    seconds: float  # from building the pipeline to the last merged row

    @property
    def tokens_per_second(self) -> float:
        return self.scores.total_tokens / max(self.seconds, 1e-9)


def profiling_stream(config: ProfileConfig, source: Source):
    """The corpus's packed rows through the replica pool: per-row routing sums, in the stream's order."""
    from ray.data import ActorPoolStrategy

    placement = placement_for(config.replicas, config.gpus_per_replica, config.cpus_per_replica, config.threads_per_replica)
    return packed_dataset(
        source, tokenizer=config.tokenizer or config.model, trust_remote_code=config.trust_remote_code,
        template=config.template, seq_len=config.seq_len, seed=config.seed, max_tokens=config.n_sample_tokens,
        loss_tokens_only=config.loss_tokens_only, batch_size=config.batch_size,
    ).map_batches(
        RoutingProfiler,
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=config.replicas),
        num_cpus=placement["num_cpus"],
        num_gpus=config.gpus_per_replica or None,
        fn_constructor_kwargs={"config": {**asdict(config), "threads": placement["threads"]}},
    )


def profile_task(config: ProfileConfig, source: Source, template_scores: ExpertScores) -> TaskProfile:
    """Stream one corpus through the replicas until the token budget is reached."""
    dataset = profiling_stream(config, source)
    scores = ExpertScores.empty(template_scores.layers, template_scores.num_experts, template_scores.top_k,
                                dict(template_scores.metadata))
    started, last_report, rows_used, skipped, example = time.perf_counter(), 0.0, 0, 0, ""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        skipped += int(batch["skipped_rows"].sum())
        example = example or next((str(e) for e in batch["skipped_example"] if e), "")
        rows = RowSums(batch["tokens"], batch["selections"], batch["gate_mass_fixed"])
        for b in range(len(rows)):
            if scores.total_tokens >= config.n_sample_tokens:
                break
            add_rows(scores, rows.row(b))
            rows_used += int(rows.tokens_BL[b, 0] > 0)  # not the all-padding row that only carries a skip count
        now = time.perf_counter()
        if now - last_report > 5:
            last_report = now
            log.info("  %s: %d rows, %d/%d tokens, %.0f tokens/s", source.task, rows_used, scores.total_tokens,
                     config.n_sample_tokens, scores.total_tokens / (now - started))
        if scores.total_tokens >= config.n_sample_tokens:
            break
    seconds = time.perf_counter() - started
    if scores.total_tokens == 0:
        raise ScoresError(f"{source.spec}: no usable tokens to profile "
                          f"(skipped {skipped} malformed rows{': ' + example if example else ''})")
    if scores.total_tokens < config.n_sample_tokens:
        log.warning("  %s: the corpus holds only %d of the %d tokens asked for; profiled all of it",
                    source.task, scores.total_tokens, config.n_sample_tokens)
    if skipped:
        log.warning("  %s: skipped %d malformed rows, e.g. %s", source.task, skipped, example)
    scores.metadata.update({
        "data": source.spec, "task": source.task, "seed": config.seed, "seq_len": config.seq_len,
        "n_sample_tokens": config.n_sample_tokens, "tokens_used": scores.total_tokens, "rows_used": rows_used,
        "loss_tokens_only": config.loss_tokens_only, "template": config.template, "skipped_rows": skipped,
    })
    return TaskProfile(source.task, source.spec, scores, skipped, example, seconds)


def write_task_outputs(result: TaskProfile, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result.scores.save(out_dir / SCORES_FILENAME)
    atomic_write_text(out_dir / SUMMARY_FILENAME, json.dumps(result.scores.to_summary()))
    table = concentration_table(result.scores)
    atomic_write_text(out_dir / "concentration.json", json.dumps(table, indent=1))
    atomic_write_text(out_dir / "concentration.md", concentration_markdown(table, result.task))
    save_heatmaps(result.scores, out_dir, result.task)


def overlap_report(results: list[TaskProfile]) -> tuple[dict, str]:
    """Selected experts (token p = 0.2) shared by each pair of tasks, per layer."""
    pairs = {}
    lines = ["# Expert overlap between tasks (token score, p = 0.2)", "",
             "| tasks | shared experts per layer | mean shared | mean selected (a, b) |", "|---|---|---|---|"]
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            shared = overlap(a.scores, b.scores)
            pairs[f"{a.task}|{b.task}"] = shared
            sel_a = concentration_table(a.scores)["token"]["0.2"]
            sel_b = concentration_table(b.scores)["token"]["0.2"]
            lines.append(f"| {a.task} / {b.task} | {' '.join(map(str, shared))} | {np.mean(shared):.2f} | "
                         f"{np.mean(sel_a):.2f}, {np.mean(sel_b):.2f} |")
    return {"top_p": 0.2, "score_function": "token", "pairs": pairs}, "\n".join(lines) + "\n"


def run_profile(config: ProfileConfig) -> list[TaskProfile]:
    """Validate everything, profile every corpus, then write all outputs at once."""
    config.validate()
    absolute_local_paths(config, "model", "tokenizer")
    sources = unique_task_names([resolve_source(spec) for spec in config.data])
    for source in sources:
        check_readable(source)
    template, model_bytes = _empty_scores_for_model(config)
    from pipeline.data import cached_tokenizer

    cached_tokenizer(config.tokenizer or config.model, config.trust_remote_code)  # fail now, not in a worker
    with atomic_directory(config.out, overwrite=config.overwrite) as tmp:
        ensure_ray()
        config = with_replica_count(config, model_bytes)
        results = []
        for source in sources:
            log.info("profiling %s (%s) on %s, budget %d tokens", source.task, source.spec, config.model, config.n_sample_tokens)
            result = profile_task(config, source, template)
            results.append(result)
            log.info("  %s: %d tokens in %d rows, %.1fs (%.0f tokens/s)", result.task, result.scores.total_tokens,
                     result.scores.metadata["rows_used"], result.seconds, result.tokens_per_second)
        several = len(results) > 1
        for result in results:
            write_task_outputs(result, tmp / result.task if several else tmp)
        if several:
            report, markdown = overlap_report(results)
            atomic_write_text(tmp / "overlap.json", json.dumps(report, indent=1))
            atomic_write_text(tmp / "overlap.md", markdown)
    total = sum(r.scores.total_tokens for r in results)
    log.info("profiled %d corpora, %d tokens -> %s ; "
             "next: esft select --scores %s --score-function token --top-p 0.2 --out expert_cfg.json",
             len(results), total, config.out, Path(config.out) / results[0].task if len(results) > 1 else config.out)
    return results


def with_replica_count(config: ProfileConfig, model_bytes: int) -> ProfileConfig:
    """`config` with its replica count settled (the user's, or the default), said in the log."""
    if config.replicas is not None:
        return config
    if config.gpus_per_replica > 0:
        return replace(config, replicas=1)
    replicas = auto_cpu_replicas(config.n_sample_tokens, model_bytes)
    threads = placement_for(replicas, 0.0, config.cpus_per_replica, config.threads_per_replica)["threads"]
    log.info("%d CPU replica(s) x %d thread(s) (set --replicas to choose)", replicas, threads)
    return replace(config, replicas=replicas)


def _empty_scores_for_model(config: ProfileConfig) -> tuple[ExpertScores, int]:
    """Shape the scores from the model's structure alone (no weights) and check it is MoE; also the
    model's size in bytes (at the skeleton's dtype)."""
    from esft.families import family_of, moe_layers, num_experts, top_k
    from esft.model import load_skeleton

    skeleton = load_skeleton(config.model, trust_remote_code=config.trust_remote_code)
    layers = moe_layers(skeleton)
    metadata = {"model": config.model, "family": family_of(skeleton).name}
    scores = ExpertScores.empty(tuple(layer.index for layer in layers), num_experts(layers[0]), top_k(layers[0]), metadata)
    return scores, sum(p.numel() * p.dtype.itemsize for p in skeleton.parameters())
