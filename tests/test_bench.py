"""The benchmark CLI at tiny sizes on the CPU (its numbers are checked for consistency,
never against the wall clock)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hjepa.bench import common, data, masks
from hjepa.bench.__main__ import main

TINY = ["--arch", "test_vit", "--img", "32", "--patch", "4", "--batch", "4", "--precision", "fp32",
        "--predictor", "32,1,2", "--warmup", "1", "--steps", "2"]


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_model_kwargs_from_yaml_equal_hydra_composition(compose_config):
    from omegaconf import OmegaConf

    for name in ("hjepa_vit_small", "ijepa_vit_small", "hjepa_vit_base"):
        cfg = compose_config(f"model={name}", "image_size=224", "patch_size=16")
        composed = OmegaConf.to_container(cfg.model, resolve=True)
        composed.pop("_target_")
        assert common.model_kwargs(name, 224, 16, "config") == composed
    ijepa = common.model_kwargs("hjepa_vit_small", 224, 16, "ijepa")
    assert ijepa == common.model_kwargs("ijepa_vit_small", 224, 16, "config")


def test_bench_step_runs_tiny_on_cpu(capsys):
    rows = run_json(capsys, "step", "--models", "hjepa_vit_small", "--compile", "off", *TINY)
    peak, ijepa, hjepa = rows
    assert peak["what"] == "matmul peak" and peak["value"] > 0
    for r in (ijepa, hjepa):
        assert r["unit"] == "img/s" and r["value"] > 0 and r["torch"] == torch.__version__
        assert r["gflop_per_img_matmul"] > 0 and r["tflops_matmul"] > 0 and 0 < r["fraction_of_matmul_peak"]
        assert r["batch"] == 4 and r["compile"] is False
    assert ijepa["levels"] == 1 and hjepa["levels"] == 3
    assert hjepa["baseline"] == ijepa["value"] and hjepa["ratio"] == pytest.approx(hjepa["value"] / ijepa["value"])
    assert ijepa["baseline"] is None  # the H100 reference only counts on the reference setup
    # the three levels cost more than one, but the encoders and predictor dominate
    assert hjepa["gflop_per_img_matmul"] >= ijepa["gflop_per_img_matmul"]


@pytest.mark.slow
def test_bench_step_compiled_on_cpu(capsys):
    rows = run_json(capsys, "step", "--models", "hjepa_vit_small", "--levels", "ijepa", "--compile", "both", *TINY)
    eager, compiled = rows[1], rows[2]
    assert compiled["compile"] is True and compiled["baseline"] == eager["value"]
    assert "error" not in compiled


def test_reference_masks_follow_the_reference_rules():
    g = torch.Generator().manual_seed(0)
    context, targets = masks.reference_masks(16, 14, 14, g)
    assert context.dim() == 2 and targets.shape[:2] == (16, 4)
    assert context.shape[1] > 10 and targets.max() < 196
    for b in range(16):  # contexts avoid the targets (acceptable regions), unless relaxed
        assert len(set(context[b].tolist()) & set(targets[b].flatten().tolist())) <= context.shape[1] // 2


def test_bench_masks_reports_both_collators(capsys):
    ref, ours = run_json(capsys, "masks", "--batch", "16", "--repeats", "10")
    assert ref["unit"] == ours["unit"] == "ms/batch"
    assert ours["baseline"] == ref["value"] and ours["ratio"] == pytest.approx(ref["value"] / ours["value"])


def _jpegs(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        h, w = 180 + 40 * (i % 3), 260 + 30 * (i % 4)
        smooth = F.interpolate(torch.rand(1, 3, h // 20, w // 20, generator=g), size=(h, w), mode="bilinear")
        arr = (smooth[0] * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"n0000000{i % 2}_img{i}.JPEG", quality=90)
    return folder


def test_bench_data_runs_on_a_few_images(capsys, tmp_path):
    images = _jpegs(tmp_path / "flat", 6)
    rows = run_json(capsys, "data", "--images", str(images), "--n", "6", "--size", "64", "--rounds", "1",
                    "--prepare-workers", "1")
    assert [r["unit"] for r in rows] == ["img/s/core"] * 4
    base = rows[0]["value"]
    assert all(r["baseline"] == base and r["ratio"] == pytest.approx(r["value"] / base) for r in rows[1:])
    assert all(r["value"] == pytest.approx(1e3 / r["ms_per_img"]) for r in rows)


def test_pack_and_unpack_roundtrip(tmp_path):
    images = _jpegs(tmp_path / "flat", 4)
    pack = tmp_path / "p.tar"
    main(["pack", "--images", str(images), "--n", "3", str(pack)])
    out = data.unpack_images(str(pack), tmp_path / "work")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in images.iterdir())[:3]
    tree = data.class_tree(out, tmp_path / "work", None, copies=2)
    assert len(list(tree.rglob("*.JPEG"))) == 6
