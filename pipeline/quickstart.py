"""The core ESFT path on the embedded default, on one machine, in under a minute:

    esft quickstart --out runs/quickstart

generate a task corpus -> build the default model -> profile expert routing -> select experts
(token score, p = 0.2) -> train only those experts -> save the adapter -> merge it into a plain
Hugging Face model and check the merged logits against the trained model.

The embedded default is a tiny DeepSeek-V2-architecture MoE built from a config, with a
byte-level BPE tokenizer trained on the corpus. Its weights are random, so the routing it shows
is not specialised: this demonstrates the mechanics, not the method's benefit.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from esft.adapter import adapter_summary, load_adapter, save_adapter
from esft.data import collate_rows, pack_samples, read_conversations, tokenize_conversations
from esft.io import atomic_directory, atomic_write_text
from esft.scores import SCORES_FILENAME, SUMMARY_FILENAME, empty_scores_for, profile_batch
from esft.select import CONFIG_FILENAME, load_layer_scores, select_experts
from esft.tiny import tiny_model, tiny_tokenizer
from esft.trainable import apply_expert_config, merge_adapter
from esft.training import make_optimizer, mean_loss, train_step

log = logging.getLogger("esft")

FAMILY = "deepseek_v2"
SEQ_LENGTH = 128
BATCH_ROWS = 4
TOP_P = 0.2
LEARNING_RATE = 1e-3  # a random tiny model needs more than the paper's 1e-5 to move in a few hundred steps
SEED = 0


def arithmetic_corpus(n: int, seed: int) -> list[dict]:
    """Word problems with numeric answers, in the ESFT messages format (deterministic)."""
    rng = random.Random(seed)
    ops = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        word, fn = rng.choice(ops)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tom has {a} apples. What is {a} {word} {b}?"},
                    {"role": "assistant", "content": f"{a} {word} {b} is {fn(a, b)}. The answer is {fn(a, b)}."},
                ]
            }
        )
    return rows


def general_corpus(n: int, seed: int) -> list[dict]:
    """A general-domain mixture (greetings, facts, descriptions) whose loss tracks forgetting."""
    rng = random.Random(seed)
    names = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
    places = ["the park", "the library", "the market", "the river", "the station", "the garden"]
    things = ["a red kite", "an old map", "a warm coat", "a small boat", "a green lamp", "a blue cup"]
    templates = [
        (lambda: f"Say hello to {rng.choice(names)}.", lambda q: f"Hello, {q.split()[-1].rstrip('.')}! Nice to meet you."),
        (lambda: f"Where did {rng.choice(names)} go today?", lambda q: f"{q.split()[2]} went to {rng.choice(places)}."),
        (lambda: f"Describe {rng.choice(things)}.", lambda q: f"It is {q[9:].rstrip('.')}, simple and useful."),
    ]
    rows = []
    for _ in range(n):
        ask, answer = rng.choice(templates)
        question = ask()
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer(question)}]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def _batches(rows, size: int) -> list[dict[str, torch.Tensor]]:
    return [collate_rows(rows[i : i + size]) for i in range(0, len(rows), size)]


def run_quickstart(out: Path, steps: int = 200, overwrite: bool = False) -> dict:
    started = time.perf_counter()
    torch.manual_seed(SEED)
    with atomic_directory(out, overwrite=overwrite) as run:
        # 1. data: a task corpus with a held-out split
        corpus = arithmetic_corpus(600, SEED)
        train_file = _write_jsonl(run / "data" / "train.jsonl", corpus[:540])
        valid_file = _write_jsonl(run / "data" / "valid.jsonl", corpus[540:])
        tokenizer = tiny_tokenizer([m["content"] for row in corpus for m in row["messages"]])

        # 2. the base model, saved as a standard Hugging Face directory
        model = tiny_model(FAMILY, seed=SEED, vocab_size=len(tokenizer))
        model.save_pretrained(run / "base_model")
        tokenizer.save_pretrained(run / "base_model")
        log.info("[1/5] base model: tiny %s, %d parameters -> %s", FAMILY, model.num_parameters(), out / "base_model")

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
        log.info("[3/5] selected %d of %d routed experts (token score, p = %s)", config.num_selected, scores.num_experts * len(scores.layers), TOP_P)

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
        reloaded = tiny_model(FAMILY, seed=SEED, vocab_size=len(tokenizer))
        load_adapter(reloaded, run / "adapter")
        merge_adapter(reloaded).save_pretrained(run / "merged")
        tokenizer.save_pretrained(run / "merged")
        probe = valid_batches[0]["input_ids"]
        with torch.no_grad():
            max_diff = (model.eval()(probe).logits - reloaded.eval()(probe).logits).abs().max().item()
        if max_diff != 0.0:
            raise RuntimeError(f"merged model differs from the trained model (max |logit diff| {max_diff})")
        report = {
            "selected_experts": config.num_selected,
            "trainable_parameters": summary.trainable_parameters,
            "trainable_fraction": summary.trainable_fraction,
            "valid_loss_before": valid_before,
            "valid_loss_after": valid_after,
            "adapter_bytes": adapter_summary(run / "adapter")["bytes"],
            "merged_logits_max_abs_diff": max_diff,
            "seconds": round(time.perf_counter() - started, 1),
        }
        atomic_write_text(run / "report.json", json.dumps(report, indent=2))
    log.info("[5/5] adapter (%d bytes) -> %s ; merged model -> %s", report["adapter_bytes"], out / "adapter", out / "merged")
    log.info("done in %.1fs. Next: esft inspect %s ; esft merge --model %s --adapter %s --out merged/",
             report["seconds"], out / "merged", out / "base_model", out / "adapter")
    return report
