"""python -m hjepa.data.prepare and the prepared dataset; the fused crop-while-decoding path."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hjepa.data import prepare as prep
from hjepa.data.decode import decode_image, decode_resized_crop, jpeg_reduction, read_bytes
from hjepa.data.shards import PreparedDataset
from hjepa.data.transforms import train_transform
from hjepa.errors import DataError


def _smooth(h, w, seed, mode="RGB", cell=16):
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(1, 3, max(2, h // cell), max(2, w // cell), generator=g), size=(h, w), mode="bicubic")
    im = Image.fromarray((x[0].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
    return im.convert(mode)


def _flat(folder: Path) -> Path:
    folder.mkdir()
    sizes = [(300, 400), (200, 180), (600, 520), (256, 256), (90, 120), (520, 700)]
    for i, (h, w) in enumerate(sizes):
        _smooth(h, w, i, "L" if i == 1 else "RGB").save(folder / f"n0000000{i % 2}_x{i}.JPEG", quality=92)
    (folder / "n00000001_broken.JPEG").write_bytes(b"\xff\xd8\xff not really")
    return folder


def test_prepare_writes_verified_shards_that_the_dataset_reads(tmp_path, capsys):
    src = _flat(tmp_path / "src")
    out = tmp_path / "out"
    assert prep.main(["--root", str(src), "--layout", "flat", "--out", str(out), "--shard-size", "3",
                      "--workers", "2"]) == 0
    index = json.loads((out / "index.json").read_text())
    train = index["splits"]["train"]
    assert train["count"] == 6 and len(train["shards"]) == 3 and len(train["skipped"]) == 1
    assert train["verified"]["images"] == 6 and train["verified"]["min_psnr_db"] > 30
    ds = PreparedDataset(str(out), "train")
    assert len(ds) == 6 and ds.classes == ["n00000000", "n00000001"] and ds.eval_split is None
    files = sorted(p for p in src.iterdir() if "broken" not in p.name)
    for i in range(6):
        image, label = ds[i]
        source = prep.resize_short(decode_image(files[i]), 256)
        assert image.shape == source.shape and min(image.shape[1:]) == min(256, min(source.shape[1:]))
        assert label == int(files[i].name.split("_")[0][-1])
        assert (image.float() - source.float()).abs().mean() < 6  # JPEG quality 90
    crops = PreparedDataset(str(out), "train", transform=train_transform(64, [0.3, 1.0], [0.75, 1.333], 0.5, 0.1))
    assert crops[2][0].shape == (3, 64, 64)
    with pytest.raises(Exception, match="already holds"):
        prep.prepare(str(src), str(out), layout="flat")


def test_a_failed_verification_leaves_no_index(tmp_path, monkeypatch):
    src = _flat(tmp_path / "src")
    encode = prep.encode_jpeg
    monkeypatch.setattr(prep, "encode_jpeg", lambda image, q: encode(image.flip(-1).flip(-2), q))  # wrong pixels
    with pytest.raises(Exception, match="verification .* failed"):
        prep.prepare(str(src), str(tmp_path / "out"), layout="flat", workers=1)
    assert not (tmp_path / "out" / "index.json").exists()
    with pytest.raises(DataError, match="did not finish or failed verification"):
        PreparedDataset(str(tmp_path / "out"))


def test_fused_crop_is_bit_identical_when_no_reduction_applies(tmp_path):
    path = tmp_path / "a.jpg"
    _smooth(300, 400, 0).save(path, quality=90)
    tf = train_transform(224, [0.3, 1.0], [0.75, 1.333], 0.0, 0.0)
    crop = tf.transforms[0]
    for seed in range(10):
        torch.manual_seed(seed)
        fused = decode_resized_crop(read_bytes(path), crop, str(path))
        torch.manual_seed(seed)
        assert torch.equal(fused, crop(decode_image(path)))


def test_fused_crop_decodes_large_jpegs_at_reduced_size_closely(tmp_path):
    path = tmp_path / "big.jpg"
    # detail at the scale of the output pixels (a random field with 150 px cells, like a photo's
    # large structures); finer detail is what both paths filter out, each in its own way
    _smooth(1200, 1600, 3, cell=150).save(path, quality=90)
    crop = train_transform(128, [0.5, 1.0], [0.75, 1.333], 0.0, 0.0).transforms[0]
    reduced = 0
    for seed in range(6):
        torch.manual_seed(seed)
        box = crop.make_params([decode_image(path)])
        reduced += jpeg_reduction(box["height"], box["width"], 128, 128) > 1
        torch.manual_seed(seed)
        fused = decode_resized_crop(read_bytes(path), crop, str(path))
        torch.manual_seed(seed)
        full = crop(decode_image(path))
        assert fused.shape == full.shape == (3, 128, 128)
        assert (fused.float() - full.float()).abs().mean() < 5
    assert reduced == 6
    assert jpeg_reduction(447, 900, 224, 224) == 1 and jpeg_reduction(448, 900, 224, 224) == 2
    assert jpeg_reduction(4000, 4000, 224, 224) == 8


def test_fused_crop_keeps_error_messages_and_non_jpeg_formats(tmp_path):
    png = tmp_path / "a.png"
    _smooth(100, 120, 1).save(png)
    crop = train_transform(32, [0.3, 1.0], [0.75, 1.333], 0.0, 0.0).transforms[0]
    torch.manual_seed(0)
    a = decode_resized_crop(read_bytes(png), crop, str(png))
    torch.manual_seed(0)
    assert torch.equal(a, crop(decode_image(png)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match="bad.jpg"):
        decode_resized_crop(read_bytes(bad), crop, str(bad))


def test_real_imagenet_jpegs_through_both_paths(imagenet_samples):
    crop = train_transform(224, [0.3, 1.0], [0.75, 1.333], 0.0, 0.0).transforms[0]
    for path in sorted(imagenet_samples.iterdir())[:12]:
        torch.manual_seed(0)
        fused = decode_resized_crop(read_bytes(path), crop, str(path))
        torch.manual_seed(0)
        full = crop(decode_image(path))
        assert fused.shape == full.shape == (3, 224, 224)
        assert (fused.float() - full.float()).abs().mean() < 4
