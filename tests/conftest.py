"""Shared fixtures: tiny models built from configs (never downloaded) and a tiny tokenizer."""

from __future__ import annotations

import pytest
import torch

from esft.tiny import FAMILIES, tiny_model, tiny_tokenizer


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


def make_model(family: str, **kwargs):
    return tiny_model(family, **kwargs)
