"""One training step of ESFT vs full fine-tuning vs the limit, side by side in one process.

    python bench/train_step.py [--sizes large small] [--repeats 7]
    python bench/train_step.py --device cuda --dtype bfloat16 --sizes lite     # on a GPU

Same model, same weights, same batch for the three variants:
- fft: every parameter trainable, AdamW over all of them;
- esft: the experts chosen by token score p = 0.2 on this batch's routing (what `esft select`
  would pick), through `apply_expert_config`;
- limit: every weight frozen, the step only propagates activation gradients back to the input
  embeddings. No selective method can do less work than this and still train experts.

Variants are timed round-robin (one step each per round, medians over rounds) so machine noise
hits all of them alike. The last line of output is one JSON object (ARCHITECTURE §7):
`step_time_esft_over_fft`, `step_time_limit_over_fft`, `step_time_esft_over_limit`,
`optimizer_state_esft_over_fft`, `trainable_fraction`, for the headline size, and the same with
a `<size>.` prefix for every size run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/profile.py is named like the standard library's `profile` module, which torch imports
# indirectly; keep this folder off the import path so the standard one is found.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

# glibc returns large freed blocks to the OS and page-faults them in again on the next
# allocation; on CPU that noise is a large share of a step and lands unevenly on the variants.
# Keep freed memory in the process for every variant alike (the usual CPU-training advice,
# like running under jemalloc). Set before torch allocates anything: re-exec once.
_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in _ALLOCATOR_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_ALLOCATOR_ENV})

import torch  # noqa: E402

from esft.scores import layer_score_dict, profile_batch  # noqa: E402
from esft.select import select_experts  # noqa: E402
from esft.testing import tiny_model  # noqa: E402
from esft.trainable import apply_expert_config  # noqa: E402
from esft.training import make_optimizer  # noqa: E402

# A DeepSeek-V2-shaped MoE where routed experts dominate the step: 32 fine-grained experts,
# top-4, one shared expert, every layer MoE. "small" is the tests' tiny config.
SIZES = {
    "large": dict(
        model=dict(hidden_size=384, moe_intermediate_size=512, n_routed_experts=32, num_experts_per_tok=4,
                   num_hidden_layers=4, first_k_dense_replace=0, num_attention_heads=4, num_key_value_heads=4),
        batch=4, seq=512,
    ),
    "small": dict(model=dict(), batch=4, seq=128),
    # DeepSeek-V2-Lite's MoE layer shape (64 experts of 1408, top-6, 2 shared, MLA), 4 layers: a GPU size,
    # the shape bench/gpu_check.py also runs through the pipeline (bench/configs/lite_layers.json).
    "lite": dict(
        model={k: v for k, v in json.loads((Path(__file__).parent / "configs" / "lite_layers.json").read_text()).items()
               if k != "model_type"},
        batch=2, seq=4096,
    ),
}
TOP_P = 0.2


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def limit_step(model, input_ids):
    """The limit's step on `model` (frozen here): activation gradients back to the input embeddings,
    no weight gradient, no optimizer."""
    model.train().requires_grad_(False)

    def step():
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=input_ids).loss.backward()
    return step


def make_variants(base, input_ids):
    """Return {name: (step_fn, optimizer or None, trainable params, model)}."""
    scores = profile_batch(base, input_ids, torch.ones_like(input_ids))
    config = select_experts(layer_score_dict(scores.layers, scores.scores("token")), top_p=TOP_P)

    fft = copy.deepcopy(base).train()
    fft_opt = make_optimizer(fft, 1e-5)

    esft = copy.deepcopy(base).train()
    summary = apply_expert_config(esft, config)
    esft_opt = make_optimizer(esft, 1e-5)

    def trainer(model, optimizer):
        def step():
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    return {"fft": trainer(fft, fft_opt), "esft": trainer(esft, esft_opt), "limit": limit_step(copy.deepcopy(base), input_ids)}, {
        "fft_opt": fft_opt, "esft_opt": esft_opt, "summary": summary, "config": config,
    }


def measure(size: str, repeats: int, device: str = "cpu", dtype: str = "float32", warmup: int = 2) -> dict:
    spec = SIZES[size]
    with torch.device(device):  # built in place: the GPU sizes are too large to initialise on a CPU quickly
        base = tiny_model("deepseek_v2", seed=0, dtype=getattr(torch, dtype), **spec["model"])
    input_ids = torch.randint(4, base.config.vocab_size, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    steps, extra = make_variants(base, input_ids)
    times = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if device != "cpu":
                torch.cuda.synchronize()  # kernels run asynchronously: time the work, not the launch
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    summary = extra["summary"]
    fft_state, esft_state = optimizer_state_bytes(extra["fft_opt"]), optimizer_state_bytes(extra["esft_opt"])
    total = sum(p.numel() for p in base.parameters())
    return {
        "ratios": {
            "step_time_esft_over_fft": median["esft"] / median["fft"],
            "step_time_limit_over_fft": median["limit"] / median["fft"],
            "step_time_esft_over_limit": median["esft"] / median["limit"],
            "optimizer_state_esft_over_fft": esft_state / fft_state,
            "trainable_fraction": summary.trainable_parameters / total,
        },
        "raw": {
            "median_step_seconds": median,
            "all_step_seconds": times,
            "optimizer_state_bytes": {"fft": fft_state, "esft": esft_state},
            "trainable_parameters": summary.trainable_parameters,
            "total_parameters": total,
            "selected_experts": summary.selected_experts,
            "routed_experts": summary.routed_experts,
        },
        "config": {"family": "deepseek_v2", **spec["model"], "batch": spec["batch"], "seq": spec["seq"],
                   "selection": f"token p={TOP_P}", "repeats": repeats, "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name() if device != "cpu" else "cpu", "dtype": dtype,
                   "optimizer": "AdamW (fused)", "allocator_env": _ALLOCATOR_ENV},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["large", "small"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    results = {}
    for size in args.sizes:
        results[size] = measure(size, args.repeats, args.device, args.dtype)
        print(f"{size}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[size]["ratios"].items()), file=sys.stderr)
    headline = results[args.sizes[0]]
    ratios = dict(headline["ratios"])
    for size, result in results.items():
        ratios.update({f"{size}.{k}": v for k, v in result["ratios"].items()})
    print(json.dumps({"ratios": ratios, "raw": {s: r["raw"] for s, r in results.items()},
                      "config": {s: r["config"] for s, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
