"""esft.memory.keep_freed_memory: with freed memory kept in the process, a loop of forward passes stops
faulting its temporaries in again; ESFT_KEEP_FREED_MEMORY=0 leaves the C library alone. Each case runs
in a fresh process: the setting is process-wide, and a test process has already allocated plenty."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHAPE = Path(__file__).resolve().parents[1] / "bench" / "configs" / "profile_model.json"

FORWARDS = f"""
import json, resource, torch
from transformers import AutoConfig, AutoModelForCausalLM
from esft.memory import keep_freed_memory
print(keep_freed_memory())
torch.set_num_threads(1)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.load(open({str(SHAPE)!r})), vocab_size=1000)).eval()
batch = torch.randint(3, 1000, (4, 256))
with torch.inference_mode():
    model.model(input_ids=batch); model.model(input_ids=batch)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        model.model(input_ids=batch)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        return False


def faults_per_forward(keep: bool) -> tuple[bool, float]:
    env = {**os.environ, "ESFT_KEEP_FREED_MEMORY": "1" if keep else "0"}
    lines = subprocess.run([sys.executable, "-c", FORWARDS], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    return lines[0] == "True", float(lines[1])


@pytest.mark.skipif(not glibc(), reason="not glibc: nothing to tune")
def test_forwards_stop_faulting_once_freed_memory_is_kept():
    applied, default = faults_per_forward(keep=False)
    assert not applied  # the opt-out
    kept_applied, kept = faults_per_forward(keep=True)
    assert kept_applied
    # The profiling bench's model, 4 x 256 tokens: ~21,000 minor faults per forward with glibc's defaults here
    # (its temporaries go back to the kernel after each forward), none once they are kept.
    assert default > 1000
    assert kept < default / 100
