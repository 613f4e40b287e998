"""`pip install .` from a copy of the sources (not an editable install in this checkout):
the installed entry points run with the packaged configs from any directory, a user's own
config folder joins through Hydra's search path, and the Python API example runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["hjepa-train", "hjepa-evaluate", "hjepa-export", "hjepa-report", "hjepa-bench", "hjepa-verify",
           "hjepa-prepare", "hjepa-build-imagenet100"]


def files(root: Path, pattern: str) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob(pattern) if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package installed with pip --target from a copy of hjepa/, conf/, hydra_plugins/ and pyproject.toml."""
    base = tmp_path_factory.mktemp("install")
    src, site = base / "src", base / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "hjepa", src / "hjepa", ignore=ignore)
    shutil.copytree(ROOT / "conf", src / "conf", ignore=ignore)
    shutil.copytree(ROOT / "hydra_plugins", src / "hydra_plugins", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", src)
    # --no-build-isolation: build with this environment's setuptools, nothing is downloaded
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    shutil.rmtree(src)  # the installed copy must not need its sources
    return site


def run_installed(site: Path, cwd: Path, *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command with only the installed copy importable (the editable install of this
    checkout comes later on the import path), from a directory that is not a checkout."""
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("HJEPA_DATA_ROOT", None)
    return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_installed_copy_has_every_module_config_and_script(installed):
    assert files(installed / "hjepa", "*.py") == files(ROOT / "hjepa", "*.py")
    assert files(installed / "hjepa" / "conf", "*.yaml") == files(ROOT / "conf", "*.yaml")
    assert files(installed / "hydra_plugins", "*.py") == files(ROOT / "hydra_plugins", "*.py")  # the Slurm launcher
    assert (installed / "hjepa" / "data" / "imagenet100.txt").read_text() == (
        ROOT / "hjepa" / "data" / "imagenet100.txt").read_text()
    for name in SCRIPTS:
        assert (installed / "bin" / name).is_file(), name


def test_installed_entry_points_with_a_users_config_folder(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a user's own config folder with a dataset option of its own, on top of the packaged ones
    user_conf = tmp_path / "my_conf"
    (user_conf / "dataset").mkdir(parents=True)
    (user_conf / "dataset" / "my_shapes.yaml").write_text(
        "# @package _global_\ndefaults:\n  - synthetic_tiny\n  - _self_\ndataset:\n  num_train: 128\n")

    # the installed copy is the one imported, and every console script's target loads
    where = run_installed(installed, elsewhere, sys.executable, "-c", (
        "import hjepa; from importlib.metadata import entry_points; print(hjepa.__file__, hjepa.CONF_DIR); "
        "print(*sorted(e.name for e in entry_points(group='console_scripts') if e.value.startswith('hjepa.') "
        "and callable(e.load()))); "
        "from hjepa.bench import common; print(common.CONF, common.model_kwargs('hjepa_vit_micro', 32, 4, 'config')['arch'])"))
    assert where.returncode == 0, where.stderr
    lines = where.stdout.splitlines()
    assert lines[0].split() == [str(installed / "hjepa" / "__init__.py"), str(installed / "hjepa" / "conf")]
    assert lines[1].split() == sorted(SCRIPTS)
    assert lines[2].split() == [str(installed / "hjepa" / "conf"), "test_vit"]  # the bench reads the packaged conf

    run_dir = tmp_path / "run"
    train = run_installed(installed, elsewhere, str(installed / "bin" / "hjepa-train"), "experiment=tiny",
                          "dataset=my_shapes", "trainer.epochs=1", f"hydra.searchpath=[file://{user_conf}]",
                          f"hydra.run.dir={run_dir}")
    assert train.returncode == 0, train.stdout + train.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 128 // 16
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["dataset"]["num_train"] == 128

    # python -m with the packaged evaluate.yaml / config.yaml, and the argparse entry points
    evaluate = run_installed(installed, elsewhere, sys.executable, "-m", "hjepa.evaluate", f"run={run_dir}",
                             "eval=knn", "hardware=cpu", "hardware.num_workers=0")
    assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr
    assert json.loads((run_dir / "eval_knn.json").read_text())["num_eval"] == 64
    out = run_installed(installed, elsewhere, "bash", "-c", f"{installed}/bin/hjepa-verify experiment=tiny && "
                        f"{sys.executable} -m hjepa.export run={run_dir}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "usable" in out.stdout.splitlines()
    assert (run_dir / "backbone.pt").is_file() and (run_dir / "backbone.json").is_file()
    assert not list(elsewhere.iterdir())  # nothing written where the commands ran


def test_the_editable_install_finds_the_top_level_conf(tmp_path):
    """`pip install -e .` (requirements.txt): the package is this checkout's hjepa/ and the
    configs its top-level conf/, from any directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import hjepa; print(hjepa.__file__); print(hjepa.CONF_DIR)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    if out.returncode or Path(lines[0]) != ROOT / "hjepa" / "__init__.py":
        pytest.skip(f"this checkout is not the editable install of {sys.executable} (pip install -e .)")
    assert lines[1] == str(ROOT / "conf")


def test_python_api_example(imagenet_tree, tmp_path):
    """experiments/python_api.py: datasets (ImageNet-100 from real JPEGs), a mixture, the
    collator, the model and training steps, without Hydra."""
    root = imagenet_tree(tmp_path / "imagenet", splits=("train",))
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "python_api.py"), "--imagenet", str(root),
                          "--steps", "3", "--grad-checkpointing"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "imagenet100: 100 images, weight 0.25" in lines
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 3 and all("loss/level2=" in line for line in steps)
    losses = [float(line.split("loss ")[1].split()[0]) for line in steps]
    assert all(0 < v < 10 for v in losses)
    assert lines[-1] == "features: (8, 64)"
