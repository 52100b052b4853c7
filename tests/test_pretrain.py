"""The mini-moe recipe (esft.demo.pretrain) and the shipped embedded model: the balance loss's two
scopes against hand-computed values, the gates' bounds, a tiny end-to-end run of the v2 design
(deterministic, a standard Hugging Face directory, a model card with its gates), and the shipped
weights built by the default recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file

from esft.demo.pretrain import (
    ASSET_DIR,
    PRESETS,
    PretrainRecipe,
    balance_loss,
    check_gates,
    expert_slots,
    mini_moe_config,
    pretrain,
)


def one_hot_logits(experts: list[int], num_experts: int = 4) -> torch.Tensor:
    """Router logits that send each token overwhelmingly to one expert (probabilities ~1 / ~0)."""
    logits = torch.full((len(experts), num_experts), -30.0)
    logits[torch.arange(len(experts)), torch.tensor(experts)] = 30.0
    return logits


def test_balance_loss_batch_vs_sequence_scope():
    # 2 sequences x 4 tokens; sequence 0 uses only expert 0-1, sequence 1 only experts 2-3:
    # balanced over the batch, each sequence concentrated (what domain specialisation looks like).
    logits = one_hot_logits([0, 1, 0, 1, 2, 3, 2, 3])
    # batch: f_e = P_e = 1/4 for every expert -> E * sum f P = 4 * 4 * (1/16) = 1
    assert float(balance_loss((logits,), top_k=1, rows=1)) == pytest.approx(1.0, abs=1e-6)
    # per sequence: f = P = 1/2 on two experts -> 4 * 2 * (1/4) = 2, the loss pushes against specialising
    assert float(balance_loss((logits,), top_k=1, rows=2)) == pytest.approx(2.0, abs=1e-6)
    # layers are averaged
    collapsed = one_hot_logits([0] * 8)  # everything on expert 0: 4 * 1 * 1 = 4
    assert float(balance_loss((logits, collapsed), top_k=1)) == pytest.approx((1.0 + 4.0) / 2, abs=1e-6)


def test_global_balance_counts_load_over_earlier_batches():
    # This batch (4 tokens) uses only experts 0-1, as a one-domain batch would; an earlier batch
    # used only experts 2-3. Over the window the load is even (f = 1/4 each), so the loss is
    # E * sum f P = 4 * (1/4 * 1/2 + 1/4 * 1/2) = 1: nothing pushes this batch to spread out.
    logits = one_hot_logits([0, 1, 0, 1])
    earlier = expert_slots((one_hot_logits([2, 3, 2, 3]),), top_k=1)[:, 0]
    assert earlier.tolist() == [[0.0, 0.0, 2.0, 2.0]]
    assert float(balance_loss((logits,), top_k=1, earlier_slots_LE=earlier)) == pytest.approx(1.0, abs=1e-6)
    # batch scope alone sees f = P = 1/2 on two experts: 4 * 2 * (1/4) = 2
    assert float(balance_loss((logits,), top_k=1)) == pytest.approx(2.0, abs=1e-6)
    # the gradient still reaches the current batch's router probabilities (unsaturated logits)
    soft = (logits / 30).requires_grad_(True)
    balance_loss((soft,), top_k=1, earlier_slots_LE=earlier).backward()
    assert float(soft.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="rows=1"):
        balance_loss((logits,), top_k=1, rows=2, earlier_slots_LE=earlier)


def test_a_global_window_of_one_batch_is_batch_balance():
    # The training loop's global path with a window of 1 holds no earlier batch: it must train
    # exactly as batch-level balance does (same losses and balance values, step by step).
    from transformers import AutoModelForCausalLM

    from esft.demo.pretrain import train

    def history(scope: str) -> list[tuple[float, float]]:
        recipe = PretrainRecipe(steps=3, batch_rows=2, seq_len=16, balance_scope=scope, balance_window=1, log_every=1,
                                layers=2, routed_experts=8, experts_per_token=2, shared_experts=1, expert_width=8,
                                warmup_steps=1)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(mini_moe_config(64, recipe))
        blocks = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
        return [(h["loss"], h["balance"]) for h in train(model, blocks, recipe)]

    assert history("global") == history("batch")


def test_balance_coefficient_is_constant_then_decays_linearly_to_zero():
    from esft.demo.pretrain import balance_coefficient

    constant = PretrainRecipe(steps=100, balance_loss_coef=0.004)
    assert [balance_coefficient(s, constant) for s in (1, 50, 100)] == [0.004, 0.004, 0.004]
    decaying = replace(constant, balance_decay_start=0.6)  # constant to step 60, then 40 steps down to 0
    assert balance_coefficient(60, decaying) == 0.004
    assert balance_coefficient(70, decaying) == pytest.approx(0.004 * 30 / 40)
    assert balance_coefficient(90, decaying) == pytest.approx(0.004 * 10 / 40)
    assert balance_coefficient(100, decaying) == 0.0
    assert balance_coefficient(100, replace(constant, balance_decay_start=0.0)) == 0.0


def test_recipe_validation_names_the_setting():
    with pytest.raises(ValueError, match="balance_scope"):
        PretrainRecipe(balance_scope="token").validate()
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        PretrainRecipe(steps=0).validate()
    with pytest.raises(ValueError, match="balance_decay_start"):
        PretrainRecipe(balance_decay_start=1.5).validate()
    with pytest.raises(ValueError, match="architecture must be one of deepseek_v2, deepseek_v3"):
        PretrainRecipe(architecture="mixtral").validate()
    with pytest.raises(ValueError, match="bias_update_rate .* only with architecture deepseek_v3"):
        PretrainRecipe(bias_update_rate=0.001).validate()  # DeepSeek-V2's router has no bias
    with pytest.raises(ValueError, match="expert_groups must divide routed_experts"):
        PretrainRecipe(expert_groups=5).validate()
    with pytest.raises(ValueError, match="at least experts_per_token experts"):
        PretrainRecipe(expert_groups=16, groups_per_token=1).validate()  # 4 experts, top-6
    with pytest.raises(ValueError, match="bias_update_rate must be >= 0"):
        PretrainRecipe(architecture="deepseek_v3", bias_update_rate=-0.001).validate()


def test_a_deepseek_v3_router_chooses_with_its_biases_and_balances_on_normalised_sigmoid_scores():
    from esft.demo.pretrain import router_probabilities

    # Two tokens with the same scores on all 4 experts: the biases alone decide the top-2.
    logits = torch.zeros(2, 4)
    bias = torch.tensor([0.0, 0.3, -0.2, 0.1])
    assert expert_slots((logits,), top_k=2, biases=[bias])[0, 0].tolist() == [0.0, 2.0, 0.0, 2.0]
    # logits [0, ln 3]: sigmoid scores 1/2 and 3/4, normalised to 2/5 and 3/5 (softmax would give 1/4, 3/4)
    two = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    assert router_probabilities(two, sigmoid=True)[0].tolist() == pytest.approx([0.4, 0.6])
    assert router_probabilities(two, sigmoid=False)[0].tolist() == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("architecture, groups", [("deepseek_v3", (1, 1)), ("deepseek_v3", (8, 2)),
                                                   ("deepseek_v2", (8, 2)), ("deepseek_v2", (8, 3))])
def test_the_recipe_counts_the_routing_slots_the_model_chose(architecture, groups):
    """Parity with the model's own routing: with random selection biases (DeepSeek-V3) and group-
    limited routing, the recipe's slot counts (from the logits) equal the counts of what the
    routers actually chose."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from esft.demo.pretrain import selection_biases
    from esft.routing import capture_routing

    torch.manual_seed(0)
    recipe = replace(TINY_RECIPE, architecture=architecture, layers=3, expert_groups=groups[0], groups_per_token=groups[1])
    model = AutoModelForCausalLM.from_config(mini_moe_config(400, recipe)).eval()
    biases = selection_biases(model)
    for bias in biases or []:
        bias.copy_(torch.randn(bias.shape) * 0.05)  # the size of the scores' spread: it changes choices
    input_ids = torch.randint(3, 400, (2, 16))
    with torch.no_grad():
        logits = model(input_ids, output_router_logits=True).router_logits
    slots = expert_slots(logits, recipe.experts_per_token, biases=biases, groups=groups)[:, 0]
    chosen = capture_routing(model, input_ids, torch.ones_like(input_ids))
    for row, layer in enumerate(sorted(chosen)):
        assert slots[row].tolist() == np.bincount(chosen[layer][0].reshape(-1).numpy(), minlength=64).tolist()
    if groups != (1, 1):  # the groups did limit the choice
        assert not torch.equal(expert_slots(logits, recipe.experts_per_token, biases=biases)[:, 0], slots)
    if biases:
        assert not torch.equal(expert_slots(logits, recipe.experts_per_token, groups=groups)[:, 0], slots)


def test_auxiliary_loss_free_balancing_moves_each_bias_toward_the_mean_load():
    from esft.demo.pretrain import update_selection_biases

    biases = [torch.zeros(4), torch.full((4,), 0.5)]
    slots = torch.tensor([[6.0, 2.0, 4.0, 4.0], [0.0, 8.0, 8.0, 0.0]])  # layer means 4 and 4
    update_selection_biases(biases, slots, rate=0.01)
    assert biases[0].tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])  # over, under, at the mean
    assert biases[1].tolist() == pytest.approx([0.51, 0.49, 0.49, 0.51])


def test_gates_check_each_bound():
    report = {"figures": {"effective_experts_fraction": 0.7, "token_p02_fraction": 0.12, "held_out_jaccard": 0.1,
                          "routing_mass_ratio_median": 2.5},
              "answer_loss": {"math": 2.0, "code": 1.4, "translation": 4.0},
              "task_metric": {"math": 0.1, "code": 0.0, "translation": 0.2, "intent": 0.9, "law": 0.79, "summary": 0.95}}
    passed = {g["gate"]: g["passed"] for g in check_gates(report)}
    assert passed["effective experts / E (held-out, mean)"] and not passed["token p=0.2 picks / E (held-out, mean)"]
    assert passed["Jaccard of held-out selections (mean pair)"]
    assert passed["task / general routing mass of the selection (median)"]
    assert passed["vanilla answer loss, math"] and passed["vanilla answer loss, translation"]
    assert not passed["vanilla answer loss, code"]
    assert not passed["vanilla exact_match, code"] and passed["vanilla numeric, math"]
    assert passed["vanilla intent, intent"] and not passed["vanilla exact_match, law"]


TINY_RECIPE = replace(PRESETS["mini-moe"], steps=3, batch_rows=2, seq_len=64, general_rows=60, task_rows=20,
                      raw_documents=10, held_out_raw_documents=10, vocab_size=400, log_every=1, measure_rows=8, measure_at=(2,),
                      threads=1)


def test_a_tiny_recipe_run_is_deterministic_and_writes_a_standard_model_directory(tmp_path):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    first = pretrain(replace(TINY_RECIPE, threads=threads + 1), tmp_path / "a")
    # the build pins threads and deterministic kernels for itself only
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    first = pretrain(TINY_RECIPE, tmp_path / "a", overwrite=True)
    pretrain(TINY_RECIPE, tmp_path / "b")
    weights_a, weights_b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    report = json.loads((tmp_path / "a" / "pretrain_report.json").read_text())
    assert report["config"]["n_routed_experts"] == 64 and report["config"]["num_experts_per_tok"] == 6
    assert 0.1 <= report["data"]["raw_text_share"] <= 0.5
    assert [m["step"] for m in report["measured_at"]] == [2]
    assert {g["gate"] for g in report["specialisation"]["gates"]} == {g["gate"] for g in first["specialisation"]["gates"]}
    card = (tmp_path / "a" / "README.md").read_text()
    assert "## Gates" in card and "DeepSeek-V2-Lite" in card and "routing_heatmaps.png" in card
    assert (tmp_path / "a" / "routing_heatmaps.png").read_bytes()[:4] == b"\x89PNG"
    # loads with transformers alone, in a process that never imports the project
    program = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
               "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
               "ids = torch.tensor([t.encode('User: hi')]); print(m(ids).logits.shape[-1]); "
               "assert not [k for k in sys.modules if k == 'esft' or k.startswith('esft.')]")
    out = subprocess.run([sys.executable, "-c", program, str(tmp_path / "a")], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == report["config"]["vocab_size"]


def test_a_deepseek_v3_build_learns_selection_biases_and_loads_without_the_project(tmp_path):
    recipe = replace(TINY_RECIPE, architecture="deepseek_v3", bias_update_rate=0.01, balance_loss_coef=0.0, steps=4,
                     measure_at=())
    report = pretrain(recipe, tmp_path / "v3")
    assert report["config"]["model_type"] == "deepseek_v3"
    biases = {k: v for k, v in load_file(tmp_path / "v3" / "model.safetensors").items() if "e_score_correction_bias" in k}
    assert len(biases) == recipe.layers - 1  # one per MoE layer
    for bias in biases.values():  # four sign steps of 0.01 from 0: multiples of 0.01 within +-0.04, not all 0
        steps = bias / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 4 + 1e-4
    assert any(bias.abs().sum() > 0 for bias in biases.values())
    card = (tmp_path / "v3" / "README.md").read_text()
    assert "DeepSeek-V3-architecture" in card and "auxiliary-loss-free balancing" in card
    program = ("import sys; from transformers import AutoModelForCausalLM; "
               "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    out = subprocess.run([sys.executable, "-c", program, str(tmp_path / "v3")], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "DeepseekV3ForCausalLM"


def test_the_width_settings_build_a_wider_model_on_the_chosen_device(tmp_path):
    """--hidden-size / --expert-width (the scale lever): the config, the weights' shapes and the card
    follow them; the steps run on the device asked for (here the CPU) and the files are the same."""
    recipe = replace(TINY_RECIPE, hidden_size=64, expert_width=8, steps=2, measure_at=())
    report = pretrain(recipe, tmp_path / "wide", device="cpu")
    assert (report["config"]["hidden_size"], report["config"]["intermediate_size"],
            report["config"]["moe_intermediate_size"]) == (64, 192, 8)
    weights = load_file(tmp_path / "wide" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape[1] == 64
    assert weights["model.layers.1.mlp.experts.0.gate_proj.weight"].shape == (8, 64)
    assert report["device"] == "cpu" and "hidden 64" in (tmp_path / "wide" / "README.md").read_text()


def test_selection_biases_keep_learning_across_a_device_round_trip():
    """Measuring along the way moves the model to the CPU and back; that keeps the parameters but
    replaces buffers, where DeepSeek-V3's selection biases live. Simulated here by replacing every
    tensor after each step (what a CUDA -> CPU -> CUDA trip does): the run must end as a plain one."""
    from transformers import AutoModelForCausalLM

    from esft.demo.pretrain import _pinned_torch, train

    recipe = replace(TINY_RECIPE, architecture="deepseek_v3", bias_update_rate=0.01, balance_loss_coef=0.0, steps=4, layers=3)
    blocks = torch.randint(3, 400, (8, recipe.seq_len), generator=torch.Generator().manual_seed(0))

    def trained(on_step):
        with _pinned_torch(recipe.threads, torch.device("cpu")):  # the recipe's own deterministic setting
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(mini_moe_config(400, recipe), dtype=torch.float32)
            train(model, blocks, recipe, on_step=lambda step: on_step(model))
        return model.state_dict()

    plain = trained(lambda model: None)
    moved = trained(lambda model: model._apply(lambda t: t.clone()))
    biases = [k for k in plain if "e_score_correction_bias" in k]
    assert biases and any(plain[k].abs().sum() > 0.015 for k in biases)  # more than one step of 0.01 moved
    assert all(torch.equal(plain[k], moved[k]) for k in plain)


def test_the_shipped_model_is_what_the_default_recipe_builds():
    # The shipped model's recorded recipe and architecture are the default preset's, so
    # `esft pretrain` rebuilds it (the refactored recipe reproduces the earlier code bit for bit).
    report = json.loads((ASSET_DIR / "pretrain_report.json").read_text())
    default = json.loads(json.dumps(asdict(PRESETS["mini-moe"])))  # tuples as the report's JSON lists
    assert report["recipe"] == default
    shipped = json.loads((ASSET_DIR / "config.json").read_text())
    built = mini_moe_config(shipped["vocab_size"], PRESETS["mini-moe"]).to_dict()
    for key in ("num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
                "hidden_size", "intermediate_size", "kv_lora_rank", "max_position_embeddings", "first_k_dense_replace"):
        assert shipped[key] == built[key], key
    assert sum(p.stat().st_size for p in ASSET_DIR.iterdir()) <= 25 * 2**20


def test_the_shipped_design_has_deepseek_v2_lite_proportions():
    config = mini_moe_config(2048, PRESETS["mini-moe"])
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (64, 6, 2)
    assert config.num_hidden_layers - config.first_k_dense_replace >= 6 and config.first_k_dense_replace == 1
    assert config.moe_intermediate_size < config.hidden_size  # narrow, fine-grained experts


def test_the_card_tabulates_only_ablation_runs_of_the_same_recipe():
    """Rows with the recipe's architecture and data mix are tabulated (balance knob, where a run was
    measured, extra raw text); a run on another data mix is left out, however good its figures."""
    from esft.demo.pretrain import model_card

    report = json.loads((ASSET_DIR / "pretrain_report.json").read_text())
    figures = report["specialisation"]["figures"]
    losses = report["specialisation"]["answer_loss"]
    same = {**report["recipe"], "balance_loss_coef": 0.001, "translation_phrasebook": True, "steps": 600}
    rows = [{"recipe": same, "of_steps": 2400, "data_tokens": 1234567, "figures": figures, "answer_loss": losses},
            {"recipe": {**report["recipe"], "general_rows": 60000, "balance_loss_coef": 0.0777}, "figures": figures,
             "answer_loss": losses},
            {"recipe": {**same, "balance_decay_start": 0.5, "summary_digest": True}, "of_steps": 2400, "figures": figures,
             "answer_loss": losses},
            {"recipe": {**same, "architecture": "deepseek_v3", "bias_update_rate": 0.001, "balance_loss_coef": 0.0,
                        "kv_lora_rank": 64, "steps": 2400}, "figures": figures, "answer_loss": losses},
            {"recipe": {**same, "hidden_size": 256, "expert_width": 64, "steps": 2400}, "figures": figures,
             "answer_loss": losses}]  # the scale lever: a wider model on the same data
    card = model_card(report, rows)
    table = card.split("## Ablation: the routing knobs", 1)[1]
    assert "| DeepSeek-V2 | batch-level | 0.001 | 600 of 2400 | phrasebook | 1,234,567 |" in table
    assert "| DeepSeek-V2 | batch-level | 0.001, to 0 from step 1200 | 600 of 2400 | phrasebook, digest | - |" in table
    assert "| DeepSeek-V3, kv latent 64 | bias updates 0.001 | 0.0 | 2400 | phrasebook | - |" in table
    assert "| DeepSeek-V2, hidden 256, experts 64 wide | batch-level | 0.001 | 2400 | phrasebook | - |" in table
    assert "0.0777" not in table
    assert "## Ablation" not in model_card(report, rows[1:2])
