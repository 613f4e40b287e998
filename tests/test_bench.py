"""The benchmark CLI (tiny sizes, CPU), the training step's numerics against a
straightforward implementation, and the absence of host syncs in the step."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hjepa import bench
from hjepa.data.transforms import normalize
from hjepa.engine.device import Hardware
from hjepa.engine.optim import Optimization
from hjepa.engine.step import batch_to_device, forward_backward, optimizer_update
from hjepa.engine.trainer import _Meter
from hjepa.masks import MultiBlockMaskCollator
from hjepa.models.hjepa import HJEPA

LEVELS = [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": 2, "stride": 2, "weight": 0.5},
          {"depth": "last", "stride": 4, "weight": 0.25}]
TINY = ["--arch", "test_vit", "--img", "32", "--patch", "4", "--batch", "4", "--precision", "fp32",
        "--predictor", "32,1,2", "--warmup", "1", "--steps", "2"]


def run_json(capsys, *argv):
    assert bench.main([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------- numerics

def _reference_loss(model: HJEPA, images, context, targets):
    """H-JEPA written out the slow way: explicit softmax attention, one image and one target
    block at a time, cells pooled with Python dictionaries."""
    enc, tgt_enc, pred = model.encoder, model.target_encoder, model.predictor
    B, T, M = targets.shape
    grid_w = model.grid_size[1]
    total = 0.0
    per_level = []
    for k, level in enumerate(model.levels):
        level_losses = []
        for b in range(B):
            x = enc.patch_embed(images[b:b + 1])
            x = x.reshape(1, -1, x.shape[-1]) + enc.pos_embed.reshape(1, -1, x.shape[-1])
            full = x
            x = enc.norm(enc.blocks(x[:, context[b]]))
            with torch.no_grad():
                h = full
                outs = []
                for blk in tgt_enc.blocks:
                    h = blk(h)
                    outs.append(h)
                feat = tgt_enc.norm(outs[-1]) if level.depth == "last" else outs[level.depth - 1]
                feat = F.layer_norm(feat, feat.shape[-1:])[0]
            for t in range(T):
                idx = targets[b, t]
                z = pred.embed(x) + pred.pos_embed[context[b]]
                q = pred.mask_token + pred.pos_embed[idx]
                z = pred.norm(pred.blocks(torch.cat([z, q], dim=1)))[0, context.shape[1]:]
                p = pred.heads[k](z)
                y = feat[idx]
                if level.stride == 1:
                    level_losses.append(F.smooth_l1_loss(p, y, reduction="none").mean(-1))  # [M] per patch
                    continue
                cells = {}
                for j, patch in enumerate(idx.tolist()):
                    cell = (patch // grid_w // level.stride, patch % grid_w // level.stride)
                    cells.setdefault(cell, []).append(j)
                per_cell = [F.smooth_l1_loss(p[js].mean(0), y[js].mean(0)) for js in cells.values()]
                level_losses.append(torch.stack(per_cell).mean().unsqueeze(0))
        loss = torch.cat(level_losses).mean()  # stride 1: all patches; else: the blocks' cell means
        per_level.append(loss)
        total = total + level.weight * loss
    return total, per_level


def test_fast_step_matches_a_straightforward_implementation():
    """Losses and gradients of the model's batched path (gather before the blocks, SDPA, one
    predictor sequence per block via repeat, sort-based cell pooling) against the slow path,
    in float64 (the loss itself is taken in float32 by design, hence the tolerances)."""
    torch.manual_seed(0)
    model = HJEPA("test_vit", 32, 4, LEVELS, 32, 2, 2).double()
    context, targets = MultiBlockMaskCollator(model.grid_size, min_keep=4).sample(2, torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    slow_model = copy.deepcopy(model)
    for m in slow_model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False

    out = model(images, context, targets)
    out["loss"].backward()
    total, per_level = _reference_loss(slow_model, images, context, targets)
    total.backward()
    for k, loss in enumerate(per_level):
        torch.testing.assert_close(out[f"loss/level{k}"], loss.detach(), rtol=1e-5, atol=1e-7, check_dtype=False)
    torch.testing.assert_close(out["loss"].detach(), total.detach(), rtol=1e-5, atol=1e-7, check_dtype=False)
    fast = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    slow = {n: p.grad for n, p in slow_model.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys() and len(fast) > 20
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- host syncs

# Ops that read device data back to the host, or whose output size depends on the data
# (which on a GPU means waiting for it).
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "bincount", "unique", "_unique", "_unique2", "masked_select",
            "is_nonzero", "equal", "repeat_interleave", "nonzero_static"}


class _RecordSyncs(TorchDispatchMode):
    def __init__(self, host_tensors):
        super().__init__()
        self.host = {t.untyped_storage().data_ptr() for t in host_tensors}
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name == "repeat_interleave" and not (tensors and tensors[0].dtype == torch.long and tensors[0].dim() == 1):
                pass  # repeat_interleave(x, int) needs no data; only the tensor-of-repeats form syncs
            elif not any(t.untyped_storage().data_ptr() in self.host for t in tensors):
                self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_training_step_has_no_host_syncs():
    """The Trainer's step (batch to device, normalise, forward, backward, optimizer, EMA,
    loss meter) on the CPU, with every dispatched op recorded: none may read device values
    back. Host-side tensors (the batch's source ids, the optimizer's CPU step counters)
    are allowed to be read, as they are on a GPU too."""
    torch.manual_seed(0)
    model = HJEPA("test_vit", 32, 4, LEVELS, 32, 1, 2)
    hardware = Hardware(device="cpu", precision="fp32", batch_size=4, num_workers=0)
    optimization = Optimization()
    optimizer = optimization.build(model)
    scaler = hardware.grad_scaler()
    collator = MultiBlockMaskCollator(model.grid_size, min_keep=4)
    items = [(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), 0, 0, k) for k in range(4)]
    meter = _Meter(torch.device("cpu"), 1)

    def step(i, data):
        optimization.apply(optimizer, i, 100)
        images, context, targets = batch_to_device(data, [None], torch.device("cpu"))
        out = forward_backward(model, normalize(images), context, targets, hardware.autocast(), scaler)
        meter.add(out, data["sources"])
        optimizer_update(model, optimizer, scaler, 1.0, optimization.momentum_at(i, 100))

    step(0, collator(items))  # creates the optimizer state
    steps = [s["step"] for s in optimizer.state.values()]
    for i in range(1, 3):
        data = collator(items)
        with _RecordSyncs([data["sources"], *steps]) as rec:
            step(i, data)
        assert rec.found == [], f"host syncs in the training step: {rec.found}"
    assert meter.count == 3


def test_trainer_uses_fused_adamw_on_cuda_and_no_grad_scaler_under_bf16():
    model = HJEPA("test_vit", 32, 4, LEVELS[:1], 32, 1, 2)
    assert Optimization().build(model, fused=True).defaults["fused"] is True
    cpu = Optimization().build(model)
    assert cpu.defaults["foreach"] is True
    assert not Hardware(device="cpu", precision="bf16").grad_scaler().is_enabled()
    assert not Hardware(device="cpu", precision="fp32").grad_scaler().is_enabled()


def test_ema_is_one_foreach_lerp():
    torch.manual_seed(0)
    model = HJEPA("test_vit", 32, 4, LEVELS[:1], 32, 1, 2)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    expected = [0.9 * t + 0.1 * o for t, o in zip(model.target_encoder.parameters(), model.encoder.parameters())]
    model.update_target(0.9)
    for e, t in zip(expected, model.target_encoder.parameters()):
        torch.testing.assert_close(t, e)


# ----------------------------------------------------------------------------- CLI

def test_model_kwargs_from_yaml_equal_hydra_composition():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    for name in ("hjepa_vit_small", "ijepa_vit_small", "hjepa_vit_base"):
        with initialize_config_dir(config_dir=str(bench.CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"model={name}", "image_size=224", "patch_size=16"])
        composed = OmegaConf.to_container(cfg.model, resolve=True)
        composed.pop("_target_")
        assert bench.model_kwargs(name, 224, 16, "config") == composed
    ijepa = bench.model_kwargs("hjepa_vit_small", 224, 16, "ijepa")
    assert ijepa == bench.model_kwargs("ijepa_vit_small", 224, 16, "config")


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
    context, targets = bench.reference_masks(16, 14, 14, g)
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
    assert all(r["baseline"] == base for r in rows[1:]) and all(r["ratio"] > 0 for r in rows[1:])


def test_pack_and_unpack_roundtrip(tmp_path):
    images = _jpegs(tmp_path / "flat", 4)
    pack = tmp_path / "p.tar"
    bench.main(["pack", "--images", str(images), "--n", "3", str(pack)])
    out = bench.unpack_images(str(pack), tmp_path / "work")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in images.iterdir())[:3]
    tree = bench.class_tree(out, tmp_path / "work", None, copies=2)
    assert len(list(tree.rglob("*.JPEG"))) == 6
