"""The recipe that builds the project's small pretrained MoE, `mini-moe` (the embedded default):

    esft pretrain --out esft/assets/mini-moe

A DeepSeek-V2-architecture model (one dense first layer, then MoE layers of 32 fine-grained routed
experts, top-4, plus one shared expert) with a byte-level BPE tokenizer, pretrained from scratch
on the generated general-domain mixture plus the intent, law and summary domains
(`esft.synthetic.PRETRAIN_TASKS`). The downstream domains math, code and translation are held out
of both the tokenizer and the model, as the paper's "vanilla" model never saw its math and code
alignment data. Pretraining adds a switch-style load-balancing loss so that all experts are used;
which experts each domain routes to is left to the model, and the recipe reports it (per-task
concentration and overlap) in the model directory's `specialisation.json` and README.

Deterministic for a given seed, torch build and thread count (the recipe pins 2 threads); about
25 minutes on a 2-core CPU. The result is a standard Hugging Face directory: it loads with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, no project code.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from esft import synthetic
from esft.data import (
    Conversation,
    collate_rows,
    pack_samples,
    parse_record,
    tokenize_conversations,
)
from esft.io import atomic_directory, atomic_write_text
from esft.report import concentration_table, experts_sets
from esft.scores import ExpertScores, empty_scores_for, profile_batch
from esft.tiny import tiny_tokenizer
from esft.training import PAPER_BETAS, PAPER_GRAD_CLIP, PAPER_WEIGHT_DECAY, mean_loss

log = logging.getLogger("esft")

MODEL_NAME = "mini-moe"
# The committed result of this recipe, shipped inside the package.
ASSET_DIR = Path(__file__).resolve().parent / "assets" / MODEL_NAME


@dataclass
class PretrainRecipe:
    seed: int = 0
    steps: int = 2400
    batch_rows: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to this share of lr
    balance_loss_coef: float = 0.01
    vocab_size: int = 2048
    general_rows: int = 60000
    task_rows: int = 20000  # per pretraining task
    threads: int = 2
    log_every: int = 50

    def validate(self) -> None:
        for name in ("steps", "batch_rows", "seq_len", "vocab_size", "general_rows", "threads", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"pretrain: {name} must be a positive integer")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.balance_loss_coef < 0:
            raise ValueError("pretrain: lr must be > 0, min_lr_ratio in [0, 1] and balance_loss_coef >= 0")


def mini_moe_config(vocab_size: int) -> PretrainedConfig:
    """The architecture: fine-grained experts as in DeepSeek-V2, scaled to a 2-core CPU."""
    return AutoConfig.for_model(
        "deepseek_v2",
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,  # the dense first layer
        num_hidden_layers=5,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_shared_experts=1,
        moe_intermediate_size=32,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        max_position_embeddings=256,  # the context it is pretrained on (seq_len); longer inputs degrade
        tie_word_embeddings=False,
        bos_token_id=0,  # tiny_tokenizer's special tokens
        eos_token_id=1,
        pad_token_id=2,
    )


def pretraining_conversations(recipe: PretrainRecipe) -> list[Conversation]:
    """General mixture + the pretraining tasks, shuffled together (held-out tasks never appear)."""
    records = synthetic.rows(synthetic.GENERAL, recipe.general_rows, seed=recipe.seed)
    for task in synthetic.PRETRAIN_TASKS:
        records += synthetic.rows(task, recipe.task_rows, seed=recipe.seed)
    random.Random(f"pretrain:{recipe.seed}").shuffle(records)
    return [parse_record(record, f"pretraining row {i}") for i, record in enumerate(records)]


def token_blocks(conversations: list[Conversation], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Every conversation in the reference template (<s>User: ...\\n\\nAssistant: ...</s>), concatenated
    and cut into contiguous blocks [N, seq_len]: language-model pretraining, loss on every token."""
    stream: list[int] = []
    for sample in tokenize_conversations(conversations, tokenizer):
        stream.extend(sample.input_ids)
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, seq_len)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-transformer load balancing, averaged over MoE layers: E * sum_e f_e * P_e, where f_e is
    the share of routing slots that went to expert e and P_e its mean router probability. It keeps
    every expert in use without telling any expert what to specialise in."""
    losses = []
    for logits_TE in router_logits:
        probs_TE = logits_TE.float().softmax(dim=-1)
        num_experts = probs_TE.shape[-1]
        chosen_TK = probs_TE.topk(top_k, dim=-1).indices
        slots_E = torch.zeros(num_experts, device=probs_TE.device).scatter_add_(
            0, chosen_TK.flatten(), torch.ones(chosen_TK.numel(), device=probs_TE.device))
        losses.append(num_experts * (slots_E / chosen_TK.numel() * probs_TE.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def learning_rate(step: int, recipe: PretrainRecipe) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    if step <= recipe.warmup_steps:
        return recipe.lr * step / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.min_lr_ratio
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: PreTrainedModel, blocks: torch.Tensor, recipe: PretrainRecipe) -> list[dict]:
    """The pretraining loop; returns the logged history."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": PAPER_WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.lr, betas=PAPER_BETAS, fused=True)
    generator = torch.Generator().manual_seed(recipe.seed)
    order, cursor = torch.randperm(len(blocks), generator=generator), 0
    top_k = model.config.num_experts_per_tok
    history, started, window = [], time.perf_counter(), []
    model.train()
    for step in range(1, recipe.steps + 1):
        if cursor + recipe.batch_rows > len(order):  # next epoch, new order
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor : cursor + recipe.batch_rows]]
        cursor += recipe.batch_rows
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        output = model(input_ids=batch, labels=batch, output_router_logits=True)
        balance = balance_loss(output.router_logits, top_k)
        (output.loss + recipe.balance_loss_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PAPER_GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append((float(output.loss.detach()), float(balance.detach())))
        if step % recipe.log_every == 0 or step == recipe.steps:
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": sum(w[0] for w in window) / len(window),
                      "balance": sum(w[1] for w in window) / len(window), "lr": learning_rate(step, recipe),
                      "seconds": round(elapsed, 1)}
            history.append(record)
            window = []
            tokens_per_s = step * recipe.batch_rows * recipe.seq_len / elapsed
            eta = (recipe.steps - step) * elapsed / step
            log.info("step %d/%d  loss %.4f  balance %.3f  lr %.2e  %.0f tok/s  eta %.0fs", step, recipe.steps,
                     record["loss"], record["balance"], record["lr"], tokens_per_s, eta)
    return history


def domain_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, domain: str, seed: int, rows: int = 400) -> ExpertScores:
    """Routing statistics of `domain`'s training rows (the rows ESFT would profile)."""
    conversations = [parse_record(r, domain) for r in synthetic.rows(domain, rows, seed=seed)]
    packed = pack_samples(tokenize_conversations(conversations, tokenizer), 256, pad_id=tokenizer.pad_token_id,
                          bos_id=tokenizer.bos_token_id, random_concat_ratio=0.0)
    scores = empty_scores_for(model, {"data": f"synthetic:{domain}", "seed": seed})
    for i in range(0, len(packed), 16):
        batch = collate_rows(packed[i : i + 16])
        profile_batch(model, batch["input_ids"], batch["attention_mask"], into=scores)
    return scores


def specialisation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int) -> dict:
    """Per domain, experts needed per layer to reach token p = 0.2 (few = concentrated), and per
    pair of domains the experts their token p = 0.2 selections share (few = different experts)."""
    domains = (*synthetic.TASKS, synthetic.GENERAL)
    scores = {d: domain_scores(model, tokenizer, d, seed) for d in domains}
    experts = scores[domains[0]].num_experts
    concentration = {d: concentration_table(s)["token"]["0.2"] for d, s in scores.items()}
    selections = {d: experts_sets(s, "token", 0.2) for d, s in scores.items()}
    overlap = {f"{a}/{b}": [len(x & y) for x, y in zip(selections[a], selections[b])] for a, b in combinations(domains, 2)}
    return {"layers": list(scores[domains[0]].layers), "num_experts": experts, "token_p0.2_experts": concentration,
            "token_p0.2_overlap": overlap,
            "mean_experts_fraction": sum(sum(v) / len(v) for v in concentration.values()) / len(concentration) / experts}


def heldout_losses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int) -> dict[str, float]:
    """Answer-token loss on every domain's eval split: low on what pretraining covered, high on the
    held-out tasks (what fine-tuning must teach)."""
    losses = {}
    for domain in (*synthetic.TASKS, synthetic.GENERAL):
        conversations = [parse_record(r, domain) for r in synthetic.rows(domain, 200, seed=seed, split="eval")]
        packed = pack_samples(tokenize_conversations(conversations, tokenizer), 256, pad_id=tokenizer.pad_token_id,
                              bos_id=tokenizer.bos_token_id, random_concat_ratio=0.0)
        losses[domain] = round(mean_loss(model, [collate_rows(packed[i : i + 16]) for i in range(0, len(packed), 16)]), 4)
    return losses


def model_card(report: dict) -> str:
    spec = report["specialisation"]
    domains = list(spec["token_p0.2_experts"])
    lines = [
        f"# {MODEL_NAME}", "",
        ("A small DeepSeek-V2-architecture MoE pretrained by the ESFT project's recipe "
        "(`esft pretrain`, module `esft/pretrain.py`) on generated data (`esft/synthetic.py`). "
        "It exists so that ESFT's effects can be shown and tested on a CPU without downloads."), "",
        (f"- parameters: {report['parameters']:,}; {spec['num_experts']} routed experts per MoE layer, top-"
        f"{report['config']['num_experts_per_tok']}, one shared expert, dense first layer"),
        f"- pretraining: general mixture + {', '.join(synthetic.PRETRAIN_TASKS)}; held out: {', '.join(synthetic.HELD_OUT_TASKS)}",
        (f"- {report['recipe']['steps']} steps x {report['recipe']['batch_rows']} x {report['recipe']['seq_len']} tokens, "
        f"final loss {report['history'][-1]['loss']:.3f}, {report['seconds']:.0f} s on {report['recipe']['threads']} CPU threads"), "",
        "## Answer-token loss on each domain's eval split", "",
        "| domain | loss |", "|---|---|",
        *[f"| {d} | {v} |" for d, v in report["eval_loss"].items()], "",
        f"## Routing: experts (of {spec['num_experts']}) needed to reach token p = 0.2, per MoE layer", "",
        "| domain | " + " | ".join(f"layer {l}" for l in spec["layers"]) + " |", "|---" * (1 + len(spec["layers"])) + "|",
        *[f"| {d} | " + " | ".join(str(n) for n in spec["token_p0.2_experts"][d]) + " |" for d in domains], "",
        "## Experts shared by two domains' token p = 0.2 selections, per MoE layer", "",
        "| pair | " + " | ".join(f"layer {l}" for l in spec["layers"]) + " |", "|---" * (1 + len(spec["layers"])) + "|",
        *[f"| {pair} | " + " | ".join(str(n) for n in shared) + " |" for pair, shared in spec["token_p0.2_overlap"].items()],
    ]
    return "\n".join(lines) + "\n"


def pretrain(recipe: PretrainRecipe, out: Path, overwrite: bool = False) -> dict:
    """Build mini-moe into `out` (written atomically); returns the report also saved beside it."""
    recipe.validate()
    started = time.perf_counter()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(recipe.seed)
    with atomic_directory(out, overwrite=overwrite) as target:
        conversations = pretraining_conversations(recipe)
        tokenizer = tiny_tokenizer([m.content for c in conversations for m in c.messages], vocab_size=recipe.vocab_size)
        blocks = token_blocks(conversations, tokenizer, recipe.seq_len)
        log.info("pretraining data: %d conversations -> %d blocks of %d tokens (%d steps read %.1f epochs)", len(conversations),
                 len(blocks), recipe.seq_len, recipe.steps, recipe.steps * recipe.batch_rows / len(blocks))
        model = AutoModelForCausalLM.from_config(mini_moe_config(len(tokenizer)), dtype=torch.float32)
        history = train(model, blocks, recipe)
        model.eval()
        report = {"model": MODEL_NAME, "recipe": asdict(recipe), "config": model.config.to_diff_dict(),
                  "parameters": model.num_parameters(), "torch": torch.__version__, "history": history,
                  "eval_loss": heldout_losses(model, tokenizer, recipe.seed),
                  "specialisation": specialisation(model, tokenizer, recipe.seed),
                  "seconds": round(time.perf_counter() - started, 1)}
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        atomic_write_text(target / "pretrain_report.json", json.dumps(report, indent=1))
        atomic_write_text(target / "README.md", model_card(report))
    log.info("mini-moe -> %s (%.0f s; mean share of experts at token p=0.2: %.3f)", out, report["seconds"],
             report["specialisation"]["mean_experts_fraction"])
    return report
