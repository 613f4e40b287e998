"""The transform configs build, keep uint8, work on images smaller than the target size,
and normalisation matches the ImageNet statistics."""

from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from hjepa.config import build
from hjepa.data.decode import decode_image
from hjepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize, train_transform
from hjepa.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def config_transform(compose_config):
    """config_transform(option, image_size): (the transform's config node, the transform)."""

    def make(option, image_size):
        cfg = compose_config(f"transform={option}", f"image_size={image_size}")
        return cfg.transform, build(cfg.transform)

    return make


@pytest.mark.parametrize("option", ["jepa", "ijepa", "eval"])
def test_configs_upsample_small_images_and_keep_uint8(option, cifar10_train, config_transform):
    cifar = decode_image(next((cifar10_train / "cat").iterdir()))  # a real 32 px image, at 224
    _, tf = config_transform(option, 224)
    out = tf(cifar)
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)


def test_config_values_are_those_of_the_brief_and_the_reference(config_transform):
    node, jepa = config_transform("jepa", 224)
    crop, flip, jitter = jepa.transforms
    assert crop.scale == (0.8, 1.0) and flip.p == 0.5 and jitter.brightness == (0.9, 1.1)
    assert crop.size == (224, 224) and node.size == 224
    _, ijepa = config_transform("ijepa", 96)
    assert [type(t) for t in ijepa.transforms] == [v2.RandomResizedCrop]  # crop only, as I-JEPA's code
    assert ijepa.transforms[0].scale == (0.3, 1.0)
    _, ev = config_transform("eval", 224)
    resize, centre = ev.transforms
    assert resize.size == [256] and centre.size == (224, 224)


def test_train_transform_is_random_and_seeded():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    tf = train_transform(32, [0.3, 1.0], [0.75, 1.333], 0.5, 0.4)
    torch.manual_seed(0)
    a = tf(image)
    torch.manual_seed(0)
    assert torch.equal(tf(image), a)
    assert not torch.equal(tf(image), a)


def test_eval_transform_is_deterministic_on_odd_shapes():
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    tf = eval_transform(224)
    assert torch.equal(tf(image), tf(image)) and tf(image).shape == (3, 224, 224)


def test_normalize():
    batch = torch.stack([
        (torch.tensor(IMAGENET_MEAN) * 255).round().to(torch.uint8).view(3, 1, 1).expand(3, 8, 8),
        torch.full((3, 8, 8), 255, dtype=torch.uint8),
    ])
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert out[0].abs().max() < 0.01
    expected_white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[1, :, 0, 0], expected_white)
    with pytest.raises(ValueError, match="uint8"):
        normalize(batch.float())


@pytest.mark.parametrize("kwargs,message", [
    ({"scale": [0.9, 0.2]}, "transform.scale"),
    ({"ratio": [0.0, 1.0]}, "transform.ratio"),
    ({"hflip": 1.5}, "transform.hflip"),
    ({"color_jitter": -0.1}, "transform.color_jitter"),
    ({"size": 0}, "transform.size"),
])
def test_bad_transform_values(kwargs, message):
    args = {"size": 32, "scale": [0.3, 1.0], "ratio": [0.75, 1.333], "hflip": 0.5, "color_jitter": 0.1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        train_transform(**args)
