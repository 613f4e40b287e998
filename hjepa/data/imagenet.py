"""ImageNet-1k and its class subsets (ImageNet-100) from <root>/{train,val}/<wnid>/*.JPEG."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Literal, Optional

from hjepa.data.folder import FileDataset, name_few, class_dirs, class_samples
from hjepa.data.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, check_max_pixels
from hjepa.errors import ConfigError, DataError, MissingDataError

# The CMC ImageNet-100 list (Tian et al. 2019), shipped with the package.
IMAGENET100_FILE = Path(__file__).with_name("imagenet100.txt")

HOW_TO_GET = (
    "ImageNet-1k (ILSVRC-2012) is downloaded, after registering, from https://image-net.org/download.php "
    "(ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar). Expected layout: "
    "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG."
)
FLAT_VAL = (
    "ImageNet val must be in class folders <root>/val/<wnid>/*.JPEG, but {dir} holds the images "
    "directly. The usual fix is the valprep.sh script (e.g. from "
    "https://github.com/soumith/imagenetloader.torch), run inside {dir}: it creates the 1,000 wnid "
    "folders and moves each image into its class."
)
_WNID = re.compile(r"n\d{8}")


def read_wnids(subset: str) -> tuple[list[str], str]:
    """The sorted wnids of a subset ("imagenet100" or a path to a file of wnids) and its name."""
    path = IMAGENET100_FILE if subset == "imagenet100" else Path(subset).expanduser()
    if not path.is_file():
        raise ConfigError(f"subset: expected 'imagenet100' or a file of wnids (one per line); {path} does not exist")
    wnids = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not _WNID.fullmatch(line):
            raise ConfigError(f"{path}:{n}: expected a WordNet id like n01440764, got {line!r}")
        wnids.append(line)
    if not wnids:
        raise ConfigError(f"{path} lists no wnids")
    name = "ImageNet-100" if subset == "imagenet100" else f"subset {path.name}"
    return sorted(set(wnids)), name


class ImageNet(FileDataset):
    """ImageNet-1k, or only the classes of `subset`; labels = index in sorted wnid order.

    With a subset only those wnid folders are listed, so ImageNet-100 costs nothing more
    to open than a folder of its 100 classes. `decode`: "gpu" decodes the training JPEGs on
    the GPU (see FileDataset).
    """

    eval_split = "val"

    def __init__(
        self,
        root: str,
        split: Literal["train", "val"],
        transform: Optional[Callable] = None,
        subset: Optional[str] = None,
        on_error: Literal["skip", "raise"] = "skip",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode: Literal["cpu", "gpu"] = "cpu",
    ):
        check_max_pixels(max_pixels)
        root_dir = Path(root).expanduser()
        if not root_dir.is_dir():
            raise MissingDataError(f"ImageNet root {root_dir} does not exist. {HOW_TO_GET}")
        if split not in ("train", "val"):
            raise ConfigError(f"split: expected 'train' or 'val', got {split!r}")
        split_dir = root_dir / split
        if not split_dir.is_dir():
            raise MissingDataError(f"ImageNet {split} folder {split_dir} does not exist. {HOW_TO_GET}")

        if subset is None:
            # The class list comes from train/ so that val labels match train labels.
            wnids = class_dirs(root_dir / "train" if (root_dir / "train").is_dir() else split_dir)
            name = "ImageNet"
            if not wnids:
                self._raise_layout(split_dir, "no class folders")
        else:
            wnids, name = read_wnids(subset)
        missing = [w for w in wnids if not (split_dir / w).is_dir()]
        if missing:
            self._raise_layout(
                split_dir,
                f"{len(missing)} of the {len(wnids)} {name} classes have no folder in {split_dir}: {name_few(missing)}",
            )
        samples, unlisted = class_samples(split_dir, wnids)
        super().__init__(samples, wnids, transform, on_error, max_pixels=max_pixels, unlisted=unlisted, decode=decode)

    @staticmethod
    def _raise_layout(split_dir: Path, problem: str) -> None:
        # Images lying directly in the split folder: the flat val/ of the official tar.
        with os.scandir(split_dir) as entries:
            flat = any(e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file() for e in entries)
        if flat:
            raise DataError(FLAT_VAL.format(dir=split_dir))
        raise DataError(f"{problem}. Expected {split_dir}/<wnid>/*.JPEG. {HOW_TO_GET}")
