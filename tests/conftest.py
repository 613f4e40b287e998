"""Shared test fixtures. Real images come from ../shared/data beside the project checkout
(or $HJEPA_SHARED_DATA); tests that need them skip with the reason when it is absent."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HJEPA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set HJEPA_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def cifar10_train() -> Path:
    """The 50,000 CIFAR-10 train JPEGs: <dir>/<class name>/NNNN.jpg."""
    return _shared("cifar10/train")


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    """1,000 real ImageNet JPEGs, one per class, flat: <wnid>_<name>.JPEG."""
    return _shared("imagenet-samples")


@pytest.fixture(scope="session")
def imagenet100_wnids_file() -> Path:
    return _shared("imagenet100_wnids.txt")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests run tiny models: a thread pool costs more than it saves on their small ops,
    and it oversubscribes the cores that loader workers and subprocesses also use."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
