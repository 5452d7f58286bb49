"""Shared test fixtures. Everything is built locally (tiny random models, synthetic data): no downloads."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails fast instead of hanging
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
