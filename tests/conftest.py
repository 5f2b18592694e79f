"""Fixtures shared by the whole suite: the official reference outputs in ../shared/reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def pytest_sessionstart(session: pytest.Session) -> None:
    # Locally the parity tests skip without the fixtures; in CI a skip would hide a missing parity check.
    if os.environ.get("CI") == "true" and not REFERENCE.is_dir():
        raise pytest.UsageError(f"CI=true but the reference fixtures are missing at {REFERENCE}")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def reference_input(reference_dir: Path) -> torch.Tensor:
    return torch.load(reference_dir / "inputs" / "input_1x3x512x512_seed0.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """The suite runs small models on a shared 2-core machine, where OpenMP threads spin-waiting for each other cost
    more than they gain (measured 5-10x slower under load): one intra-op thread for every test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
