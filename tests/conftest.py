"""Shared fixtures: tiny models built from configs (never downloaded) and a tiny tokenizer."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from esft.testing import FAMILIES, tiny_model, tiny_tokenizer

# Every Ray cluster the suite starts (fixtures, the pipeline's own local cluster, drivers in subprocesses)
# runs its workers at the suite's own priority. Ray's default niceness of 15 lets any other job on a shared
# CI machine take the cores from them: with one core kept busy, a sweep test took 152 s instead of 108 s.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of random ids; the second row ends in padding."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(4, 1000, (2, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 18:] = 0
    return input_ids, attention_mask


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with 2 CPUs, started once for all the test modules that ask for it (with pytestmark). Those
    modules run last (`pytest_collection_modifyitems`), so no test that needs a cluster of its own comes between
    them, and the cluster's start-up and shutdown (~5 s, more on a busy machine) is paid once, not per module."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # a cluster that some earlier test left running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """The tests on the shared local Ray (`local_ray`) run after all the others, each group in its usual order."""
    items.sort(key=lambda item: "local_ray" in getattr(item, "fixturenames", ()))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def save_model_with_tokenizer(directory: Path, corpus: list[dict], family: str = "deepseek_v2") -> Path:
    """A tiny model directory with a tokenizer trained on `corpus` (ESFT messages rows)."""
    tokenizer = tiny_tokenizer([m["content"] for row in corpus for m in row["messages"]], vocab_size=400)
    tiny_model(family, vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
