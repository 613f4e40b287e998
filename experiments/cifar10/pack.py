"""Move an image-folder tree (e.g. the 50,000 CIFAR-10 train JPEGs) as ONE file, and cut subsets.

    python experiments/cifar10/pack.py pack ../shared/data/cifar10/train experiments/cifar10/data/cifar10_train.npz
    python experiments/cifar10/pack.py unpack experiments/cifar10/data/cifar10_train.npz /tmp/data/cifar10/train
    python experiments/cifar10/pack.py subset ../shared/data/cifar10/train /tmp/cifar10_500 --per-class 500

`pack` stores every file of <src>/<class>/<file> as its raw bytes, concatenated, plus the byte
offsets and the relative paths (an uncompressed .npz: JPEGs do not compress). The 50,000
CIFAR-10 JPEGs are 47 MB of bytes; as a tar, with a 512-byte header and padding per file, they
would be ~77 MB, over the GPU machine's 64 MiB carry limit. `unpack` writes the same tree
back, byte for byte (sorted names, so ImageFolder's order and its seeded holdout are the same).
`subset` links (or copies, where links are refused) the first N files of each class in sorted
order: the CPU recipe's few thousand images. Needs only numpy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def _files(src: Path, per_class: int | None = None) -> list[Path]:
    """<src>/<class>/<file> in sorted order (hidden entries skipped), at most per_class per class."""
    if not src.is_dir():
        sys.exit(f"error: {src} is not a folder (expected <folder>/<class name>/<image files>)")
    out = []
    for cls in sorted(d for d in os.listdir(src) if (src / d).is_dir() and not d.startswith(".")):
        names = sorted(f for f in os.listdir(src / cls) if not f.startswith(".") and (src / cls / f).is_file())
        out += [src / cls / f for f in names[:per_class]]
    if not out:
        sys.exit(f"error: no files under {src}/<class>/")
    return out


def pack(src: Path, dest: Path, per_class: int | None = None) -> dict:
    files = _files(src, per_class)
    blobs = [f.read_bytes() for f in files]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    paths = "\n".join(str(f.relative_to(src)) for f in files).encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "wb") as fh:  # np.savez on a file object: the name keeps no added suffix
        np.savez(fh, data=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
                 paths=np.frombuffer(paths, dtype=np.uint8))
    tmp.replace(dest)
    return {"files": len(files), "bytes": int(offsets[-1]), "size": dest.stat().st_size}


def unpack(pack_file: Path, dest: Path) -> dict:
    with np.load(pack_file) as z:
        data, offsets, paths = z["data"], z["offsets"], z["paths"].tobytes().decode().split("\n")
    if len(paths) + 1 != len(offsets):
        sys.exit(f"error: {pack_file} is damaged: {len(paths)} paths for {len(offsets) - 1} files")
    for d in sorted({str(Path(p).parent) for p in paths}):
        (dest / d).mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        (dest / p).write_bytes(data[offsets[i]:offsets[i + 1]].tobytes())
    return {"files": len(paths), "bytes": int(offsets[-1])}


def subset(src: Path, dest: Path, per_class: int) -> dict:
    files = _files(src, per_class)
    for f in files:
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        try:
            target.symlink_to(f.resolve())
        except OSError:  # e.g. Windows without the right to make links
            shutil.copyfile(f, target)
    return {"files": len(files)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="<src>/<class>/<file> -> one .npz")
    a.add_argument("src", type=Path)
    a.add_argument("dest", type=Path)
    a.add_argument("--per-class", type=int, default=None, help="only the first N files of each class")
    b = sub.add_parser("unpack", help="one .npz -> <dest>/<class>/<file>")
    b.add_argument("pack", type=Path)
    b.add_argument("dest", type=Path)
    c = sub.add_parser("subset", help="link the first N files of each class into <dest>")
    c.add_argument("src", type=Path)
    c.add_argument("dest", type=Path)
    c.add_argument("--per-class", type=int, required=True)
    args = p.parse_args(argv)
    t = time.perf_counter()
    if args.cmd == "pack":
        r = pack(args.src, args.dest, args.per_class)
    elif args.cmd == "unpack":
        r = unpack(args.pack, args.dest)
    else:
        r = subset(args.src, args.dest, args.per_class)
    print(f"{args.cmd}: {r} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
