"""dataset.decode=gpu: loader workers pass JPEG bytes and crop parameters, the training
process decodes and crops the batch on its device. Here the device is the CPU (the same code
path, with decode_jpeg on the CPU); tests/test_cuda.py compares the GPU against it."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from hjepa.data.batch import EncodedBatch, EncodedImage
from hjepa.data.decode import UnreadableImageError, jpeg_reduction
from hjepa.data.folder import FileDataset, ImageFolder
from hjepa.data.gpu_decode import decode_batch, decode_jpegs
from hjepa.data.mixture import Mixture, MixtureSampler
from hjepa.data.transforms import eval_transform, train_transform
from hjepa.errors import ConfigError
from hjepa.masks import MultiBlockMaskCollator
from hjepa.train import train

CPU = torch.device("cpu")


def _image(g: torch.Generator, h: int, w: int) -> Image.Image:
    smooth = F.interpolate(torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g), size=(h, w), mode="bilinear")
    return Image.fromarray((smooth[0] * 255).byte().permute(1, 2, 0).numpy())


def _folder(root: Path, n: int = 24, classes: int = 2, png_every: int = 0) -> Path:
    """<root>/class<k>/<i>.jpg of 36..61 px (a 32 px crop of these always decodes at full
    size on the CPU path, so both paths give the same pixels); every png_every-th a PNG."""
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        image = _image(g, 36 + 4 * (i % 7), 40 + 3 * (i % 8))
        if png_every and i % png_every == png_every - 1:
            image.save(d / f"{i:03d}.png")
        else:
            image.convert("L" if i % 5 == 4 else "RGB").save(d / f"{i:03d}.jpg", quality=90)
    return root


def _decode_one(item: EncodedImage) -> torch.Tensor:
    return decode_batch(EncodedBatch.stack([item]), CPU, _no_failure)[0]


def _no_failure(row, error):
    raise AssertionError(f"unexpected unreadable item {row}: {error}")


def test_same_crops_and_pixels_as_the_cpu_path_on_real_imagenet_jpegs(imagenet_samples):
    files = sorted(imagenet_samples.iterdir())[::25]  # 40 photos of all sizes, grayscale ones included
    samples = [(str(f), 0) for f in files]
    tf = train_transform(224, [0.3, 1.0], [3 / 4, 4 / 3], 0.5, 0.0)
    cpu, gpu = FileDataset(samples, ["x"], tf), FileDataset(samples, ["x"], tf, decode="gpu")
    full_size = 0
    for i in range(len(samples)):
        torch.manual_seed(i)
        expected, _ = cpu[i]
        after_cpu = torch.rand(1)
        torch.manual_seed(i)
        item, _ = gpu[i]
        assert torch.equal(torch.rand(1), after_cpu)  # the same RNG draws (crop box, flip)
        assert isinstance(item, EncodedImage) and item.pixels is None and item.data.numel() > 0
        got = _decode_one(item)
        assert got.dtype == torch.uint8 and got.shape == expected.shape == (3, 224, 224)
        if jpeg_reduction(int(item.params[3]), int(item.params[4]), 224, 224) == 1:
            assert torch.equal(got, expected), samples[i][0]  # same decoder, same crop: bit-identical
            full_size += 1
        else:  # the CPU path decoded at 1/2..1/8 scale in the DCT domain: JPEG noise apart
            assert (got.float() - expected.float()).abs().mean() < 8, samples[i][0]
    assert full_size >= len(samples) // 2


def test_jitter_matches_the_cpu_transform_up_to_rounding(tmp_path):
    root = _folder(tmp_path / "imgs", n=12, classes=1)
    tf = train_transform(32, [0.3, 1.0], [3 / 4, 4 / 3], 0.5, 0.4)
    cpu = ImageFolder(str(root), "train", tf)
    gpu = ImageFolder(str(root), "train", tf, decode="gpu")
    for i in range(len(cpu)):
        torch.manual_seed(i)
        expected, _ = cpu[i]
        torch.manual_seed(i)
        got = _decode_one(gpu[i][0])
        diff = (got.int() - expected.int()).abs()
        assert diff.max() <= 3 and diff.float().mean() < 0.05  # float vs uint8 arithmetic of v2's jitter


def _batches(dataset, n: int, workers: int = 0, batch: int = 8):
    mixture = Mixture({"d": dataset}, strategy="concat", seed=0)
    sampler = MixtureSampler(mixture, seed=0)
    loader = DataLoader(mixture, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                        collate_fn=MultiBlockMaskCollator((8, 8), min_keep=4))
    out = []
    for i, b in enumerate(loader):
        if i == n:
            break
        out.append((b, mixture.to_device(b, CPU)))
    return out


def test_training_batches_equal_those_of_cpu_decoding_whatever_the_workers(tmp_path):
    root = _folder(tmp_path / "imgs", png_every=6)
    tf = train_transform(32, [0.3, 1.0], [3 / 4, 4 / 3], 0.5, 0.0)
    cpu = _batches(ImageFolder(str(root), "train", tf), 3)
    gpu = _batches(ImageFolder(str(root), "train", tf, decode="gpu"), 3, workers=2)
    for (_, a), (raw, b) in zip(cpu, gpu):
        assert raw.images is None and raw.params is None and len(raw.encoded) == 8
        assert b.encoded is None and b.images.dtype == torch.uint8 and b.images.shape == (8, 3, 32, 32)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    pngs = sum(len(raw.encoded.pixels) for raw, _ in gpu)
    assert pngs > 0  # PNGs were decoded and cropped in the workers, and still match


def _truncated_jpeg(path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    _image(g, 64, 64).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact: only decoding finds out
    return path


def test_a_jpeg_no_decoder_reads_is_skipped_or_raised_by_on_error(tmp_path, caplog):
    root = _folder(tmp_path / "imgs", n=8, classes=1)
    bad = _truncated_jpeg(root / "class0" / "004_truncated.jpg")
    tf = train_transform(32, [0.3, 1.0], [3 / 4, 4 / 3], 0.0, 0.0)
    skip = ImageFolder(str(root), "train", tf, decode="gpu")
    mixture = Mixture({"d": skip}, strategy="concat", seed=0)
    row = [path for path, _ in skip.samples].index(str(bad))
    items = [mixture[i] for i in range(len(mixture))]  # the worker does not decode: no error yet
    assert all(isinstance(it.image, EncodedImage) for it in items)
    collator = MultiBlockMaskCollator((8, 8), min_keep=4)
    with caplog.at_level(logging.WARNING):
        out = mixture.to_device(collator(items), CPU)
    assert out.images.shape == (len(items), 3, 32, 32)
    assert mixture.num_skipped == 1 and str(bad) in caplog.text
    assert any(torch.equal(out.images[row], out.images[j]) for j in range(len(items)) if j != row)

    strict = ImageFolder(str(root), "train", tf, decode="gpu", on_error="raise")
    mixture = Mixture({"d": strict}, strategy="concat", seed=0)
    with pytest.raises(UnreadableImageError, match="004_truncated.jpg"):
        mixture.to_device(collator([mixture[i] for i in range(len(mixture))]), CPU)


def test_decode_jpegs_reports_each_refused_item_and_keeps_the_others(tmp_path):
    root = _folder(tmp_path / "imgs", n=3, classes=1)
    good = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted(root.rglob("*.jpg"))]
    junk = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0" + b"\x00" * 64), dtype=torch.uint8)
    out = decode_jpegs([good[0], junk, good[1]], CPU)
    assert out[1] is None and out[0].shape[0] == 3 and out[2].shape[0] == 3


def test_files_that_cannot_be_read_are_skipped_in_the_worker_as_with_cpu_decoding(tmp_path):
    root = _folder(tmp_path / "imgs", n=6, classes=1)
    (root / "class0" / "002_empty.jpg").write_bytes(b"")
    (root / "class0" / "003_text.png").write_text("not an image")
    tf = train_transform(32, [0.3, 1.0], [3 / 4, 4 / 3], 0.0, 0.0)
    ds = ImageFolder(str(root), "train", tf, decode="gpu")
    items = [ds[i][0] for i in range(len(ds))]
    assert ds.num_skipped == 2 and all(isinstance(it, EncodedImage) for it in items)
    strict = ImageFolder(str(root), "train", tf, decode="gpu", on_error="raise")
    with pytest.raises(UnreadableImageError, match="002_empty.jpg: empty file"):
        strict[[path for path, _ in strict.samples].index(str(root / "class0" / "002_empty.jpg"))]


def test_decode_settings_are_checked(tmp_path):
    root = _folder(tmp_path / "imgs", n=4, classes=1)
    tf = train_transform(32, [0.3, 1.0], [3 / 4, 4 / 3], 0.0, 0.0)
    with pytest.raises(ConfigError, match="dataset.decode: expected one of cpu, gpu"):
        ImageFolder(str(root), "train", tf, decode="nvjpeg")
    with pytest.raises(ConfigError, match="decode=gpu with dataset.cache=device"):
        ImageFolder(str(root), "train", tf, decode="gpu", cache="device")
    with pytest.raises(ConfigError, match="supports RandomResizedCrop"):
        ImageFolder(str(root), "train", v2.Compose([v2.RandomResizedCrop(32), v2.ColorJitter(hue=0.1)]), decode="gpu")
    # Evaluation transforms decode on the CPU: the probes' splits of a decode=gpu config.
    ev = ImageFolder(str(root), "train", eval_transform(32), decode="gpu")
    assert ev.gpu_augment is None and ev[0][0].shape == (3, 32, 32)
    cpu = ImageFolder(str(root), "train", tf)
    with pytest.raises(ConfigError, match="decode on the GPU"):
        Mixture({"a": ImageFolder(str(root), "train", tf, decode="gpu"), "b": cpu})


def test_training_with_gpu_decoding_runs_on_the_cpu(tmp_path, tiny):
    root = _folder(tmp_path / "imgs", n=64, classes=4, png_every=9)
    cfg = tiny("dataset=image_folder", f"dataset.root={root}", "dataset.decode=gpu", "dataset.holdout=2",
               "image_size=32", "patch_size=4", "trainer.epochs=1", "hardware.batch_size=8", "hardware.num_workers=1")
    summary = train(cfg, tmp_path / "run")
    assert summary.status == "completed" and summary.steps == 56 // 8 and summary.final_loss > 0
