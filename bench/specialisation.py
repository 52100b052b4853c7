"""Does the embedded model have ESFT's premise? The gates of mini-moe (routing concentration,
task-specific experts, held-out tasks learnable but not yet aligned), measured on any model
directory built by `esft pretrain`, beside DeepSeek-V2-Lite's own figures.

    python bench/specialisation.py [--model esft/demo/assets/mini-moe]

Prints the gates table and, last, one JSON object ({"ratios", "raw", "config"}) whose raw part
says which gates passed. The recipe writes the same measurement into the model card (esft.demo.pretrain.model_card).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/profile.py shadows the standard library's `profile` module for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from esft.demo.pretrain import ASSET_DIR, GATES, measure_specialisation  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ASSET_DIR), help="a model directory built by `esft pretrain`")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the profiled and evaluated rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report = measure_specialisation(model, tokenizer, seed=args.seed)
    report.pop("scores")
    reference = {label: ref for label, _, _, _, ref in GATES}
    print(f"| gate | {Path(args.model).name} | target | passed | DeepSeek-V2-Lite |\n|---|---|---|---|---|")
    for gate in report["gates"]:
        print(f"| {gate['gate']} | {gate['value']} | {gate['target']} | {'yes' if gate['passed'] else 'NO'} | "
              f"{reference.get(gate['gate'], '-')} |")
    print(json.dumps({"ratios": report["figures"], "raw": report, "config": {"model": args.model, "seed": args.seed}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
