"""Shared test fixtures. Real images come from ../shared/data beside the project checkout
(or $HJEPA_SHARED_DATA); tests that need them skip with the reason when it is absent."""

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

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


@pytest.fixture(scope="session")
def compose_config():
    """compose_config(*overrides, name="config"): the composed config of conf/<name>.yaml."""

    def compose_(*overrides: str, name: str = "config"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(name, overrides=list(overrides))

    return compose_


@pytest.fixture(scope="session")
def tiny(compose_config):
    """tiny(*overrides): experiment=tiny (conf/experiment/tiny.yaml), the suite's recipe:
    test_vit on 256 synthetic images, 2 epochs of 16 steps, on one CPU thread."""
    return lambda *overrides: compose_config("experiment=tiny", *overrides)


@pytest.fixture(scope="session")
def losses():
    """losses(run_dir): (step, loss, loss/level0) of every record in the run's metrics.jsonl."""
    return lambda run_dir: [(r["step"], r["loss"], r["loss/level0"])
                            for r in map(json.loads, open(Path(run_dir) / "metrics.jsonl"))]


@pytest.fixture
def imagenet_tree(imagenet_samples):
    """imagenet_tree(root, splits=("train", "val")): <root>/<split>/<wnid>/<file>.JPEG
    symlinked to the 1,000 flat ImageNet samples (one image per class)."""

    def make(root: Path, splits=("train", "val")) -> Path:
        for name in os.listdir(imagenet_samples):
            wnid = name.split("_", 1)[0]
            for split in splits:
                (root / split / wnid).mkdir(parents=True, exist_ok=True)
                os.symlink(imagenet_samples / name, root / split / wnid / name)
        return root

    return make
