"""Put into .gpu/ (git-ignored) everything experiments/gpu/run.sh needs on the GPU machine,
which sees neither ../shared/data nor any package registry, and check that it fits the
device tool's 64 MiB limit on what travels.

    python experiments/gpu/prepare.py --ijepa-git <ijepa git dir>

--ijepa-git is the git directory the session's fetch tool returns for
github:facebookresearch/ijepa. Writes:

    .gpu/data/cifar10_train.npz   the 50,000 CIFAR-10 train JPEGs as one file (experiments/cifar10/pack.py)
    .gpu/data/imagenet125.tar     every 8th of the 1,000 imagenet-samples JPEGs (all sizes, grayscale included)
    .gpu/whl/*.whl                hydra-core, omegaconf and antlr4-python3-runtime at the versions installed
                                  here (the GPU image has torch, torchvision, timm, PyYAML and pytest)
    .gpu/ijepa/{src,LICENSE}      the reference code, only for the timing harness; never committed

then prints the size of every part and of the whole tree that travels (tracked and untracked
files that git does not ignore, plus .gpu).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "cifar10"))
import pack  # noqa: E402  (experiments/cifar10/pack.py)

LIMIT = 64 * 2**20
WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime")


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def travelling_size() -> int:
    """Bytes of the working tree the device tool sends (tracked + untracked-not-ignored files)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ijepa-git", type=Path, help="git directory of a fetched facebookresearch/ijepa")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu")
    p.add_argument("--every", type=int, default=8, help="take every N-th imagenet-samples image")
    a = p.parse_args(argv)
    data = a.out / "data"
    data.mkdir(parents=True, exist_ok=True)

    cifar = data / "cifar10_train.npz"
    if not cifar.exists():
        print("cifar10:", pack.pack(a.shared / "cifar10" / "train", cifar))
    images = sorted((a.shared / "imagenet-samples").iterdir())[:: a.every]
    with tarfile.open(data / f"imagenet{len(images)}.tar", "w") as tar:
        for f in images:
            tar.add(f, arcname=f.name)
    for old in data.glob("imagenet*.tar"):
        if old.name != f"imagenet{len(images)}.tar":
            old.unlink()

    whl = a.out / "whl"
    whl.mkdir(exist_ok=True)
    for name in WHEELS:
        version = importlib.metadata.version(name)
        if any(whl.glob(f"{name.replace('-', '_')}-{version}-*.whl")):
            continue
        if name == "antlr4-python3-runtime":  # published as an sdist only: build the (pure-Python) wheel
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(whl), f"{name}=={version}"]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                   "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64", "-d", str(whl),
                   f"{name}=={version}"]
        subprocess.run(cmd, check=True)

    if a.ijepa_git:
        dest = a.out / "ijepa"
        dest.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "--git-dir", str(a.ijepa_git), "archive", "HEAD", "src", "LICENSE"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    elif not (a.out / "ijepa" / "src" / "helper.py").exists():
        print("warning: no --ijepa-git and no .gpu/ijepa: the facebookresearch/ijepa rows will be skipped")

    parts = {"data": folder_size(data), "whl": folder_size(whl), "ijepa": folder_size(a.out / "ijepa")}
    tree = travelling_size()
    total = tree + folder_size(a.out)
    for name, size in parts.items():
        print(f"  .gpu/{name}: {size / 2**20:.1f} MiB")
    print(f"  working tree without .gpu: {tree / 2**20:.1f} MiB")
    print(f"total that travels with carry=['.gpu']: {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB")
    if total > LIMIT:
        print("error: over the device tool's limit; take fewer ImageNet images (--every) or clean the working tree")
        return 1
    print('next: run(command="bash experiments/gpu/run.sh", carry=[".gpu"], timeout_s=600)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
