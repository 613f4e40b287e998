"""Datasets read from image files: the shared base (decode on access; skip or raise on an
unreadable file) and ImageFolder for any <root>/<class>/<image> tree."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
from torch.utils.data import Dataset

from hjepa.data.cache import ImageCache, check_cache_mode
from hjepa.data.decode import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, UnreadableImageError, check_max_pixels,
                               decode_image, decode_resized_crop, read_bytes)
from hjepa.data.gpu_decode import check_decode_mode, encode_item, gpu_augment
from hjepa.data.transforms import split_crop
from hjepa.errors import ConfigError, DataError, MissingDataError

log = logging.getLogger(__name__)

# A run of this many unreadable files in a row means a broken dataset, not a few bad files.
MAX_CONSECUTIVE_SKIPS = 50
MAX_NAMED = 10  # skipped entries named one by one in the log


def existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MissingDataError(f"{what} {path} does not exist" + (" (it is a file)" if path.exists() else ""))
    return path


def _entries(folder: Path) -> list[os.DirEntry]:
    """The (non-hidden) entries of `folder`; a DataError naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror or e}") from None


def _broken(entry: os.DirEntry) -> str | None:
    """Why an entry that looks like an image file is not one, or None when it is a file."""
    try:
        if entry.is_file():
            return None
        if entry.is_symlink() and not os.path.exists(entry.path):
            return f"broken symbolic link to {os.readlink(entry.path)}"
        return "not a regular file"
    except OSError as e:  # ELOOP: a symbolic link loop
        return e.strerror or str(e)


def class_dirs(folder: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of `folder`."""
    names = []
    for e in _entries(folder):
        try:
            if e.is_dir():
                names.append(e.name)
        except OSError as err:  # a symbolic link loop, or a link into an unreadable place
            raise DataError(f"{e.path}: {err.strerror or err} (expected a class folder or an image file)") from None
    return sorted(names)


def list_images(folder: Path, skipped: Optional[list[tuple[str, str]]] = None) -> list[str]:
    """Sorted paths of the image files directly in `folder` (extension case-insensitive).
    Entries with an image extension that are not readable files (broken or looping symbolic
    links, folders) are appended to `skipped` as (path, reason)."""
    files = []
    for e in _entries(folder):
        if not e.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        reason = _broken(e)
        if reason is None:
            files.append(e.path)
        elif skipped is not None:
            skipped.append((e.path, reason))
    return sorted(files)


def class_samples(folder: Path, classes: list[str]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """((path, label) for every image of folder/<class>/, label = index in `classes`;
    (path, reason) of the entries skipped). A DataError names every class without images."""
    samples: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    empty = []
    for label, name in enumerate(classes):
        files = list_images(folder / name, skipped)
        if not files:
            empty.append(name)
        samples += [(f, label) for f in files]
    if empty:
        raise DataError(
            f"{len(empty)} of the {len(classes)} class folders in {folder} contain no images: {name_few(empty, 10)} "
            f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    return samples, skipped


class FileDataset(Dataset):
    """Images listed as (path, label), decoded on access to uint8 [3, H, W].

    With on_error="skip" an unreadable file is logged with its path, counted in
    `num_skipped` and replaced by the next readable item (deterministic, so every worker
    and every run sees the same substitute); with "raise" it raises a DataError naming it.

    A transform that starts with RandomResizedCrop is fused into the decode
    (hjepa.data.decode.decode_resized_crop: same random draws, JPEGs decoded at reduced size
    where the crop allows). `cache`: "memory" decodes every image once at construction and
    keeps them in one uint8 tensor, "device" also keeps that tensor on the training device;
    train crops then happen on the device in batches (hjepa.data.cache). Meant for small
    datasets (CIFAR-10: 150 MB). `decode`: "gpu" makes a training item the file's bytes and
    its crop parameters, decoded and cropped on the training device in batches
    (hjepa.data.gpu_decode); evaluation transforms still decode on the CPU.
    """

    labeled_split = "train"
    eval_split: Optional[str] = None

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform: Optional[Callable] = None,
        on_error: Literal["skip", "raise"] = "skip",
        cache: Literal["none", "memory", "device"] = "none",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        unlisted: Sequence[tuple[str, str]] = (),
        decode: Literal["cpu", "gpu"] = "cpu",
    ):
        if on_error not in ("skip", "raise"):
            raise ConfigError(f"on_error: expected 'skip' or 'raise', got {on_error!r}")
        self.gpu_augment = gpu_augment(check_decode_mode(decode, cache), transform)
        self.samples = samples
        self.max_pixels = max_pixels
        # Entries that look like images but are none (broken symbolic links, ...): counted
        # as skipped from the start, and named once.
        self.unlisted = list(unlisted)
        for path, why in self.unlisted[:MAX_NAMED]:
            log.warning("skipped %s: %s", path, why)
        if len(self.unlisted) > MAX_NAMED:
            log.warning("... and %d more entries that are not image files", len(self.unlisted) - MAX_NAMED)
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.transform = transform
        self.on_error = on_error
        self._crop = split_crop(transform)
        # Shared memory, so that skips inside DataLoader workers are counted here too. A lock
        # from the spawn context can be handed to workers started by fork, spawn or forkserver
        # (a fork-context one is refused by spawn workers, the default on macOS).
        self._skipped = multiprocessing.get_context("spawn").Value("q", 0)
        self.cache: Optional[ImageCache] = None
        if check_cache_mode(cache) != "none" and samples:
            labels = list(self.targets)

            def load(index: int) -> torch.Tensor:
                image, labels[index] = self._read(index, lambda path: decode_image(path, max_pixels))
                return image

            key = ("files", on_error, tuple(path for path, _ in samples))
            self.cache = ImageCache.build(cache, key, load, len(samples), transform)
            self._cached_labels = labels  # an unreadable file's substitute brings its own label

    @property
    def num_skipped(self) -> int:
        return len(self.unlisted) + self._skipped.value

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        if self.cache is not None:
            return self.cache.item(index, self.transform), self._cached_labels[index]
        if self.gpu_augment is not None:
            return self._read(index, lambda path: encode_item(read_bytes(path), path, self.gpu_augment, self.max_pixels))
        return self._read(index, self._decode)

    def problem(self, index: int) -> Optional[str]:
        """Why training cannot turn item `index` into an image, or None when it can: the
        decode and transform of __getitem__, without skipping (hjepa.data.verify full=true)."""
        path = self.samples[index][0]
        try:
            self._decode(path)
        except UnreadableImageError as e:
            return str(e).removeprefix(f"{path}: ")
        return None

    def note_skipped(self, error: UnreadableImageError) -> None:
        """Count an unreadable file found outside `__getitem__` (by the GPU decoder)."""
        log.warning("skipped unreadable image %s (its place in the batch repeats another image)", error)
        with self._skipped.get_lock():
            self._skipped.value += 1

    def _decode(self, path: str) -> torch.Tensor:
        if self._crop is not None:
            crop, rest = self._crop
            image = decode_resized_crop(read_bytes(path), crop, path, self.max_pixels)
            return rest(image) if rest is not None else image
        image = decode_image(path, self.max_pixels)
        return self.transform(image) if self.transform is not None else image

    def _read(self, index: int, decode: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """decode(path) of item `index`, or of the next readable item under on_error=skip."""
        for attempt in range(MAX_CONSECUTIVE_SKIPS):
            path, label = self.samples[(index + attempt) % len(self)]
            try:
                return decode(path), label
            except UnreadableImageError as e:
                if self.on_error == "raise":
                    raise UnreadableImageError(f"{e} (on_error: skip would skip it)") from None
                log.warning("skipped unreadable image %s", e)
                with self._skipped.get_lock():
                    self._skipped.value += 1
        raise DataError(
            f"{MAX_CONSECUTIVE_SKIPS} unreadable images in a row from {self.samples[index][0]}: "
            "check the dataset with python -m hjepa.data.verify"
        )


class ImageFolder(FileDataset):
    """Any <root>/<class>/<image> tree; labels = index of the class in sorted order.

    The "val" split is `val_root` (same class folders) when given, else a seeded holdout of
    each class (`holdout` images per class when an int, that fraction when a float), which
    the "train" split then excludes. `cache`: see FileDataset ("memory" / "device" keep a
    small dataset such as CIFAR-10 decoded and augment it on the device); `decode`: see
    FileDataset ("gpu" decodes the training JPEGs on the GPU).
    """

    def __init__(
        self,
        root: str,
        split: Literal["train", "val"],
        transform: Optional[Callable] = None,
        val_root: Optional[str] = None,
        holdout: int | float = 0,
        seed: int = 0,
        on_error: Literal["skip", "raise"] = "skip",
        cache: Literal["none", "memory", "device"] = "none",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode: Literal["cpu", "gpu"] = "cpu",
    ):
        check_max_pixels(max_pixels)
        root_dir = existing_dir(root, "image folder root")
        classes = class_dirs(root_dir)
        if not classes:
            raise DataError(f"{root_dir} has no class folders: expected <root>/<class name>/<image files>")
        if isinstance(holdout, bool) or not (
            (isinstance(holdout, int) and holdout >= 0) or (isinstance(holdout, float) and 0 <= holdout < 1)
        ):
            raise ConfigError(f"holdout: expected images per class (int >= 0) or a fraction in [0, 1), got {holdout!r}")
        if val_root is not None and holdout:
            raise ConfigError("ImageFolder: give val_root or holdout, not both")
        if split not in ("train", "val"):
            raise ConfigError(f"split: expected 'train' or 'val', got {split!r}")
        self.eval_split = "val" if val_root is not None or holdout else None
        if split == "val" and self.eval_split is None:
            raise ConfigError(f"ImageFolder {root_dir} has no val split: set val_root or holdout")

        if val_root is not None and split == "val":
            val_dir = existing_dir(val_root, "image folder val_root")
            val_classes = class_dirs(val_dir)
            if val_classes != classes:
                extra = sorted(set(val_classes) - set(classes))
                missing = sorted(set(classes) - set(val_classes))
                raise DataError(
                    f"{val_dir} must have the same class folders as {root_dir}: "
                    f"missing {name_few(missing)}; not in root {name_few(extra)}"
                )
            samples, unlisted = class_samples(val_dir, classes)
        else:
            samples, unlisted = class_samples(root_dir, classes)
            if holdout:
                samples = _split_holdout(samples, classes, holdout, seed, keep=split)
        super().__init__(samples, classes, transform, on_error, cache, max_pixels, unlisted, decode)


def _split_holdout(
    samples: list[tuple[str, int]], classes: list[str], holdout: int | float, seed: int, keep: str
) -> list[tuple[str, int]]:
    """The train or val part of a stratified holdout drawn per class with `seed`."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    kept = []
    for label, items in by_class.items():
        n = len(items)
        k = holdout if isinstance(holdout, int) else max(1, round(holdout * n))
        if k >= n:
            raise DataError(
                f"class {classes[label]!r} has {n} images: cannot hold out {k} for val and keep any for train"
            )
        # A string seed is hashed with SHA-512 by `random`: stable across processes and runs.
        held = set(random.Random(f"{seed}/{classes[label]}").sample(range(n), k))
        kept += [s for i, s in enumerate(items) if (i in held) == (keep == "val")]
    return kept


def name_few(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
