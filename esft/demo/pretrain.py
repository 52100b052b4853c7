"""The recipe that builds the project's small pretrained MoE, `mini-moe` (the embedded default):

    esft pretrain --out esft/demo/assets/mini-moe                       # the shipped model (~40 min on 2 CPU cores)
    esft pretrain --preset mini-moe-v1 --out runs/mini-moe-v1      # the first embedded model, for comparison

`PRESETS["mini-moe"]` (the defaults of `PretrainRecipe`) is the shipped model, in DeepSeek-V2-Lite's
proportions: a DeepSeek-V2 model (one dense first layer, then 6 MoE layers of 64 fine-grained
routed experts, top-6, two shared experts, MLA attention) with a byte-level BPE tokenizer trained
on everything it reads. It is pretrained from scratch on the generated general mixture, the
aligned tasks intent, law and summary in the User/Assistant template, and raw, unaligned text of
every task domain (`esft.demo.synthetic.raw_documents`: worked sums and solutions, REPL sessions and
program listings, a Veltish glossary and reader, request logs, law reports, news), one domain per
block. The held-out tasks (math, code, translation) are held out of the instruction format only,
as in the paper: the model has their skill, not their alignment.

`PRESETS["mini-moe-v1"]` rebuilds the first embedded model (32 experts, template data only, the
held-out tasks never seen), whose experts barely specialised.

Both add a switch-style balance loss over the batch (ablations: per sequence, over a window of
batches, or decayed to 0 over the last part of training; DeepSeek-V3's router with its
auxiliary-loss-free bias updates; group-limited routing; a wider key/value latent; the card
tabulates them).
`measure_specialisation` measures the gates ESFT's premise needs (concentrated, task-specific
routing; held-out tasks learnable but not aligned; aligned tasks solved) beside DeepSeek-V2-Lite's
figures; `bench/specialisation.py` runs it on any model directory.

Deterministic for a given seed, torch build and thread count (the recipe pins the threads). The
result is a standard Hugging Face directory: it loads with `AutoModelForCausalLM.from_pretrained`
/ `AutoTokenizer.from_pretrained`, no project code.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from esft.demo import synthetic
from esft.demo.tokenizer import train_bpe_tokenizer
from esft.errors import EsftError
from esft.data import (
    PROMPT_ASSISTANT,
    PROMPT_USER,
    Conversation,
    collate_rows,
    pack_samples,
    parse_record,
    tokenize_conversations,
)
from esft.generation import generate_batch
from esft.io import atomic_directory, atomic_write_text
from esft.metrics import score, unit_scale
from esft.report import (
    effective_experts,
    experts_sets,
    routing_mass_ratio,
    save_domain_heatmaps,
    selection_jaccard,
)
from esft.scores import ExpertScores, empty_scores_for, profile_batch
from esft.training import PAPER_BETAS, PAPER_GRAD_CLIP, PAPER_WEIGHT_DECAY, mean_loss

log = logging.getLogger("esft")

MODEL_NAME = "mini-moe"
# The committed result of this recipe, shipped inside the package.
ASSET_DIR = Path(__file__).resolve().parent / "assets" / MODEL_NAME
DOMAINS = (*synthetic.TASKS, synthetic.GENERAL)
MAX_NEW_TOKENS = {"math": 40, "code": 16, "intent": 48, "law": 12, "translation": 32, "summary": 40}


BALANCE_SCOPES = ("batch", "sequence", "global")
# The router: DeepSeek-V2's (softmax scores, top-k) or DeepSeek-V3's (sigmoid scores, top-k chosen
# with a per-expert selection bias, the chosen scores renormalised), both in the same proportions.
ARCHITECTURES = ("deepseek_v2", "deepseek_v3")
ARCHITECTURE_NAMES = {"deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3"}  # for the card


@dataclass
class PretrainRecipe:
    """Everything that determines a mini-moe build. The defaults are the shipped model's recipe
    (PRESETS["mini-moe"]); PRESETS["mini-moe-v1"] rebuilds the first embedded model."""

    seed: int = 0
    # data
    general_rows: int = 45000
    task_rows: int = 20000  # per aligned task, in the instruction template
    raw_documents: int = 5000  # per aligned task domain, raw unaligned text (esft.demo.synthetic.raw_documents)
    # per held-out task domain: where its skill comes from (more text, more experts of its own)
    held_out_raw_documents: int = 15000
    domain_blocks: bool = True  # one domain per pretraining block (as a window of a long document) or a mixed stream
    tokenizer_sees_template: bool = True  # train the tokenizer on "User: ... Assistant: ..." (template words as tokens)
    translation_phrasebook: bool = False  # raw translation text also as "English: ...\nVeltish: ..." (the task's direction)
    summary_digest: bool = False  # raw news also as "<article>\nIn brief: <summary>" (the summary copies from the text before it)
    vocab_size: int = 2048
    # architecture (the first layer dense, then MoE layers); DeepSeek-V2-Lite's proportions
    architecture: str = "deepseek_v2"
    layers: int = 7
    hidden_size: int = 128  # the dense first layer's MLP is 3x as wide
    attention_heads: int = 4
    kv_lora_rank: int = 32  # MLA's compressed key/value latent, shared by the heads (what copying reads through)
    # Group-limited routing (DeepSeek-V2's device-limited routing, with groups for devices): the
    # experts form `expert_groups` groups and each token takes its top-k from its best
    # `groups_per_token` groups only. 1 and 1: no limit (DeepSeek-V2-Lite).
    expert_groups: int = 1
    groups_per_token: int = 1
    routed_experts: int = 64
    experts_per_token: int = 6
    shared_experts: int = 2
    expert_width: int = 24
    # training
    steps: int = 2400
    batch_rows: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to this share of lr
    balance_loss_coef: float = 0.005
    balance_scope: str = "batch"  # "batch", "sequence" or "global": over which tokens expert load is balanced
    balance_window: int = 16  # "global": expert load counted over the last this-many batches (the current one included)
    # From this share of training on, the balance coefficient decays linearly to 0 at the last step
    # (1.0: constant). Balance while the experts find their roles, then let routing settle on them,
    # as DeepSeek-V3 stopped its balancing-bias updates for the last part of pretraining.
    balance_decay_start: float = 1.0
    # Auxiliary-loss-free balancing (DeepSeek-V3, deepseek_v3 only): after each step, each expert's
    # selection bias moves by this much toward balance (up when it took fewer than the mean number of
    # routing slots in the batch, down when more). It balances load without a loss gradient on the
    # router, which pushes every token's routing toward the under-used experts. 0: off.
    bias_update_rate: float = 0.0
    threads: int = 2
    log_every: int = 50
    measure_at: tuple[int, ...] = (600, 1200, 1800)  # also measure routing specialisation at these steps
    measure_rows: int = 400  # rows per domain profiled for the gates (half as many for losses, a quarter generated)

    def extra_raw_text(self) -> dict[str, bool]:
        """Per domain, whether its EXTRA_RAW_GENERATORS are drawn from too."""
        return {"translation": self.translation_phrasebook, "summary": self.summary_digest}

    def validate(self) -> None:
        for name in ("steps", "batch_rows", "seq_len", "vocab_size", "general_rows", "threads", "log_every", "measure_rows",
                     "balance_window",
                     "routed_experts", "experts_per_token", "shared_experts", "expert_width", "attention_heads", "hidden_size",
                     "kv_lora_rank", "expert_groups", "groups_per_token"):
            if int(getattr(self, name)) < 1:
                raise EsftError(f"pretrain: {name} must be a positive integer")
        if self.layers < 2 or self.experts_per_token > self.routed_experts:
            raise EsftError("pretrain: need layers >= 2 (one dense, then MoE) and experts_per_token <= routed_experts")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.balance_loss_coef < 0:
            raise EsftError("pretrain: lr must be > 0, min_lr_ratio in [0, 1] and balance_loss_coef >= 0")
        if not 0 <= self.balance_decay_start <= 1:
            raise EsftError(f"pretrain: balance_decay_start must be in [0, 1], got {self.balance_decay_start}")
        if self.routed_experts % self.expert_groups or self.groups_per_token > self.expert_groups or (
                self.groups_per_token * self.routed_experts // self.expert_groups < self.experts_per_token):
            raise EsftError("pretrain: expert_groups must divide routed_experts, and groups_per_token groups must hold "
                             "at least experts_per_token experts (and be at most expert_groups)")
        if self.architecture not in ARCHITECTURES:
            raise EsftError(f"pretrain: architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.bias_update_rate < 0 or (self.bias_update_rate > 0 and self.architecture != "deepseek_v3"):
            raise EsftError("pretrain: bias_update_rate must be >= 0, and > 0 only with architecture deepseek_v3 "
                             "(DeepSeek-V2's router has no selection bias)")
        if self.balance_scope not in BALANCE_SCOPES:
            raise EsftError(f"pretrain: balance_scope must be one of {', '.join(BALANCE_SCOPES)}, got {self.balance_scope!r}")
        if min(self.task_rows, self.raw_documents, self.held_out_raw_documents) < 0:
            raise EsftError("pretrain: task_rows, raw_documents and held_out_raw_documents must be >= 0")


PRESETS: dict[str, PretrainRecipe] = {
    # The shipped embedded model (the defaults): DeepSeek-V2-Lite's proportions, raw text of every
    # domain (three times as much for the held-out ones), one-domain blocks.
    "mini-moe": PretrainRecipe(),
    # The first embedded model (shipped until 2026-11-30): 32 experts top-4 + 1 shared, 4 MoE layers,
    # pretrained on the general mixture and the aligned tasks only (held-out tasks never seen).
    "mini-moe-v1": PretrainRecipe(general_rows=60000, raw_documents=0, held_out_raw_documents=0, domain_blocks=False,
                                  tokenizer_sees_template=False, layers=5, routed_experts=32, experts_per_token=4,
                                  shared_experts=1, expert_width=32, balance_loss_coef=0.01, measure_at=()),
}


def mini_moe_config(vocab_size: int, recipe: PretrainRecipe | None = None) -> PretrainedConfig:
    """The DeepSeek-V2 or -V3 architecture of `recipe` (fine-grained experts, MLA attention, a dense
    first layer), scaled to a 2-core CPU."""
    recipe = recipe or PretrainRecipe()
    groups = {"n_group": recipe.expert_groups, "topk_group": recipe.groups_per_token}
    if recipe.architecture == "deepseek_v2":
        router = {"topk_method": "greedy" if recipe.expert_groups == 1 else "group_limited_greedy", **groups}
    else:
        router = {**groups, "norm_topk_prob": True}
    return AutoConfig.for_model(
        recipe.architecture,
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=3 * recipe.hidden_size,  # the dense first layer
        num_hidden_layers=recipe.layers,
        first_k_dense_replace=1,
        num_attention_heads=recipe.attention_heads,
        num_key_value_heads=recipe.attention_heads,
        kv_lora_rank=recipe.kv_lora_rank,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=recipe.routed_experts,
        num_experts_per_tok=recipe.experts_per_token,
        n_shared_experts=recipe.shared_experts,
        moe_intermediate_size=recipe.expert_width,
        **router,
        routed_scaling_factor=1.0,
        max_position_embeddings=recipe.seq_len,  # the context it is pretrained on; longer inputs degrade
        tie_word_embeddings=False,
        bos_token_id=0,  # esft.demo.tokenizer's special tokens
        eos_token_id=1,
        pad_token_id=2,
    )


@dataclass(frozen=True)
class Document:
    source: str  # the domain it comes from
    conversation: Conversation | None = None  # a row in the User/Assistant template
    text: str | None = None  # or raw text


def pretraining_corpus(recipe: PretrainRecipe) -> list[Document]:
    """General mixture + the aligned tasks in the template + raw text of every task domain (the
    held-out tasks appear only as raw text, if at all); in training order for a mixed stream."""
    documents = []
    for domain in (synthetic.GENERAL, *synthetic.PRETRAIN_TASKS):
        count = recipe.general_rows if domain == synthetic.GENERAL else recipe.task_rows
        documents += [Document(domain, conversation=parse_record(record, f"{domain} pretraining row {i}"))
                      for i, record in enumerate(synthetic.rows(domain, count, seed=recipe.seed))]
    for domain in synthetic.RAW_GENERATORS:
        count = recipe.held_out_raw_documents if domain in synthetic.HELD_OUT_TASKS else recipe.raw_documents
        extra = recipe.extra_raw_text().get(domain, False)
        texts = synthetic.raw_documents(domain, count, recipe.seed, extra_kinds=extra)
        documents += [Document(domain, text=text) for text in texts]
    if not recipe.domain_blocks:
        random.Random(f"pretrain:{recipe.seed}").shuffle(documents)
    return documents


def tokenizer_texts(documents: list[Document], recipe: PretrainRecipe) -> list[str]:
    """What the tokenizer is trained on: every domain's words; with tokenizer_sees_template, the
    conversations as the model reads them, so that "User" and "Assistant" are single tokens as in
    a real chat model's vocabulary."""
    texts = []
    for d in documents:
        if d.conversation is None:
            texts.append(d.text)
        elif recipe.tokenizer_sees_template:
            texts.append("".join(PROMPT_USER.format(input=m.content) if m.role == "user" else f"{PROMPT_ASSISTANT} {m.content}"
                                 for m in d.conversation.messages))
        else:
            texts += [m.content for m in d.conversation.messages]
    return texts


def token_blocks(documents: list[Document], tokenizer: PreTrainedTokenizerBase,
                 recipe: PretrainRecipe) -> tuple[torch.Tensor, dict]:
    """Blocks [N, seq_len] for language-model pretraining (loss on every token), and the token mix.

    A mixed stream concatenates the (shuffled) documents and cuts blocks; with domain_blocks, each
    source (a domain's template rows, a domain's raw text) is cut into blocks on its own and the
    blocks are shuffled, so that a block holds one domain, as a window of a long web document does."""
    conversations = [d.conversation for d in documents if d.conversation is not None]
    template_ids = iter(sample.input_ids for sample in tokenize_conversations(conversations, tokenizer))
    ids = [next(template_ids) if d.conversation is not None
           else [tokenizer.bos_token_id, *tokenizer.encode(d.text, add_special_tokens=False), tokenizer.eos_token_id]
           for d in documents]
    streams: dict[str, list[int]] = {}
    for d, document_ids in zip(documents, ids):
        streams.setdefault(f"{d.source}/{'template' if d.conversation is not None else 'raw'}" if recipe.domain_blocks else "all",
                           []).extend(document_ids)
    blocks = [stream[i : i + recipe.seq_len] for stream in streams.values()
              for i in range(0, len(stream) - recipe.seq_len + 1, recipe.seq_len)]
    if recipe.domain_blocks:
        random.Random(f"pretrain:{recipe.seed}").shuffle(blocks)
    total = sum(len(x) for x in ids)
    raw = sum(len(x) for d, x in zip(documents, ids) if d.conversation is None)
    mix = {"documents": len(documents), "tokens": total, "raw_text_share": round(raw / max(1, total), 4)}
    return torch.tensor(blocks, dtype=torch.long), mix


def selection_biases(model: PreTrainedModel) -> list[torch.Tensor] | None:
    """DeepSeek-V3's per-expert selection biases, one [E] buffer per MoE layer in order (None for
    DeepSeek-V2, whose router has none). The router adds them to its sigmoid scores only to choose
    the top-k; the weights it applies are the unbiased scores."""
    if model.config.model_type != "deepseek_v3":
        return None
    return [layer.mlp.gate.e_score_correction_bias for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def _choice_scores(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, groups: int = 1,
                   groups_per_token: int = 1) -> torch.Tensor:
    """What the router's top-k is taken over: DeepSeek-V2's logits (its softmax keeps their order) or
    DeepSeek-V3's sigmoid scores plus the selection bias; with group-limited routing, -inf outside
    each token's best `groups_per_token` of `groups` groups (V2 ranks a group by its best expert,
    V3 by the sum of its best two, as the models do)."""
    choice_TE = logits_TE if bias_E is None else logits_TE.sigmoid() + bias_E
    if groups == 1:
        return choice_TE
    grouped_TGE = choice_TE.view(len(choice_TE), groups, -1)
    group_score_TG = grouped_TGE.max(dim=-1).values if bias_E is None else grouped_TGE.topk(2, dim=-1).values.sum(dim=-1)
    kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(
        1, group_score_TG.topk(groups_per_token, dim=-1).indices, True)
    return grouped_TGE.masked_fill(~kept_TG.unsqueeze(-1), float("-inf")).view_as(choice_TE)


def router_probabilities(logits_TE: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Each token's router probabilities over the experts, for the balance loss: DeepSeek-V2's
    softmax, or DeepSeek-V3's sigmoid scores normalised to sum to 1 (as in its sequence-wise loss)."""
    if not sigmoid:
        return logits_TE.float().softmax(dim=-1)
    scores_TE = logits_TE.float().sigmoid()
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def expert_slots(router_logits: tuple[torch.Tensor, ...], top_k: int, rows: int = 1,
                 biases: list[torch.Tensor] | None = None, groups: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """How many routing slots each expert took, per MoE layer and group of tokens: [L, rows, E]
    (the logits are row-major [rows * T, E]; rows=1 counts the whole batch; `biases`: DeepSeek-V3's
    selection biases, see `selection_biases`; `groups`: (expert groups, groups per token) of
    group-limited routing). Not differentiable."""
    counts = []
    for layer, logits_TE in enumerate(router_logits):
        choice_TE = _choice_scores(logits_TE.detach(), None if biases is None else biases[layer], *groups)
        chosen_GTK = choice_TE.topk(top_k, dim=-1).indices.view(rows, -1, top_k)
        counts.append(torch.zeros(rows, logits_TE.shape[-1], device=logits_TE.device).scatter_add_(
            1, chosen_GTK.flatten(1), torch.ones(chosen_GTK.flatten(1).shape, device=logits_TE.device)))
    return torch.stack(counts)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, rows: int = 1,
                 earlier_slots_LE: torch.Tensor | None = None, slots_LGE: torch.Tensor | None = None,
                 sigmoid: bool = False) -> torch.Tensor:
    """Switch-transformer load balancing, averaged over MoE layers: E * sum_e f_e * P_e, where f_e is
    the share of routing slots that went to expert e and P_e its mean router probability over a
    group of tokens: the whole batch (rows=1) or each of `rows` sequences, then averaged.
    `earlier_slots_LE` (slot counts of earlier batches) widens f to a global window while P stays
    the current batch's, as in global-batch balancing (Qiu et al., 2025, "Demons in the Detail").

    Sequence-level balance forces each sequence (mostly one domain) to spread over all experts,
    which works against specialisation; batch-level balance lets a batch's domains share the
    experts out, and a global window, holding many batches' worth of every domain, balances only
    the load over the whole mixture, so an expert may serve one domain alone. `slots_LGE`: this
    batch's `expert_slots`, when the caller has counted them already (a DeepSeek-V3 router's must
    be, with its selection biases); `sigmoid`: the router is DeepSeek-V3's."""
    slots_LGE = expert_slots(router_logits, top_k, rows) if slots_LGE is None else slots_LGE
    if earlier_slots_LE is not None:
        if rows != 1:
            raise ValueError("balance_loss: a global window needs rows=1")
        slots_LGE = slots_LGE + earlier_slots_LE.unsqueeze(1)
    share_LGE = slots_LGE / slots_LGE.sum(dim=-1, keepdim=True)
    losses = []
    for logits_TE, share_GE in zip(router_logits, share_LGE):
        probs_GTE = router_probabilities(logits_TE, sigmoid).view(rows, -1, logits_TE.shape[-1])
        num_experts = probs_GTE.shape[-1]
        losses.append(num_experts * (share_GE * probs_GTE.mean(dim=1)).sum(dim=1).mean())
    return torch.stack(losses).mean()


def update_selection_biases(biases: list[torch.Tensor], slots_LE: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing step: each expert's selection bias goes up by
    `rate` if it took fewer routing slots than the layer's mean in this batch, down if more."""
    with torch.no_grad():
        for bias_E, slots_E in zip(biases, slots_LE):
            bias_E += rate * torch.sign(slots_E.mean() - slots_E)


def learning_rate(step: int, recipe: PretrainRecipe) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    if step <= recipe.warmup_steps:
        return recipe.lr * step / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.min_lr_ratio
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def balance_coefficient(step: int, recipe: PretrainRecipe) -> float:
    """The balance-loss weight at `step`: constant, then (from balance_decay_start of training on)
    linearly down to 0 at the last step."""
    start = recipe.balance_decay_start * recipe.steps
    if step <= start:
        return recipe.balance_loss_coef
    return recipe.balance_loss_coef * (recipe.steps - step) / max(1.0, recipe.steps - start)


def train(model: PreTrainedModel, blocks: torch.Tensor, recipe: PretrainRecipe,
          on_step: Callable[[int], None] | None = None) -> list[dict]:
    """The pretraining loop; returns the logged history. `on_step(step)` runs after each step
    (the recipe measures routing at `recipe.measure_at` through it)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": PAPER_WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.lr, betas=PAPER_BETAS, fused=True)
    generator = torch.Generator().manual_seed(recipe.seed)
    order, cursor = torch.randperm(len(blocks), generator=generator), 0
    top_k = model.config.num_experts_per_tok
    biases = selection_biases(model)
    history, started, window = [], time.perf_counter(), []
    recent_slots = collections.deque(maxlen=recipe.balance_window - 1)  # "global" balance: earlier batches' expert load
    model.train()
    for step in range(1, recipe.steps + 1):
        if cursor + recipe.batch_rows > len(order):  # next epoch, new order
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor : cursor + recipe.batch_rows]].to(model.device)
        cursor += recipe.batch_rows
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        output = model(input_ids=batch, labels=batch, output_router_logits=True)
        rows = len(batch) if recipe.balance_scope == "sequence" else 1
        # what this forward chose: with its biases, within its groups
        slots_LGE = expert_slots(output.router_logits, top_k, rows, biases, (recipe.expert_groups, recipe.groups_per_token))
        earlier = torch.stack(list(recent_slots)).sum(dim=0) if recipe.balance_scope == "global" and recent_slots else None
        balance = balance_loss(output.router_logits, top_k, rows, earlier_slots_LE=earlier, slots_LGE=slots_LGE,
                               sigmoid=biases is not None)
        if recipe.balance_scope == "global":
            recent_slots.append(slots_LGE[:, 0])
        (output.loss + balance_coefficient(step, recipe) * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PAPER_GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if recipe.bias_update_rate:
            update_selection_biases(biases, slots_LGE.sum(dim=1), recipe.bias_update_rate)
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
        if on_step is not None:
            on_step(step)
            # a device round trip (measuring on the CPU) keeps the parameters but replaces the buffers
            # the selection biases live in: update the model's, not stale copies
            biases = selection_biases(model)
    return history


def domain_batches(tokenizer: PreTrainedTokenizerBase, domain: str, seed: int, rows: int,
                   split: str) -> list[dict[str, torch.Tensor]]:
    """`rows` rows of a domain in the instruction template, packed into 256-token rows, 16 per batch."""
    conversations = [parse_record(r, domain) for r in synthetic.rows(domain, rows, seed=seed, split=split)]
    packed = pack_samples(tokenize_conversations(conversations, tokenizer), 256, pad_id=tokenizer.pad_token_id,
                          bos_id=tokenizer.bos_token_id, random_concat_ratio=0.0)
    return [collate_rows(packed[i : i + 16]) for i in range(0, len(packed), 16)]


def domain_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, domain: str, seed: int, rows: int) -> ExpertScores:
    """Routing statistics of `domain`'s training rows in the instruction template (the rows ESFT
    would profile), every non-padding token counted."""
    scores = empty_scores_for(model, {"data": f"synthetic:{domain}", "seed": seed})
    for batch in domain_batches(tokenizer, domain, seed, rows, "train"):
        profile_batch(model, batch["input_ids"], batch["attention_mask"], into=scores)
    return scores


def answer_losses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, rows: int) -> dict[str, float]:
    """Answer-token loss (nats) on every domain's eval split: low on what pretraining aligned, higher
    on the held-out tasks (what fine-tuning must teach)."""
    return {domain: round(mean_loss(model, domain_batches(tokenizer, domain, seed, rows, "eval")), 4) for domain in DOMAINS}


def task_metrics(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, rows: int) -> dict[str, float]:
    """Each task's own metric (esft.demo.synthetic.METRIC, in [0, 1]) from greedy answers to `rows` eval
    prompts in the instruction template."""
    results = {}
    for task in synthetic.TASKS:
        eval_rows = synthetic.rows(task, rows, seed=seed, split="eval")
        prompts = [PROMPT_USER.format(input=r["messages"][0]["content"].strip()) + PROMPT_ASSISTANT for r in eval_rows]
        answers = [[r["messages"][1]["content"]] for r in eval_rows]
        predictions = [p for i in range(0, len(prompts), 50)
                       for p in generate_batch(model, tokenizer, prompts[i : i + 50], MAX_NEW_TOKENS[task], ["\n\n", "User:"])]
        value = score(predictions, answers, [synthetic.METRIC[task]])[synthetic.METRIC[task]]
        results[task] = round(unit_scale(synthetic.METRIC[task], value), 4)
    return results


def measure_specialisation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
                           with_generation: bool = True, rows: int = 400) -> dict:
    """The figures behind ESFT's premise, on the held-out tasks (what a user fine-tunes on), and
    the gates the embedded model must pass (GATES). Routing is profiled on `rows` training rows per
    domain; selections use the token score at p = 0.2 (the paper's ESFT-Token default); answer
    losses use rows / 2 eval rows and the task metrics rows / 4 generated answers per domain."""
    model.eval()
    scores = {d: domain_scores(model, tokenizer, d, seed, rows) for d in DOMAINS}
    num_experts = scores[DOMAINS[0]].num_experts
    selections = {d: experts_sets(s, "token", 0.2) for d, s in scores.items()}
    effective = {d: effective_experts(s) for d, s in scores.items()}
    mass = {d: routing_mass_ratio(scores[d], scores[synthetic.GENERAL]) for d in synthetic.TASKS}
    held_out = synthetic.HELD_OUT_TASKS
    jaccard = {f"{a}/{b}": round(selection_jaccard(selections[a], selections[b]), 4) for a, b in combinations(DOMAINS, 2)}
    held_out_pairs = [jaccard[f"{a}/{b}"] for a, b in combinations(held_out, 2)]
    figures = {
        "effective_experts_fraction": round(float(np.mean([effective[d] for d in held_out])) / num_experts, 4),
        "token_p02_fraction": round(float(np.mean([[len(x) for x in selections[d]] for d in held_out])) / num_experts, 4),
        "held_out_jaccard": round(float(np.mean(held_out_pairs)), 4),
        "routing_mass_ratio_median": round(float(np.median([mass[d] for d in held_out])), 3),
    }
    report = {
        "layers": list(scores[DOMAINS[0]].layers), "num_experts": num_experts,
        "figures": figures,
        "per_domain": {d: {"effective_experts": [round(v, 2) for v in effective[d]],
                           "token_p02_experts": [len(x) for x in selections[d]],
                           **({"routing_mass_ratio": [round(v, 2) for v in mass[d]]} if d in mass else {})} for d in DOMAINS},
        "jaccard": jaccard,
        "answer_loss": answer_losses(model, tokenizer, seed, max(1, rows // 2)),
    }
    if with_generation:
        report["task_metric"] = task_metrics(model, tokenizer, seed, max(1, rows // 4))
    report["gates"] = check_gates(report)
    report["scores"] = scores  # for the heatmaps; dropped before the report is written
    return report


# The gates of ESFT's premise on the embedded model, with DeepSeek-V2-Lite's own figures (the
# paper's model; from its published expert profiles of the paper's tasks) where they exist.
GATES = (
    ("effective experts / E (held-out, mean)", "effective_experts_fraction", "<=", 0.75, "0.60-0.85, mean 0.75"),
    ("token p=0.2 picks / E (held-out, mean)", "token_p02_fraction", "<=", 0.10, "0.05-0.09"),
    ("Jaccard of held-out selections (mean pair)", "held_out_jaccard", "<=", 0.15, "0.06"),
    ("task / general routing mass of the selection (median)", "routing_mass_ratio_median", ">=", 2.0, "-"),
)
ALIGNED_METRIC_FLOOR = 0.8  # "solved well" for the aligned domains
HELD_OUT_LOSS_RANGE = (1.5, 4.0)  # nats: learnable but not yet aligned


def check_gates(report: dict) -> list[dict]:
    """Each gate as {"gate", "value", "target", "passed"}."""
    gates = []
    for label, key, op, bound, _ in GATES:
        value = report["figures"][key]
        gates.append({"gate": label, "value": value, "target": f"{op} {bound}",
                      "passed": value <= bound if op == "<=" else value >= bound})
    low, high = HELD_OUT_LOSS_RANGE
    for task in synthetic.HELD_OUT_TASKS:
        loss = report["answer_loss"][task]
        gates.append({"gate": f"vanilla answer loss, {task}", "value": loss, "target": f"{low}-{high} nats",
                      "passed": low <= loss <= high})
    for task, value in report.get("task_metric", {}).items():
        target = 0.0 if task in synthetic.HELD_OUT_TASKS else ALIGNED_METRIC_FLOOR
        gates.append({"gate": f"vanilla {synthetic.METRIC[task]}, {task}", "value": value,
                      "target": "> 0" if not target else f">= {target}",
                      "passed": value > 0 if not target else value >= target})
    return gates


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


# What an ablation row must share with the recipe to be tabulated in its card (the knobs may differ).
ABLATION_SAME = ("seed", "general_rows", "task_rows", "raw_documents", "held_out_raw_documents", "domain_blocks",
                 "tokenizer_sees_template", "vocab_size", "layers", "routed_experts", "experts_per_token", "shared_experts",
                 "batch_rows", "seq_len", "lr")


def _loss_scope(recipe: dict) -> str:
    """Over which tokens the balance loss counts load: batch-level, sequence-level, global over N batches."""
    if recipe["balance_scope"] == "global":
        return f"global ({recipe['balance_window']} batches)"
    return f"{recipe['balance_scope']}-level"


def balance_description(recipe: dict) -> str:
    """How a recipe balanced expert load, for the card: the balance loss's scope, or DeepSeek-V3's
    bias updates, with the loss's scope when the loss is on too."""
    rate = recipe.get("bias_update_rate", 0.0)  # absent in reports written before the knob existed
    if not rate:
        return _loss_scope(recipe)
    return f"bias updates {rate}" + (f" + {_loss_scope(recipe)} loss" if recipe["balance_loss_coef"] else "")


def architecture_description(recipe: dict) -> str:
    """The router, widths and attention of a recipe, for the card: "DeepSeek-V2", or e.g. "DeepSeek-V2,
    hidden 256, 3 of 8 expert groups, kv latent 64" where they differ from the default recipe's."""
    default = PretrainRecipe()
    name = ARCHITECTURE_NAMES[recipe.get("architecture", default.architecture)]
    groups, per_token = recipe.get("expert_groups", 1), recipe.get("groups_per_token", 1)
    heads, latent = recipe.get("attention_heads", default.attention_heads), recipe.get("kv_lora_rank", default.kv_lora_rank)
    hidden, width = recipe.get("hidden_size", default.hidden_size), recipe.get("expert_width", default.expert_width)
    return ", ".join([name, *([f"hidden {hidden}"] if hidden != default.hidden_size else []),
                      *([f"experts {width} wide"] if width != default.expert_width else []),
                      *([f"{per_token} of {groups} expert groups"] if groups > 1 else []),
                      *([f"{heads} heads"] if heads != default.attention_heads else []),
                      *([f"kv latent {latent}"] if latent != default.kv_lora_rank else [])])


def coefficient_description(recipe: dict, total_steps: int) -> str:
    """The balance coefficient, for the card: "0.005", or "0.005, to 0 from step 1200" when it decays
    (`total_steps`: the whole run's length, which the decay start is a share of)."""
    start = recipe.get("balance_decay_start", 1.0)  # absent in reports written before the knob existed
    if start >= 1:
        return f"{recipe['balance_loss_coef']}"
    return f"{recipe['balance_loss_coef']}, to 0 from step {round(start * total_steps)}"


EXTRA_RAW_TEXT = (("translation_phrasebook", "phrasebook"), ("summary_digest", "digest"))  # recipe key, card name


def _run_length(ablation_row: dict) -> int:
    """The length of the run an ablation row was measured in (longer than its steps when it was
    measured along the way)."""
    return ablation_row.get("of_steps", ablation_row["recipe"]["steps"])


def _steps_cell(ablation_row: dict) -> str:
    """Where a run was measured: "2400", or "600 of 2400" along the way of a longer run."""
    steps, length = ablation_row["recipe"]["steps"], _run_length(ablation_row)
    return f"{steps}" if steps == length else f"{steps} of {length}"


def _router_description(config: dict) -> str:
    if config.get("model_type") == "deepseek_v3":
        return "sigmoid router choosing its top-k with per-expert selection biases (DeepSeek-V3)"
    return "softmax router (DeepSeek-V2)"


def _balancing_sentence(recipe: dict) -> str:
    """How the card's recipe line states expert balancing."""
    loss = f"{_loss_scope(recipe)} balance loss x {coefficient_description(recipe, recipe['steps'])}"
    rate = recipe.get("bias_update_rate", 0.0)
    if not rate:
        return loss
    free = f"auxiliary-loss-free balancing (each expert's selection bias moves {rate} per step toward the mean load)"
    return free + (f" + {loss}" if recipe["balance_loss_coef"] else ", no balance loss")


def model_card(report: dict, ablation: list[dict] | None = None) -> str:
    spec, recipe = report["specialisation"], report["recipe"]
    layers = spec["layers"]
    lines = [
        f"# {MODEL_NAME}", "",
        (f"A small {ARCHITECTURE_NAMES[recipe.get('architecture', 'deepseek_v2')]}-architecture MoE "
         "in DeepSeek-V2-Lite's proportions, pretrained by the ESFT project's recipe "
         "(`esft pretrain`, module `esft/demo/pretrain.py`) on generated data (`esft/demo/synthetic.py`). "
         "It exists so that ESFT's effects can be shown and tested on a CPU without downloads: its experts "
         "specialise by domain, as the paper's DeepSeek-V2-Lite's do."), "",
        "## Recipe", "",
        (f"- parameters: {report['parameters']:,}; {spec['num_experts']} routed experts per MoE layer "
         f"(width {report['config']['moe_intermediate_size']}), top-{report['config']['num_experts_per_tok']}, "
         f"{report['config']['n_shared_experts']} shared experts, {report['config']['num_hidden_layers']} layers "
         f"(the first dense), hidden {report['config']['hidden_size']}, MLA attention "
         f"({report['config'].get('num_attention_heads', 4)} heads, key/value latent {report['config']['kv_lora_rank']}), "
         f"{_router_description(report['config'])}, "
         f"vocabulary {report['config']['vocab_size']}"),
        (f"- data: general mixture ({recipe['general_rows']:,} rows) + {', '.join(synthetic.PRETRAIN_TASKS)} "
         f"({recipe['task_rows']:,} rows each) in the User/Assistant template, plus raw text of every task domain "
         f"({recipe.get('held_out_raw_documents', 0):,} documents per held-out domain, {recipe['raw_documents']:,} per aligned "
         f"one); {report['data']['raw_text_share']:.1%} of the "
         f"{report['data']['tokens']:,} tokens are raw text. Held out of the instruction format: "
         f"{', '.join(synthetic.HELD_OUT_TASKS)}. Tokenizer: byte-level BPE trained on all of it."),
        (f"- training: {recipe['steps']} steps x {recipe['batch_rows']} x {recipe['seq_len']} tokens, AdamW, lr {recipe['lr']} "
         f"(warm-up + cosine), {_balancing_sentence(recipe)}; final loss "
         f"{report['history'][-1]['loss']:.3f}"),
        (f"- hardware and time: {report['seconds']:.0f} s on "
         f"{'1 GPU' if report.get('device') == 'cuda' else str(recipe['threads']) + ' CPU threads'} ({report['hardware']}), "
         f"torch {report['torch']}"),
        "", "## Gates (measured on these weights, before any fine-tuning)", "",
        *_table(["gate", "mini-moe", "target", "passed", "DeepSeek-V2-Lite"],
                [[g["gate"], g["value"], g["target"], "yes" if g["passed"] else "**no**",
                  next((ref for label, _, _, _, ref in GATES if label == g["gate"]), "-")] for g in spec["gates"]]),
        "", ("Definitions: routing is profiled on 400 training rows per domain in the instruction template, every "
        "token counted. Effective experts = exp(entropy) of a layer's token-score distribution. Selections use the "
        "token score at p = 0.2. Jaccard is over the (layer, expert) pairs of two tasks' selections. The mass ratio is "
        "the task's token-score mass on its selected experts over the general domain's mass on the same experts, per "
        "layer. Reproduce with `python bench/specialisation.py`."), "",
        "## Per domain", "",
        *_table(["domain", "answer loss (nats)", "vanilla metric", "effective experts per layer",
                 "token p=0.2 experts per layer"],
                [[d, spec["answer_loss"][d], spec.get("task_metric", {}).get(d, "-"),
                  " ".join(f"{v:.0f}" for v in spec["per_domain"][d]["effective_experts"]),
                  " ".join(str(v) for v in spec["per_domain"][d]["token_p02_experts"])] for d in DOMAINS]),
        "", f"Layers {layers[0]}-{layers[-1]}. Routing heatmaps per domain: `routing_heatmaps.png`.", "",
        "![routing](routing_heatmaps.png)", "",
        "## Jaccard of two domains' token p = 0.2 selections", "",
        *_table(["pair", "Jaccard"], [[pair, value] for pair, value in spec["jaccard"].items()]),
    ]
    if report.get("measured_at"):
        lines += ["", "## Pretraining length (the same run, measured along the way)", "",
                  *_table(["step", *[label for label, *_ in GATES], *[f"loss {t}" for t in synthetic.HELD_OUT_TASKS]],
                          [[m["step"], *[m["figures"][key] for _, key, *_ in GATES],
                            *[m["answer_loss"][t] for t in synthetic.HELD_OUT_TASKS]] for m in report["measured_at"]])]
    ablation = [a for a in ablation or [] if all(a["recipe"].get(k) == recipe.get(k) for k in ABLATION_SAME)]
    if ablation:
        lines += ["", "## Ablation: the routing knobs", "",
                  ("Pretraining runs with this recipe's architecture and data mix, measured by the same gates; `steps` "
                   "is where a run was measured (`of` its length when measured along the way of a longer run); "
                   "`architecture`: the router (DeepSeek-V2's softmax, or DeepSeek-V3's sigmoid with selection biases; "
                   "group-limited: a token's experts come from its best k of the expert groups) and the attention where "
                   "it differs from 4 heads and a key/value latent of 32; `balance`: the "
                   "balance loss's scope, or DeepSeek-V3's auxiliary-loss-free bias updates (per-step rate); "
                   "`extra raw text`: the recipe's translation_phrasebook (raw translation text in the task's direction) "
                   "and summary_digest (news articles followed by their summary)."), "",
                  *_table(["architecture", "balance", "coef", "steps", "extra raw text", "data tokens",
                           *[label for label, *_ in GATES], *[f"loss {t}" for t in synthetic.HELD_OUT_TASKS]],
                          [[architecture_description(a["recipe"]), balance_description(a["recipe"]),
                            coefficient_description(a["recipe"], _run_length(a)),
                            _steps_cell(a),
                            ", ".join(name for key, name in EXTRA_RAW_TEXT if a["recipe"].get(key)) or "none",
                            f"{a['data_tokens']:,}" if a.get("data_tokens") else "-",
                            *[a["figures"][key] for _, key, *_ in GATES],
                            *[a["answer_loss"][t] for t in synthetic.HELD_OUT_TASKS]] for a in ablation])]
    return "\n".join(lines) + "\n"


def refresh_model_card(model_dir: Path, ablation: list[dict]) -> Path:
    """Rewrite a built model's card from its saved report, with an ablation table (whose shorter
    runs may finish after the shipped one)."""
    report = json.loads((Path(model_dir) / "pretrain_report.json").read_text(encoding="utf-8"))
    path = Path(model_dir) / "README.md"
    atomic_write_text(path, model_card(report, ablation))
    return path


def _hardware(device: torch.device) -> str:
    """The GPU's name, or the CPU model (Linux) or the machine type, for the model card's timing."""
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return f"{platform.machine()}, {platform.system()}"


def training_device(name: str) -> torch.device:
    """Where the pretraining steps run: "cpu" (the recipe's reference) or a CUDA device. Measuring
    and saving always happen on the CPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EsftError(f"pretrain: unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise EsftError(f"pretrain: device {name!r} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EsftError(f"pretrain: device {name!r} asked for, but this torch sees no CUDA device; "
                        "drop --device (CPU) or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EsftError(f"pretrain: device {name!r} asked for, but this machine has {torch.cuda.device_count()} "
                        "CUDA device(s); use cuda:0 .. cuda:N-1")
    return device


@contextlib.contextmanager
def _pinned_torch(threads: int, device: torch.device):
    """Deterministic kernels and a fixed thread count for the build (the bits depend on both),
    restored afterwards so a caller's process (a test session, a notebook) is left as it was. On a
    GPU, attention runs on SDPA's math kernel (the memory-efficient kernel's backward is not
    deterministic) and any other operation without a deterministic CUDA kernel warns instead of
    failing: a GPU build is reproducible on the same GPU and software as far as those allow."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    kernels = sdpa_kernel(SDPBackend.MATH) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with kernels:
            yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])


def pretrain(recipe: PretrainRecipe, out: Path, overwrite: bool = False, ablation: list[dict] | None = None,
             device: str = "cpu") -> dict:
    """Build mini-moe into `out` (written atomically); returns the report also saved beside it.
    `ablation` (rows of earlier, shorter runs' reports) only adds a table to the model card;
    `device`: where the training steps run (the data, tokenizer, measurements and files are the same)."""
    recipe.validate()
    on = training_device(device)
    with _pinned_torch(recipe.threads, on), atomic_directory(out, overwrite=overwrite) as target:
        started = time.perf_counter()
        torch.manual_seed(recipe.seed)
        documents = pretraining_corpus(recipe)
        tokenizer = train_bpe_tokenizer(tokenizer_texts(documents, recipe), vocab_size=recipe.vocab_size)
        blocks, mix = token_blocks(documents, tokenizer, recipe)
        del documents  # millions of small Python objects the training loop does not need
        log.info("pretraining data: %d documents, %d tokens (%.1f%% raw text) -> %d blocks of %d tokens "
                 "(%d steps read %.1f epochs)",
                 mix["documents"], mix["tokens"], 100 * mix["raw_text_share"], len(blocks), recipe.seq_len, recipe.steps,
                 recipe.steps * recipe.batch_rows / len(blocks))
        model = AutoModelForCausalLM.from_config(mini_moe_config(len(tokenizer), recipe), dtype=torch.float32)
        measured_at: list[dict] = []

        def measure_along_the_way(step: int) -> None:
            if step in recipe.measure_at and step != recipe.steps:
                model.cpu()  # parameters move in place (the optimizer's references stay valid); buffers do not
                figures = measure_specialisation(model, tokenizer, recipe.seed, with_generation=False, rows=recipe.measure_rows)
                measured_at.append({"step": step, "figures": figures["figures"], "answer_loss": figures["answer_loss"]})
                log.info("step %d: %s", step, figures["figures"])
                model.to(on).train()

        history = train(model.to(on), blocks, recipe, on_step=measure_along_the_way)
        seconds = time.perf_counter() - started
        model.cpu()
        specialisation = measure_specialisation(model, tokenizer, recipe.seed, rows=recipe.measure_rows)
        save_domain_heatmaps(specialisation.pop("scores"), target / "routing_heatmaps.png")
        report = {"model": MODEL_NAME, "recipe": asdict(recipe), "config": model.config.to_diff_dict(),
                  "parameters": model.num_parameters(), "torch": torch.__version__, "hardware": _hardware(on),
                  "device": on.type,
                  "data": mix, "history": history, "seconds": round(seconds, 1), "specialisation": specialisation,
                  "measured_at": measured_at}
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        atomic_write_text(target / "pretrain_report.json", json.dumps(report, indent=1))
        atomic_write_text(target / "README.md", model_card(report, ablation))
    failed = [g["gate"] for g in report["specialisation"]["gates"] if not g["passed"]]
    log.info("mini-moe -> %s (%.0f s of training); gates %s", out, report["seconds"],
             "all passed" if not failed else "FAILED: " + "; ".join(failed))
    return report
