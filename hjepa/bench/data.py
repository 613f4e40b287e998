"""`data`: decode + crop per CPU core (ours, the ijepa-style pipeline, the prepared format)
and DataLoader img/s at given worker counts."""

from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from hjepa.bench.common import ROOT, emit, row

def unpack_images(source: str, workdir: Path, n: Optional[int] = None) -> Path:
    """A flat folder of images: `source` itself, or a .tar of images unpacked into workdir."""
    src = Path(source).expanduser()
    if src.is_dir():
        return src
    out = workdir / "images"
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members[:n] if n else members:
            (out / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return out


def class_tree(flat: Path, workdir: Path, n: Optional[int], copies: int = 1) -> Path:
    """<workdir>/tree/<class>/<file> symlinks to the first n images of a flat folder (class =
    name up to the first "_"), each `copies` times under distinct names."""
    from hjepa.data.folder import list_images

    tree = workdir / f"tree{copies}"
    files = list_images(flat)[:n] if n else list_images(flat)
    for f in files:
        name = Path(f).name
        cls = tree / name.split("_", 1)[0]
        cls.mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            link = cls / (name if c == 0 else f"c{c}_{name}")
            if not link.exists():
                link.symlink_to(Path(f).resolve())
    return tree


def baseline_dataset(tree: Path, size: int):
    """torchvision ImageFolder + PIL + RandomResizedCrop(0.3, 1) + ToTensor + Normalize: ijepa's pipeline."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder as TVImageFolder

    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.3, 1.0)), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return TVImageFolder(str(tree), transform=tf)


def our_transform(size: int):
    from hjepa.data.transforms import train_transform

    return train_transform(size, [0.3, 1.0], [3 / 4, 4 / 3], 0.0, 0.0)  # conf/transform/ijepa.yaml


class _FullDecode:
    """Ours without the fused crop-while-decoding (full torchvision decode, then the v2 transform)."""

    def __init__(self, dataset):
        self.dataset, self.transform = dataset, dataset.transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        from hjepa.data.decode import decode_image

        path, label = self.dataset.samples[i]
        return self.transform(decode_image(path)), label


def per_image_ms(dataset, rounds: int = 3) -> tuple[float, list[float]]:
    """CPU (process) ms per item over the whole dataset, one thread, median of `rounds` passes;
    every pass is seeded alike, so all pipelines draw the same crop boxes."""
    times = []
    for _ in range(rounds):
        torch.manual_seed(0)
        t = time.process_time()
        for i in range(len(dataset)):
            dataset[i]
        times.append((time.process_time() - t) / len(dataset) * 1e3)
    return statistics.median(times), times


def loader_rate(dataset, workers: int, batch: int = 128, batches: int = 30, warmup: int = 5) -> float:
    """img/s of a DataLoader (persistent workers, prefetch 4, pinned memory on CUDA, one torch
    thread per worker) over `batches` batches after `warmup`."""
    from torch.utils.data import DataLoader, RandomSampler

    from hjepa.engine.trainer import _worker_init

    sampler = RandomSampler(dataset, replacement=True, num_samples=(batches + warmup) * batch,
                            generator=torch.Generator().manual_seed(0))
    kw = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init)
    if workers:
        kw.update(persistent_workers=True, prefetch_factor=4)
    it = iter(DataLoader(dataset, batch_size=batch, sampler=sampler, **kw))
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)

HELP = "decode + crop per CPU core, and DataLoader rates"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet-samples"),
                   help="a flat folder of JPEGs or a .tar of them (python -m hjepa.bench pack)")
    p.add_argument("--n", type=int, default=200, help="images used")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="", help="also DataLoader img/s at these worker counts, e.g. 2 or 15")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--prepared", default=None, help="an existing prepared copy of the same images")
    p.add_argument("--prepare-workers", type=int, default=0)


def run(a: argparse.Namespace) -> list[dict]:
    from hjepa.data.folder import ImageFolder
    from hjepa.data.prepare import prepare
    from hjepa.data.shards import PreparedDataset

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flat = unpack_images(a.images, work, a.n)
        tree = class_tree(flat, work, a.n)
        prepared = a.prepared
        if prepared is None:
            prepared = str(work / "prepared")
            t = time.perf_counter()
            index = prepare(str(tree), prepared, workers=a.prepare_workers or 0)
            print(f"prepared {index['splits']['train']['count']} images in {time.perf_counter() - t:.1f} s "
                  f"(verified: {index['splits']['train'].get('verified')})", file=sys.stderr)
        tf = our_transform(a.size)
        pipelines = {
            "baseline": baseline_dataset(tree, a.size),
            "ours": ImageFolder(str(tree), "train", transform=tf),
            "ours_full_decode": None,
            "prepared": PreparedDataset(prepared, "train", transform=tf),
        }
        pipelines["ours_full_decode"] = _FullDecode(pipelines["ours"])
        n = len(pipelines["ours"])
        res: dict[str, list[float]] = {k: [] for k in pipelines}
        for _ in range(a.rounds):  # interleaved: drift on a shared machine hits every pipeline alike
            for k, ds in pipelines.items():
                res[k].append(per_image_ms(ds, rounds=1)[0])
        ms = {k: statistics.median(v) for k, v in res.items()}
        cfg = f"{n} ImageNet JPEGs -> {a.size} px RandomResizedCrop(0.3-1), 1 core, CPU ms/img (process time)"
        base = 1e3 / ms["baseline"]
        names = {
            "baseline": "data: ImageFolder+PIL+RRC+ToTensor+Normalize (ijepa)",
            "ours_full_decode": "data: torchvision.io decode + v2 RRC on uint8",
            "ours": "data: ours (crop drawn first, DCT-reduced JPEG decode where allowed)",
            "prepared": "data: ours from the prepared format (short side 256)",
        }
        for k in ("baseline", "ours_full_decode", "ours", "prepared"):
            rows.append(row(names[k], cfg, 1e3 / ms[k], "img/s/core", None if k == "baseline" else base,
                            None if k == "baseline" else "baseline, same run", ms_per_img=ms[k], rounds=res[k]))
            emit(rows[-1:], a.json, a.out)
        for w in [int(x) for x in a.workers.split(",") if x] if a.workers else []:
            for k in ("baseline", "ours", "prepared"):
                rate = loader_rate(pipelines[k], w, a.batch)
                rows.append(row(f"loader: {k}", f"DataLoader {w} workers, batch {a.batch}, {a.size} px", rate, "img/s"))
                emit(rows[-1:], a.json, a.out)
    return rows
