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


@pytest.fixture
def make_bad_tree(imagenet_samples):
    """make_bad_tree(root): <root>/<class>/<files>, a real JPEG from imagenet-samples saved
    every way an image folder goes wrong or merely unusual. Returns {path: None} for the files
    that must decode to an RGB uint8 image and {path: reason} for those that must be skipped
    (or, with on_error=raise, named), the reason being a phrase the message contains. Three
    classes: `mixed` (every case), `odd_but_fine` (only valid odd files), `all_bad` (nothing
    readable). A broken symlink sits in `mixed` (not an image: listed apart, see the tests)."""
    import io

    import numpy as np
    from PIL import Image

    def make(root: Path) -> dict[Path, str | None]:
        jpeg = (imagenet_samples / "n01440764_tench.JPEG").read_bytes()
        rgb = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((96, 72))
        cases: dict[Path, str | None] = {}

        def save(cls: str, name: str, writer, reason: str | None = None) -> None:
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(writer, bytes):
                path.write_bytes(writer)
            else:
                writer(path)
            cases[path] = reason

        def pil(image, fmt, **kw):
            return lambda path: image.save(path, format=fmt, **kw)

        sixteen = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))  # mode I;16
        frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]

        for cls in ("mixed", "odd_but_fine"):
            save(cls, "good.JPEG", jpeg)
            save(cls, "png_named.JPEG", pil(rgb, "PNG"))
            save(cls, "gray.jpg", pil(rgb.convert("L"), "JPEG"))
            save(cls, "cmyk.jpeg", pil(rgb.convert("CMYK"), "JPEG"))
            save(cls, "palette.png", pil(rgb.convert("P"), "PNG"))
            save(cls, "rgba.png", pil(rgb.convert("RGBA"), "PNG"))
            save(cls, "sixteen_bit.png", pil(sixteen, "PNG"))
            save(cls, "animated.jpg", lambda p: frames[0].save(p, format="GIF", save_all=True,
                                                               append_images=frames[1:]))
            save(cls, "tiny.png", pil(rgb.resize((1, 1)), "PNG"))
            save(cls, "ünïcødé näme.jpg", jpeg)
        for cls in ("mixed", "all_bad"):
            save(cls, "truncated.JPEG", jpeg[: len(jpeg) // 2], "truncated")
            save(cls, "zero_bytes.jpg", b"", "empty file")
            save(cls, "text.jpg", b"this is not an image\n", "not a decodable image")
            save(cls, "huge.png", pil(Image.new("1", (3000, 2000)), "PNG"), "megapixels")
        os.symlink(root / "nowhere.jpg", root / "mixed" / "broken_link.jpg")
        return cases

    return make
