"""The core ESFT path on the embedded default, on one machine, in about a minute, without Ray:

    esft quickstart --out runs/quickstart

generate the math task (held out of mini-moe's pretraining) -> load mini-moe -> profile expert
routing -> select experts (token score, p = 0.2) -> train only those experts -> save the adapter ->
merge it into a plain Hugging Face model and check the merged logits against the trained model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esft.demo import synthetic
from esft.adapter import adapter_summary, load_adapter, save_adapter
from esft.data import collate_rows, pack_samples, read_conversations, tokenize_conversations
from esft.io import atomic_directory, atomic_write_text
from esft.numerics import Tolerance, forward_tolerance
from esft.demo.pretrain import ASSET_DIR
from esft.scores import SCORES_FILENAME, SUMMARY_FILENAME, empty_scores_for, profile_batch
from esft.select import CONFIG_FILENAME, load_layer_scores, select_experts
from esft.trainable import apply_expert_config, merge_adapter
from esft.training import make_optimizer, mean_loss, train_step

log = logging.getLogger("esft")

SEQ_LENGTH = 128
BATCH_ROWS = 4
TOP_P = 0.2
LEARNING_RATE = 3e-3  # mini-moe needs more than the paper's 1e-5 (for 16B models) to move in a few hundred steps
SEED = 0


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def _batches(rows, size: int) -> list[dict[str, torch.Tensor]]:
    return [collate_rows(rows[i : i + size]) for i in range(0, len(rows), size)]


def _check_merged(trained, merged, probe: torch.Tensor) -> tuple[float, Tolerance]:
    """The merged model must compute what the trained one does. Its fused experts kernel groups
    the sums differently from the trained model's selective one, so the logits agree within the
    rounding tolerance (bit for bit on some CPUs only); a real merge error is far larger."""
    with torch.no_grad():
        expected, actual = trained.eval()(probe).logits, merged.eval()(probe).logits
    tolerance = forward_tolerance(trained)
    max_diff = (actual - expected).abs().max().item()
    if not tolerance.allows(actual, expected):
        raise RuntimeError(f"merged model differs from the trained model (max |logit diff| {max_diff:.3g}, "
                           f"beyond the rounding tolerance rtol = atol = {tolerance.rtol:.3g}); please report this bug")
    return max_diff, tolerance


def run_quickstart(out: Path, steps: int = 200, overwrite: bool = False) -> dict:
    started = time.perf_counter()
    torch.manual_seed(SEED)
    with atomic_directory(out, overwrite=overwrite) as run:
        # 1. data: the math task, train and held-out split
        train_file = _write_jsonl(run / "data" / "train.jsonl", synthetic.rows("math", 540, seed=SEED))
        valid_file = _write_jsonl(run / "data" / "valid.jsonl", synthetic.rows("math", 60, seed=SEED, split="eval"))

        # 2. the base model: mini-moe, a standard Hugging Face directory inside the package
        model = AutoModelForCausalLM.from_pretrained(ASSET_DIR, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(ASSET_DIR)
        log.info("[1/5] base model: mini-moe, %d parameters (%s)", model.num_parameters(), ASSET_DIR)

        def packed(path):
            samples = tokenize_conversations(read_conversations(path), tokenizer)
            return pack_samples(samples, SEQ_LENGTH, pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id, seed=SEED)

        train_rows, valid_rows = packed(train_file), packed(valid_file)

        # 3. profile routing on the training data, then select experts
        scores = empty_scores_for(model, {"data": str(train_file), "seed": SEED})
        for batch in _batches(train_rows, BATCH_ROWS):
            profile_batch(model, batch["input_ids"], batch["attention_mask"], into=scores)
        scores.save(run / "profile" / SCORES_FILENAME)
        atomic_write_text(run / "profile" / SUMMARY_FILENAME, json.dumps(scores.to_summary()))
        log.info("[2/5] profiled %d tokens over %d MoE layers -> %s", scores.total_tokens, len(scores.layers), out / "profile")

        config = select_experts(load_layer_scores(run / "profile", "token"), top_p=TOP_P)
        config.save(run / CONFIG_FILENAME)
        log.info("[3/5] selected %d of %d routed experts (token score, p = %s)", config.num_selected,
                 scores.num_experts * len(scores.layers), TOP_P)

        # 4. train only the selected experts
        summary = apply_expert_config(model, config)
        optimizer = make_optimizer(model, LEARNING_RATE)
        train_batches, valid_batches = _batches(train_rows, BATCH_ROWS), _batches(valid_rows, BATCH_ROWS)
        valid_before = mean_loss(model, valid_batches)
        for step in range(1, steps + 1):
            loss = train_step(model, train_batches[(step - 1) % len(train_batches)], optimizer)
            if step % 10 == 0 or step == steps:
                log.info("      step %d/%d  loss %.4f", step, steps, loss)
        valid_after = mean_loss(model, valid_batches)
        log.info(
            "[4/5] trained %d parameters (%.1f%% of the model); validation loss %.4f -> %.4f",
            summary.trainable_parameters, 100 * summary.trainable_fraction, valid_before, valid_after,
        )

        # 5. adapter, then a merged standalone model, checked against the trained one
        save_adapter(model, run / "adapter", config)
        reloaded = AutoModelForCausalLM.from_pretrained(ASSET_DIR, dtype=torch.float32)
        load_adapter(reloaded, run / "adapter")
        merge_adapter(reloaded).save_pretrained(run / "merged")
        tokenizer.save_pretrained(run / "merged")
        max_diff, tolerance = _check_merged(model, reloaded, valid_batches[0]["input_ids"])
        report = {
            "selected_experts": config.num_selected,
            "trainable_parameters": summary.trainable_parameters,
            "trainable_fraction": summary.trainable_fraction,
            "valid_loss_before": valid_before,
            "valid_loss_after": valid_after,
            "adapter_bytes": adapter_summary(run / "adapter")["bytes"],
            "merged_logits_max_abs_diff": max_diff,
            "merged_logits_tolerance": {"rtol": tolerance.rtol, "atol": tolerance.atol},
            "seconds": round(time.perf_counter() - started, 1),
        }
        atomic_write_text(run / "report.json", json.dumps(report, indent=2))
    log.info("[5/5] adapter (%d bytes) -> %s ; merged model -> %s", report["adapter_bytes"], out / "adapter", out / "merged")
    log.info("done in %.1fs. Next: esft inspect %s ; esft merge --model %s --adapter %s --out merged/",
             report["seconds"], out / "merged", ASSET_DIR, out / "adapter")
    return report
