"""The `esft` command line.

    esft inspect deepseek-ai/DeepSeek-V2-Lite
    esft profile --model deepseek-ai/DeepSeek-V2-Lite --data train.jsonl --out runs/profile
    esft select --scores runs/profile --score-function token --top-p 0.2 --out expert_cfg.json
    esft merge --model deepseek-ai/DeepSeek-V2-Lite --adapter runs/train/adapter --out merged/
    esft quickstart --out runs/quickstart

Every command validates its inputs before it spends compute, prints one line `esft: error: ...`
naming the problem and the fix on bad input, and exits 2 without writing partial outputs. Every
--out follows one policy, checked first: an existing target is refused unless --overwrite (train:
--resume), and its directory must be writable. Ctrl-C prints `esft: interrupted` and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from esft.errors import EsftError
from esft.io import check_output

log = logging.getLogger("esft")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model repo's own Python code (off by default)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from esft.model import describe, format_description, load_skeleton

    # Libraries imported on the way (DeepSpeed's accelerator probe) print to stdout; keep stdout
    # for our report so `--json` output can be piped.
    with contextlib.redirect_stdout(sys.stderr):
        description = describe(load_skeleton(args.model, trust_remote_code=args.trust_remote_code))
    print(json.dumps(description.as_dict(), indent=2) if args.json else format_description(description))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from esft.select import check_top_p, load_layer_scores, select_experts

    if args.top_p is not None:
        check_top_p(args.top_p)  # fail before reading anything
    check_output(args.out, directory=False, overwrite=args.overwrite)
    layer_scores = load_layer_scores(args.scores, args.score_function, args.averaging)
    config = select_experts(
        layer_scores,
        top_p=args.top_p,
        experts_per_layer=args.experts_per_layer,
        shared_experts=args.train_shared_experts,
        non_expert_modules=args.train_non_expert_modules,
    )
    config.save(args.out)
    per_layer = [len(ids) for ids in config.experts.values()]
    print(
        f"selected {config.num_selected} experts over {len(per_layer)} layers "
        f"({min(per_layer)}-{max(per_layer)} per layer) -> {args.out}"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from esft.adapter import check_adapter, load_adapter
    from esft.io import atomic_directory
    from esft.model import load_model
    from esft.trainable import merge_adapter

    check_output(args.out, directory=True, overwrite=args.overwrite)
    model = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    check_adapter(model, args.adapter)  # before anything is written
    load_adapter(model, args.adapter)
    merge_adapter(model)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        _copy_tokenizer(args.model, tmp, args.trust_remote_code)
    print(f"merged {args.adapter} into {args.model} -> {args.out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def _copy_tokenizer(model: str, out: Path, trust_remote_code: bool) -> None:
    """Save the base model's tokenizer beside the merged weights, when it has one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # none to copy (tiny:<family>, custom code); weights still merge
        log.info("no tokenizer found for %s; the merged directory holds weights and config only", model)
        return
    tokenizer.save_pretrained(out)


def _stage_config(args: argparse.Namespace, cls: type, stage: str):
    """A stage's typed config: the YAML given with --config, then the flags actually given."""
    from pipeline.config import build_config, read_yaml

    file_values = read_yaml(args.config) if args.config else {}
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command", "verbose")}
    return build_config(cls, file_values, overrides, where=args.config or stage)


def cmd_profile(args: argparse.Namespace) -> int:
    from pipeline.profile import ProfileConfig, run_profile

    config = _stage_config(args, ProfileConfig, "profile")
    if config.out:  # a missing --out is reported by the config's own validation
        check_output(config.out, directory=True, overwrite=config.overwrite)
    run_profile(config)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import TrainConfig, run_train

    config = _stage_config(args, TrainConfig, "train")
    if config.out:
        # An existing run directory is judged by run_train (refused unless --resume, which continues
        # it: deleting a run's checkpoints is left to the user); here only its kind and writability.
        check_output(config.out, directory=True, overwrite=True)
    run_train(config)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import EvalConfig, run_eval

    config = _stage_config(args, EvalConfig, "eval")
    if config.out:  # before the generation, which can take minutes
        check_output(config.out, directory=False, overwrite=args.overwrite)
    run_eval(config)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import build_config, read_yaml
    from pipeline.run import PipelineConfig, run_pipeline

    overrides = {"run_dir": args.run_dir}
    run_pipeline(build_config(PipelineConfig, read_yaml(args.config), overrides, where=args.config), source=args.config)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.config import build_config, read_yaml
    from pipeline.tune import SweepConfig, run_sweep

    overrides = {"run_dir": args.run_dir, "max_concurrent_trials": args.max_concurrent_trials}
    run_sweep(build_config(SweepConfig, read_yaml(args.config), overrides, where=args.config), restart=args.restart)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.register import generate_text

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the generated text
        text = generate_text(args.model, args.prompt, tracking_uri=args.tracking_uri, max_new_tokens=args.max_new_tokens,
                             trust_remote_code=args.trust_remote_code, base_model=args.base_model)
    print(text)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from esft.demo.pretrain import ASSET_DIR, PRESETS, pretrain, training_device

    settings = {"steps": args.steps, "seed": args.seed, "balance_loss_coef": args.balance_loss_coef,
                "balance_scope": args.balance_scope, "balance_window": args.balance_window,
                "balance_decay_start": args.balance_decay_start,
                "architecture": args.architecture, "bias_update_rate": args.bias_update_rate,
                "attention_heads": args.attention_heads, "kv_lora_rank": args.kv_lora_rank,
                "hidden_size": args.hidden_size, "expert_width": args.expert_width,
                "expert_groups": args.expert_groups, "groups_per_token": args.groups_per_token,
                "threads": args.threads,
                "measure_at": tuple(args.measure_at) if args.measure_at else None,
                "translation_phrasebook": args.translation_phrasebook or None, "summary_digest": args.summary_digest or None}
    recipe = replace(PRESETS[args.preset], **{k: v for k, v in settings.items() if v is not None})
    recipe.validate()
    training_device(args.device)  # a missing GPU is an error before anything is written
    out = Path(args.out or ASSET_DIR)
    check_output(out, directory=True, overwrite=args.overwrite)  # before ~40 minutes of pretraining
    ablation = None
    if args.ablation:
        try:
            ablation = json.loads(Path(args.ablation).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise EsftError(f"pretrain: cannot read the ablation table {args.ablation} ({error}); "
                            "write it with `python bench/pretrain_ablation.py`") from error
    pretrain(recipe, out, overwrite=args.overwrite, ablation=ablation, device=args.device)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from esft.io import atomic_directory
    from esft.demo.synthetic import write_corpus

    check_output(args.out, directory=True, overwrite=args.overwrite)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:  # the corpus appears whole or not at all
        paths = write_corpus(tmp, seed=args.seed, train_rows=args.train_rows, eval_rows=args.eval_rows,
                             general_rows=args.train_rows)
    print(f"wrote {len(paths)} domains ({', '.join(paths)}) x train/eval -> {args.out}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from esft.demo.quickstart import run_quickstart

    check_output(args.out, directory=True, overwrite=args.overwrite)
    run_quickstart(Path(args.out), steps=args.steps, overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esft", description="Expert-Specialized Fine-Tuning for MoE LLMs")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, libraries' notices, and the traceback behind an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print a MoE model's structure (no weights are loaded)")
    p.add_argument("model", help="hub id, local directory, or tiny:<family>")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="the whole pipeline: profile -> select -> train -> eval -> register")
    p.add_argument("--config", required=True, help="pipeline YAML (see configs/quickstart.yaml)")
    p.add_argument("--run-dir", help="override the config's run directory")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tune", help="Ray Tune sweep over expert selection, tracked in MLflow, best adapter registered")
    p.add_argument("--config", required=True, help="sweep YAML (see configs/sweep.yaml)")
    p.add_argument("--run-dir", help="override the config's run directory")
    p.add_argument("--max-concurrent-trials", type=int, help="override the config's max_concurrent_trials")
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished sweep in the run directory instead of resuming it")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("generate", help="greedy generation from a registered adapter (models:/NAME@champion) or a model")
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, a model directory or hub id")
    p.add_argument("--prompt", required=True, help="the user message (formatted with the reference template)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of the registry (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--base-model", help="a local copy of a registered version's base model, when it was not logged with it")
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("profile", help="profile expert routing of task corpora on Ray Data (scores, summary, heatmaps)")
    p.add_argument("--config", help="YAML file with these settings; flags override it")
    p.add_argument("--model", help="hub id or local directory of a supported MoE model")
    p.add_argument("--data", action="append",
                   help="JSONL / Parquet file or directory, saved HF dataset, or hub name; repeat for several tasks")
    p.add_argument("--out", help="output directory")
    p.add_argument("--n-sample-tokens", type=int, help="token budget per corpus (default 131072 = 32 x 4096)")
    p.add_argument("--seq-len", type=int, help="packed row length (default 4096)")
    p.add_argument("--batch-size", type=int, help="rows per forward (default 4)")
    p.add_argument("--replicas", type=int, help="model replicas in the actor pool (default: 1 with GPUs; on CPUs one "
                   "replica per 262,144 tokens of budget, up to one per CPU, sharing the cores)")
    p.add_argument("--gpus-per-replica", type=float, help="GPUs per replica; > 1 splits layers across them (default 0)")
    p.add_argument("--cpus-per-replica", type=float, help="CPUs reserved per replica")
    p.add_argument("--seed", type=int, help="shuffling seed (default 0)")
    p.add_argument("--loss-tokens-only", action="store_true", default=None, help="count only answer tokens")
    p.add_argument("--template", choices=["reference", "chat"], help="prompt format (default: the reference template)")
    p.add_argument("--tokenizer", help="tokenizer to use (default: the model's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", default=None, help="replace --out if it exists")
    _add_model_args(p)
    p.set_defaults(func=cmd_profile, trust_remote_code=None)

    p = sub.add_parser("train", help="fine-tune on Ray Train + DeepSpeed: ESFT (selected experts), FFT or LoRA")
    p.add_argument("--config", help="YAML file with these settings; flags override it")
    p.add_argument("--model", help="hub id or local directory of a supported MoE model")
    p.add_argument("--data", help="task training data (JSONL, Parquet, saved HF dataset or hub name)")
    p.add_argument("--expert-config", help="expert_cfg.json from `esft select` (method esft)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--method", choices=["esft", "fft", "lora"])
    p.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, bf16 with fp32 masters")
    p.add_argument("--deepspeed", help="zero0 | zero1 | zero2 (default) | zero3 | a DeepSpeed JSON file")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, help="default: the paper's (ESFT 1e-5, FFT 3e-5, LoRA 1e-4)")
    p.add_argument("--batch-size", type=int, help="rows per worker per micro-step")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-data", help="validation data (default: a held-out split of --data)")
    p.add_argument("--general-data", help="general-domain data whose loss tracks forgetting")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    p.add_argument("--max-failures", type=int, help="worker failures to survive (default 2)")
    p.add_argument("--tokenizer", help="default: the model's")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    _add_model_args(p)
    p.set_defaults(func=cmd_train, trust_remote_code=None)

    p = sub.add_parser("eval", help="generate on Ray Data and score: task metrics, general loss, lm-eval")
    p.add_argument("--config", help="YAML file with these settings; flags override it")
    p.add_argument("--model", help="base model: hub id or local directory")
    p.add_argument("--adapter", help="ESFT adapter directory applied on top of --model")
    p.add_argument("--merged", help="a merged model directory used instead of --model's weights")
    p.add_argument("--data", help="eval JSONL: reference rows (prompt, answers) or single-turn messages")
    p.add_argument("--metric", action="append", choices=["exact_match", "numeric", "intent", "rouge_l", "bleu", "chrf"])
    p.add_argument("--out", help="metrics JSON to write (predictions go beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable; default: blank line and 'User:')")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--replicas", type=int)
    p.add_argument("--gpus-per-replica", type=float)
    p.add_argument("--general-data", help="general-domain corpus for loss / perplexity (forgetting)")
    p.add_argument("--lm-eval-tasks", action="append", help="lm-eval task names, when lm-eval is installed")
    p.add_argument("--tokenizer")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    _add_model_args(p)
    p.set_defaults(func=cmd_eval, trust_remote_code=None)

    p = sub.add_parser("select", help="choose experts from profiled scores (writes expert_cfg.json)")
    p.add_argument("--scores", required=True, help="our scores file, a directory holding one, or a reference summary.json")
    p.add_argument("--score-function", required=True, choices=["token", "gate"])
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--top-p", type=float, help="cumulative score threshold in (0, 1] (paper: token 0.2, gate 0.1)")
    budget.add_argument("--experts-per-layer", type=int, help="fixed budget: the N best experts of every layer")
    p.add_argument("--averaging", choices=["token", "sequence"], default="token",
                   help="token-pooled (reference) or per-sequence mean")
    p.add_argument("--train-shared-experts", action="store_true")
    p.add_argument("--train-non-expert-modules", action="store_true")
    p.add_argument("--out", required=True, help="expert config file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("merge", help="merge an adapter into its base model (a plain Hugging Face model directory)")
    p.add_argument("--model", required=True, help="base model: hub id, local directory, or tiny:<family>")
    p.add_argument("--adapter", required=True, help="adapter directory (expert_cfg.json + model.safetensors)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_model_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("pretrain", help="the recipe of the embedded mini-moe: tokenizer + MoE pretraining on generated data")
    p.add_argument("--out", help="model directory (default: the package's esft/demo/assets/mini-moe)")
    p.add_argument("--preset", default="mini-moe", choices=["mini-moe", "mini-moe-v1"],
                   help="mini-moe: the shipped model's recipe (default); "
                        "mini-moe-v1: the first embedded model (32 experts, template data only)")
    p.add_argument("--steps", type=int, help="pretraining steps (default: the preset's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--balance-loss-coef", type=float, help="weight of the expert-balance loss (default: the preset's)")
    p.add_argument("--balance-scope", choices=["batch", "sequence", "global"],
                   help="balance expert load per batch (default), per sequence, or over a window of recent batches (global)")
    p.add_argument("--balance-window", type=int, help="batches in the global balance window (default: the preset's)")
    p.add_argument("--balance-decay-start", type=float,
                   help="share of training after which the balance coefficient decays linearly to 0 (default: 1, constant)")
    p.add_argument("--architecture", choices=["deepseek_v2", "deepseek_v3"],
                   help="router: DeepSeek-V2's softmax top-k or DeepSeek-V3's sigmoid top-k with selection biases "
                        "(default: the preset's)")
    p.add_argument("--bias-update-rate", type=float,
                   help="DeepSeek-V3 auxiliary-loss-free balancing: per-step change of each expert's selection bias "
                        "(deepseek_v3 only; default: the preset's, 0 = off)")
    p.add_argument("--expert-groups", type=int,
                   help="group-limited routing: the routed experts form this many groups (default: the preset's, 1)")
    p.add_argument("--groups-per-token", type=int,
                   help="group-limited routing: a token's experts come from its best this-many groups (default: 1)")
    p.add_argument("--attention-heads", type=int, help="attention heads per layer (default: the preset's)")
    p.add_argument("--kv-lora-rank", type=int, help="MLA's compressed key/value width (default: the preset's)")
    p.add_argument("--hidden-size", type=int, help="model width; the dense first layer's MLP is 3x it (default: the preset's)")
    p.add_argument("--expert-width", type=int, help="each routed and shared expert's hidden width (default: the preset's)")
    p.add_argument("--threads", type=int, help="CPU threads for pretraining (default: the preset's)")
    p.add_argument("--device", default="cpu",
                   help="where the training steps run: cpu (default, the recipe's reference) or cuda[:N]; "
                        "data, measurements and files are the same")
    p.add_argument("--translation-phrasebook", action="store_true",
                   help="also pretrain on a Veltish phrasebook (English, then Veltish) among the raw translation text")
    p.add_argument("--summary-digest", action="store_true",
                   help="also pretrain on news digests (an article, then its summary) among the raw summary text")
    p.add_argument("--measure-at", type=int, nargs="*", help="also measure routing specialisation at these steps")
    p.add_argument("--ablation", help="JSON rows from bench/pretrain_ablation.py to tabulate in the model card")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("data", help="write the generated task corpora (math, code, intent, law, translation, summary, general)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("quickstart", help="profile -> select -> train -> save -> merge on the embedded default")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_quickstart)
    return parser


# OSErrors that name a path the user gave (missing, in the way, of the wrong kind, not permitted);
# other OSErrors (a full disk, a lost mount) keep their traceback.
PATH_ERRORS = (FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


# Libraries' notices that are not about the user's run: kept out of the terminal unless -v (their
# warnings and errors still show). Each stage prints its own progress instead.
QUIET_LOGGERS = (
    "ray.data._internal.progress",  # "Progress bars disabled": we disable them on purpose
    "ray._private.authentication.authentication_token_setup",  # Ray's notice that its default token auth is on
)
QUIET_ENVIRONMENT = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables", "Validating input example ..."
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a progress bar per artifact download
}


def quiet_library_notices(verbose: bool) -> None:
    """Without -v: the QUIET_LOGGERS show only errors and MLflow only warnings (settings the user
    exported win)."""
    if verbose:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for variable, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)  # read when MLflow is imported, later and lazily


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    quiet_library_notices(args.verbose)
    try:
        return args.func(args)
    # Input errors are EsftError (esft/errors.py: ConfigError, DataError, AdapterError, OutputError,
    # ...; third-party errors caused by input are re-raised as one of them) or an OSError about a
    # path. Everything else, a plain ValueError from numpy or torch included, is a bug or an
    # environment failure and keeps its traceback.
    except (EsftError, *PATH_ERRORS) as error:
        if args.verbose:  # where in the code the input was refused
            traceback.print_exc()
        print(f"esft: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written atomically, so a rerun starts clean
        print("esft: interrupted; rerun the command (esft train: add --resume to continue from the last checkpoint)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
