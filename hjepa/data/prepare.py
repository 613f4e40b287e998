"""`python -m hjepa.data.prepare`: write a dataset once into the training-ready format of
hjepa.data.shards (short side resized, JPEG, tar shards + an offset index), then verify
every stored image against its source.

    python -m hjepa.data.prepare --root /data/imagenet --layout imagenet --subset imagenet100 --out /data/in100-256
    python -m hjepa.data.prepare --root /data/flowers --out /data/flowers-256          # <root>/<class>/<image>
    python -m hjepa.data.prepare --root ../shared/data/imagenet-samples --layout flat --out /tmp/samples-256

Layouts: ``image_folder`` (<root>/<class>/<image>, one "train" split), ``imagenet``
(<root>/{train,val}/<wnid>/<image>, the splits given by --splits), ``flat`` (images directly
in <root>, class = the file name up to its first "_", as in <wnid>_<name>.JPEG).
Then train with ``dataset=prepared dataset.root=<out>`` (or the same target in a mixture).

Verification decodes each stored JPEG from its shard through the reader the dataset uses,
decodes and resizes its source again, and requires the same size and label and a PSNR of
at least --min-psnr dB (JPEG at quality 90 gives ~37 dB on average here, never below ~26;
a wrong or corrupt image gives ~10). index.json, which readers require, is written only
after verification passes. Unreadable source files are skipped and listed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from hjepa.atomic import atomic_write
from hjepa.data.folder import ImageFolder, list_images
from hjepa.data.imagenet import ImageNet
from hjepa.data.decode import UnreadableImageError, decode_bytes, decode_image
from hjepa.data.shards import FORMAT, INDEX, ShardReader, read_items
from hjepa.errors import ConfigError, HJEPAError


def flat_samples(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    files = list_images(root)
    if not files:
        raise ConfigError(f"{root}: no images directly in this folder (layout flat)")
    names = [Path(f).name.split("_", 1)[0] for f in files]
    classes = sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    return [(f, lookup[n]) for f, n in zip(files, names)], classes


def list_split(root: str, layout: str, split: str, subset: Optional[str]) -> tuple[list[tuple[str, int]], list[str]]:
    if layout == "flat":
        return flat_samples(Path(root).expanduser())
    if layout == "image_folder":
        ds = ImageFolder(root, "train")
    else:
        ds = ImageNet(root, split, subset=subset)
    return ds.samples, ds.classes


def resize_short(image: torch.Tensor, short_side: int) -> torch.Tensor:
    """Downscale (antialiased) so that the short side is `short_side`; smaller images stay as they are."""
    if min(image.shape[-2:]) <= short_side:
        return image
    return F.resize(image, short_side, antialias=True)


def encode_jpeg(image: torch.Tensor, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, "JPEG", quality=quality)  # 4:2:0
    return buf.getvalue()


def _write_shard(job: tuple) -> dict:
    torch.set_num_threads(1)
    out, name, first, items, short_side, quality = job
    offsets, sizes, labels, skipped = [], [], [], []

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for k, (path, label) in enumerate(items):
                try:
                    data = encode_jpeg(resize_short(decode_image(path), short_side), quality)
                except UnreadableImageError as e:
                    skipped.append(str(e))
                    offsets.append(-1), sizes.append(0), labels.append(label)
                    continue
                key = f"{first + k:09d}"
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
                # the data end the member, padded to 512-byte blocks; tar.offset is past the padding
                offsets.append(tar.offset - -(-len(data) // 512) * 512), sizes.append(len(data)), labels.append(label)
                cls = str(label).encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size, info.mtime = len(cls), 0
                tar.addfile(info, io.BytesIO(cls))

    atomic_write(Path(out) / name, write)
    return {"name": name, "offset": offsets, "size": sizes, "label": labels, "skipped": skipped}


def _verify_range(job: tuple) -> dict:
    torch.set_num_threads(1)
    out, shards, items, sources, short_side, min_psnr = job
    reader = ShardReader(Path(out), shards, items)
    psnrs, failures = [], []
    for i, (path, label) in enumerate(sources):
        try:
            stored = decode_bytes(reader.read(i), reader.name(i))
            source = resize_short(decode_image(path), short_side)
        except UnreadableImageError as e:
            failures.append(f"{path}: {e}")
            continue
        if items["label"][i] != label:
            failures.append(f"{path}: label {items['label'][i]} stored, {label} expected")
        elif stored.shape != source.shape:
            failures.append(f"{path}: stored {tuple(stored.shape)}, source resized to {tuple(source.shape)}")
        else:
            mse = (stored.float() - source.float()).pow(2).mean().item()
            psnr = 10 * math.log10(255 ** 2 / max(mse, 1e-10))
            psnrs.append(psnr)
            if psnr < min_psnr:
                failures.append(f"{path}: PSNR {psnr:.1f} dB against its source (< {min_psnr})")
    return {"psnr": psnrs, "failures": failures}


def prepare(root: str, out: str, layout: str = "image_folder", splits: tuple[str, ...] = ("train",),
            subset: Optional[str] = None, short_side: int = 256, quality: int = 90, shard_size: int = 1000,
            workers: int = 0, verify: bool = True, min_psnr: float = 20.0, overwrite: bool = False) -> dict:
    """Write <out> (see hjepa.data.shards) and return the summary stored in its index.json."""
    if layout not in ("image_folder", "imagenet", "flat"):
        raise ConfigError(f"--layout: expected image_folder, imagenet or flat, got {layout!r}")
    if short_side < 16 or not 1 <= quality <= 100 or shard_size < 1:
        raise ConfigError("--short-side must be >= 16, --quality in 1..100, --shard-size >= 1")
    out_dir = Path(out).expanduser()
    if (out_dir / INDEX).exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds a prepared dataset; pass --overwrite to replace it")
    if out_dir.exists() and overwrite:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    t0 = time.perf_counter()
    index = {"format": FORMAT, "short_side": short_side, "quality": quality, "source": str(root), "layout": layout,
             "splits": {}}
    classes: Optional[list[str]] = None
    with ctx.Pool(workers) as pool:
        for split in splits:
            samples, split_classes = list_split(root, layout, split, subset)
            if classes is not None and split_classes != classes:
                raise ConfigError(f"split {split} has other classes than the first split")
            classes = split_classes
            jobs = [(str(out_dir), f"{split}-{n:05d}.tar", first, samples[first:first + shard_size], short_side, quality)
                    for n, first in enumerate(range(0, len(samples), shard_size))]
            parts = pool.map(_write_shard, jobs, chunksize=1)
            shard_names = [p["name"] for p in parts]
            shard_of = np.concatenate([np.full(len(p["offset"]), n, dtype=np.int32) for n, p in enumerate(parts)])
            offset = np.concatenate([np.asarray(p["offset"], dtype=np.int64) for p in parts])
            size = np.concatenate([np.asarray(p["size"], dtype=np.int64) for p in parts])
            label = np.concatenate([np.asarray(p["label"], dtype=np.int64) for p in parts])
            kept = offset >= 0
            skipped = [s for p in parts for s in p["skipped"]]
            if not kept.any():
                raise HJEPAError(f"no readable image in split {split} of {root}")
            np.savez(out_dir / f"{split}.npz", shard=shard_of[kept], offset=offset[kept], size=size[kept],
                     label=label[kept])
            entry = {"shards": shard_names, "count": int(kept.sum()), "skipped": skipped}
            if verify:
                items = read_items(out_dir, split)
                sources = [s for s, k in zip(samples, kept) if k]
                chunk = -(-len(sources) // (workers * 4))
                vjobs = [(str(out_dir), shard_names, {k: v[a:a + chunk] for k, v in items.items()},
                          sources[a:a + chunk], short_side, min_psnr) for a in range(0, len(sources), chunk)]
                results = pool.map(_verify_range, vjobs, chunksize=1)
                psnr = [x for r in results for x in r["psnr"]]
                failures = [f for r in results for f in r["failures"]]
                if failures:
                    raise HJEPAError(f"verification of {out_dir} failed for {len(failures)} image(s), e.g. "
                                     + "; ".join(failures[:5]) + f". {INDEX} was not written")
                entry["verified"] = {"images": len(psnr), "min_psnr_db": round(min(psnr), 2),
                                     "mean_psnr_db": round(float(np.mean(psnr)), 2)}
            index["splits"][split] = entry
    index["classes"] = classes
    index["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(out_dir / INDEX, json.dumps(index, indent=1))
    return index


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hjepa.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the source images")
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--layout", default="image_folder", choices=["image_folder", "imagenet", "flat"])
    p.add_argument("--splits", default="train", help="comma-separated, for --layout imagenet (e.g. train,val)")
    p.add_argument("--subset", default=None, help="--layout imagenet: imagenet100 or a wnid list file")
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--min-psnr", type=float, default=20.0)
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        index = prepare(a.root, a.out, a.layout, tuple(a.splits.split(",")), a.subset, a.short_side, a.quality,
                        a.shard_size, a.workers, not a.no_verify, a.min_psnr, a.overwrite)
    except HJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, entry in index["splits"].items():
        print(f"{split}: {entry['count']} images in {len(entry['shards'])} shard(s)"
              + (f", {len(entry['skipped'])} unreadable skipped" if entry["skipped"] else "")
              + (f"; verified, PSNR min {entry['verified']['min_psnr_db']} dB, mean {entry['verified']['mean_psnr_db']} dB"
                 if "verified" in entry else ""))
    print(f"wrote {Path(a.out) / INDEX} in {index['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
