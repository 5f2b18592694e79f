"""Fixtures shared by the whole suite: the official reference outputs in ../shared/reference."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import yaml

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


# The [dev] extra's modules whose tests skip where they are missing: locally a convenience, in CI a hidden gap.
DEV_MODULES = ("transformers", "safetensors", "onnx", "onnxruntime", "onnxscript", "imageio_ffmpeg", "tensorboard",
               "ruff")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Locally the parity tests skip without the fixtures; in CI a skip would hide a missing parity check.
    if os.environ.get("CI") != "true":
        return
    if not REFERENCE.is_dir():
        raise pytest.UsageError(f"CI=true but the reference fixtures are missing at {REFERENCE}")
    missing = [name for name in DEV_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f"CI=true but the [dev] extra is incomplete (missing: {', '.join(missing)}), whose "
                                f"tests would skip: pip install -e '.[dev]'")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def reference_input(reference_dir: Path) -> torch.Tensor:
    return torch.load(reference_dir / "inputs" / "input_1x3x512x512_seed0.pt", weights_only=True)


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache(tmp_path_factory: pytest.TempPathFactory):
    """The native kernels build into this session's temporary folder: the suite neither needs a writable home nor
    leaves files in the user's cache."""
    from edgeseg.models import native

    mp = pytest.MonkeyPatch()
    mp.setenv("EDGESEG_CACHE_DIR", str(tmp_path_factory.mktemp("edgeseg-cache")))
    native.library.cache_clear()
    yield
    mp.undo()
    native.library.cache_clear()


@pytest.fixture(autouse=True)
def _one_thread():
    """The suite runs small models on a shared 2-core machine, where OpenMP threads spin-waiting for each other cost
    more than they gain (measured 5-10x slower under load): one intra-op thread for every test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_distill_recipe(tmp_path: Path):
    """A function writing a seconds-long ``edgeseg distill`` recipe on ``scenes`` (8 classes): two stage-1 and two
    stage-2 iterations, sparsity 0.5 reached at the second step, one evaluation at the end. Returns its path."""

    def write(model: dict, crop: int = 32) -> Path:
        size = [crop, crop]
        recipe = {
            "model": model,
            "data": {"dataset": "scenes", "crop_size": size, "scale": [2 * crop, crop], "test_scale": [2 * crop, crop],
                     "batch_size": 2, "workers": 0, "train_kwargs": {"num_images": 8, "size": size},
                     "val_kwargs": {"num_images": 2, "size": size}},
            "optim": {"lr": 1e-3},
            "schedule": {"iters": 2, "warmup_iters": 0},
            "train": {"log_interval": 1, "eval_interval": 2},
            "distill": {"sparsity": 0.5, "anneal_iters": 2, "stage1_iters": 2},
        }
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write

