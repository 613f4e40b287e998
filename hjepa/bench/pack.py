"""`pack`: a .tar of the first n images of a flat folder, for machines that do not see ../shared."""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

from hjepa.bench.common import ROOT

HELP = "tar the first n images of a folder (for the GPU machine)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet-samples"))
    p.add_argument("--n", type=int, default=400)
    p.add_argument("pack")


def run(a: argparse.Namespace) -> list[dict]:
    """A .tar of the first n images of a flat folder, for machines that do not see ../shared."""
    from hjepa.data.folder import list_images

    files = list_images(Path(a.images).expanduser())[: a.n]
    Path(a.pack).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(a.pack, "w") as tar:
        for f in files:
            tar.add(f, arcname=Path(f).name)
    print(f"packed {len(files)} images into {a.pack} ({Path(a.pack).stat().st_size / 1e6:.1f} MB)")
    return []
