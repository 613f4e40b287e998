"""cache: memory|device: decoded images kept in one tensor, train augmentation on the device."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hjepa.data.batch import AugmentParams, Batch
from hjepa.data.cache import PARAMS_WIDTH, DeviceAugment, augment_batch
from hjepa.data.folder import ImageFolder
from hjepa.data.mixture import Mixture
from hjepa.data.transforms import train_transform
from hjepa.errors import ConfigError


def _folder(root: Path, n: int = 40, size=(32, 32), classes: int = 2) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = size
        smooth = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w), mode="bilinear")
        Image.fromarray((smooth[0] * 255).byte().permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    return root


def test_sampled_parameters_are_those_of_the_cpu_transform():
    tf = train_transform(32, [0.3, 1.0], [0.75, 1.333], 0.5, 0.4)
    aug = DeviceAugment.from_transform(tf)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    for seed in range(20):
        torch.manual_seed(seed)
        p = aug.sample(7, 40, 56)
        after = torch.rand(1)
        torch.manual_seed(seed)
        box = tf.transforms[0].make_params([image])
        torch.manual_seed(seed)
        tf(image)
        assert torch.equal(torch.rand(1), after)  # the same draws, so the same RNG stream afterwards
        assert p.dtype == torch.float64 and p.shape == (PARAMS_WIDTH,) and p[0] == 7
        assert p[1:5].tolist() == [box["top"], box["left"], box["height"], box["width"]]
        assert 0.6 <= p[6] <= 1.4 and sorted(p[9:13].tolist()) == [0, 1, 2, 3]


def test_unsupported_transforms_stay_on_the_cpu():
    from torchvision.transforms import v2

    from hjepa.data.transforms import eval_transform

    assert DeviceAugment.from_transform(eval_transform(32)) is None
    assert DeviceAugment.from_transform(v2.Compose([v2.RandomResizedCrop(32), v2.ColorJitter(hue=0.1)])) is None
    assert DeviceAugment.from_transform(None) is None


def test_device_crop_matches_the_cpu_transform_closely():
    """Same boxes: roi_align's bilinear resize lands within a few grey levels of v2's."""
    tf = train_transform(32, [0.3, 1.0], [0.75, 1.333], 0.5, 0.0)
    aug = DeviceAugment.from_transform(tf)
    g = torch.Generator().manual_seed(0)
    images = (F.interpolate(torch.rand(16, 3, 6, 6, generator=g), size=(48, 48), mode="bicubic").clamp(0, 1) * 255).byte()
    cpu, params = [], []
    for i in range(16):
        torch.manual_seed(i)
        cpu.append(tf(images[i]))
        torch.manual_seed(i)
        params.append(aug.sample(i, 48, 48))
    out = aug.apply(images, torch.stack(params))
    assert out.dtype == torch.uint8 and out.shape == (16, 3, 32, 32)
    diff = (out.float() - torch.stack(cpu).float()).abs()
    assert diff.mean() < 2.0 and diff.max() < 40


def test_jitter_stays_in_range_and_is_mild():
    tf = train_transform(24, [0.8, 1.0], [0.75, 1.333], 0.5, 0.4)
    aug = DeviceAugment.from_transform(tf)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 30, 30), dtype=torch.uint8)
    params = torch.stack([aug.sample(i, 30, 30) for i in range(32)])
    out = aug.apply(images, params)
    assert out.shape == (32, 3, 24, 24) and out.dtype == torch.uint8
    plain = DeviceAugment(aug.crop, None, None).apply(images, params)
    assert 0 < (out.float() - plain.float()).abs().mean() < 60


def test_crop_scales_follow_the_configured_range():
    tf = train_transform(32, [0.3, 1.0], [0.75, 1.333], 0.0, 0.0)
    aug = DeviceAugment.from_transform(tf)
    torch.manual_seed(0)
    p = torch.stack([aug.sample(0, 64, 64) for _ in range(500)])
    area = p[:, 3] * p[:, 4] / (64 * 64)
    assert area.min() >= 0.28 and area.max() <= 1.0 and 0.5 < area.mean() < 0.7  # as v2 (rounding, rejections)


def test_cached_image_folder_defers_and_batches_on_the_device(tmp_path):
    root = _folder(tmp_path / "imgs", n=12, size=(20, 26))
    tf = train_transform(16, [0.3, 1.0], [0.75, 1.333], 0.5, 0.1)
    ds = ImageFolder(str(root), "train", transform=tf, cache="device")
    plain = ImageFolder(str(root), "train")
    assert torch.equal(ds.cache.decoded.image(3), plain[3][0])
    mixture = Mixture({"a": ds}, strategy="concat", seed=0)
    items = [mixture[(1000 + i, i)] for i in range(8)]
    assert all(isinstance(it.image, AugmentParams) and it.key == 1000 + i for i, it in enumerate(items))
    again = [mixture[(1000 + i, i)] for i in range(8)]
    assert all(torch.equal(x.image.values, y.image.values) for x, y in zip(items, again))  # a pure function of the key
    batch = Batch.collate(items, torch.zeros(8, 3, dtype=torch.long), torch.zeros(8, 4, 2, dtype=torch.long))
    assert batch.images is None and batch.params.shape == (8, PARAMS_WIDTH)
    on_device = mixture.to_device(batch, torch.device("cpu"))
    assert on_device.params is None and on_device.images.shape == (8, 3, 16, 16)
    assert on_device.images.dtype == torch.uint8
    assert torch.equal(on_device.images, mixture.to_device(batch, torch.device("cpu")).images)
    # the eval transform (no crop) reads the cache on the CPU, as without a cache
    from hjepa.data.transforms import eval_transform
    ev = ImageFolder(str(root), "train", transform=eval_transform(16), cache="memory")
    assert torch.equal(ev[2][0], ImageFolder(str(root), "train", transform=eval_transform(16))[2][0])


def test_mixing_cached_and_uncached_components_is_refused(tmp_path):
    root = _folder(tmp_path / "imgs", n=6)
    tf = train_transform(16, [0.3, 1.0], [0.75, 1.333], 0.0, 0.0)
    cached = ImageFolder(str(root), "train", transform=tf, cache="memory")
    plain = ImageFolder(str(root), "train", transform=tf)
    with pytest.raises(ConfigError, match="component.s. a augment on the device .* b in the loader workers"):
        Mixture({"a": cached, "b": plain})
    both = Mixture({"a": cached, "b": cached})
    params = torch.stack([cached[i][0].values for i in range(4)])
    two = augment_batch(params, torch.tensor([0, 1, 0, 1]), both.caches, torch.device("cpu"))
    assert two.shape == (4, 3, 16, 16)
    assert torch.equal(two[[0, 2]], augment_batch(params[[0, 2]], torch.zeros(2, dtype=torch.long), both.caches,
                                                  torch.device("cpu")))
    with pytest.raises(ConfigError, match="dataset.cache"):
        ImageFolder(str(root), "train", cache="gpu")


def test_training_with_a_device_cache_resumes_bit_identically(tmp_path, monkeypatch, tiny, losses):
    """python -m hjepa.train's path with dataset=image_folder dataset.cache=device (the CPU
    here): completes, and a stopped + resumed run ends exactly where the uninterrupted one does."""
    from hjepa.engine import checkpoint as ckpt
    from hjepa.engine.trainer import Trainer
    from hjepa.train import train

    root = _folder(tmp_path / "imgs", n=64, size=(32, 32))
    overrides = ["dataset=image_folder", f"dataset.root={root}", "dataset.cache=device", "image_size=32",
                 "patch_size=4", "transform=jepa", "trainer.epochs=2", "hardware.batch_size=16"]
    full = train(tiny(*overrides), tmp_path / "full")
    assert full.status == "completed" and full.steps == 8
    with monkeypatch.context() as m:
        m.setattr(Trainer, "stop_requested", lambda self, step: step == 3)
        part = train(tiny(*overrides), tmp_path / "split")
    assert part.status == "interrupted"
    train(tiny(*overrides), tmp_path / "split")
    a = ckpt.load(tmp_path / "full/checkpoints/last.pt")["model"]
    b = ckpt.load(tmp_path / "split/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    assert (tmp_path / "full" / "masks.png").is_file()
