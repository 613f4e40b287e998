"""The prepared format written by ``python -m hjepa.data.prepare``, and the dataset that reads it.

Layout of a prepared root::

    index.json               format, classes, short side, JPEG quality, per split: shards, count,
                             verification summary (written last: no index.json = not complete)
    <split>.npz              per item: shard number, byte offset and size of its JPEG, label
    <split>-00000.tar ...    plain tar shards, WebDataset-style members <key>.jpg + <key>.cls

Every image is stored once as a JPEG whose short side is at most ``short_side`` (256 by
default: a 224 px RandomResizedCrop of it decodes ~3x fewer pixels than an ImageNet
original). The tar files stay readable by any tar tool or WebDataset loader, while this
reader seeks straight to an item with one ``pread`` (offsets from <split>.npz), so the
dataset is map-style and works with the Mixture sampler like every other dataset here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from hjepa.data.cache import ImageCache, check_cache_mode
from hjepa.data.decode import UnreadableImageError, decode_bytes, decode_resized_crop
from hjepa.data.gpu_decode import check_decode_mode, encode_item, gpu_augment
from hjepa.data.transforms import split_crop
from hjepa.errors import DataError, MissingDataError

FORMAT = "hjepa-prepared/1"
INDEX = "index.json"


def read_index(root: Path) -> dict:
    path = root / INDEX
    if not path.is_file():
        partial = any(root.glob("*.tar")) or any(root.glob(".*.tmp-*"))
        raise DataError(
            f"{root} is not a prepared dataset: {INDEX} is missing"
            + (" (shards are there: the prepare run did not finish or failed verification; run it again)" if partial
               else ". Write one with: python -m hjepa.data.prepare --root <images> --out " + str(root))
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the prepared-dataset index ({e})") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}; prepare the dataset again")
    return index


def read_items(root: Path, split: str) -> dict[str, np.ndarray]:
    with np.load(root / f"{split}.npz") as z:
        return {k: z[k] for k in ("shard", "offset", "size", "label")}


class ShardReader:
    """Random access to the JPEG bytes of a prepared split: one open file per shard and process."""

    def __init__(self, root: Path, shards: list[str], items: dict[str, np.ndarray]):
        self.root, self.shards = root, shards
        self.shard, self.offset, self.size = items["shard"], items["offset"], items["size"]
        self._pid, self._fds = -1, {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": -1, "_fds": {}}  # file descriptors do not cross processes

    def __len__(self) -> int:
        return len(self.offset)

    def name(self, index: int) -> str:
        return f"{self.root / self.shards[self.shard[index]]}[item {index}]"

    def read(self, index: int) -> torch.Tensor:
        if self._pid != os.getpid():
            self._pid, self._fds = os.getpid(), {}
        s = int(self.shard[index])
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.root / self.shards[s], os.O_RDONLY)
        size = int(self.size[index])
        buf = bytearray(size)
        if os.preadv(fd, [buf], int(self.offset[index])) != size:
            raise UnreadableImageError(f"{self.name(index)}: shard is shorter than its index says (truncated copy?)")
        return torch.frombuffer(buf, dtype=torch.uint8)


class PreparedDataset(Dataset):
    """A split of a dataset written by ``python -m hjepa.data.prepare``: uint8 [3, H, W]
    images (after `transform`) and labels. `cache` and `decode` as for ImageFolder."""

    labeled_split = "train"
    eval_split: Optional[str] = None  # "val" when one was prepared (set per instance)
    on_error = "raise"  # a prepared dataset was verified when it was written: an unreadable item raises
    num_skipped = 0

    def __init__(
        self,
        root: str,
        split: Literal["train", "val"] = "train",
        transform: Optional[Callable] = None,
        cache: Literal["none", "memory", "device"] = "none",
        decode: Literal["cpu", "gpu"] = "cpu",
    ):
        self.gpu_augment = gpu_augment(check_decode_mode(decode, cache), transform)
        root_dir = Path(root).expanduser()
        if not root_dir.is_dir():
            raise MissingDataError(f"prepared dataset root {root_dir} does not exist "
                            "(write it with python -m hjepa.data.prepare --root <images> --out <root>)")
        index = read_index(root_dir)
        if split not in index["splits"]:
            raise DataError(f"{root_dir} has no prepared {split!r} split (it has {', '.join(index['splits'])})")
        self.root, self.split = root_dir, split
        self.classes = list(index["classes"])
        self.eval_split = "val" if "val" in index["splits"] else None
        items = read_items(root_dir, split)
        self.reader = ShardReader(root_dir, index["splits"][split]["shards"], items)
        self.targets = items["label"].tolist()
        self.transform = transform
        self._crop = split_crop(transform)
        self.cache: Optional[ImageCache] = None
        if check_cache_mode(cache) != "none":
            self.cache = ImageCache.build(cache, ("prepared", str(root_dir.resolve()), split),
                                           lambda i: decode_bytes(self.reader.read(i), self.reader.name(i)),
                                           len(self.reader), transform)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = range(len(self))[index]
        label = self.targets[index]
        if self.cache is not None:
            return self.cache.item(index, self.transform), label
        data, name = self.reader.read(index), self.reader.name(index)
        if self.gpu_augment is not None:
            return encode_item(data, name, self.gpu_augment), label
        if self._crop is not None:
            crop, rest = self._crop
            image = decode_resized_crop(data, crop, name)
            return (rest(image) if rest is not None else image), label
        image = decode_bytes(data, name)
        return (self.transform(image) if self.transform is not None else image), label
