"""The reference-parity options (facebookresearch/ijepa's choices, beside this project's):
`model.init`, `optim.warmup_epochs` and `mask.geometry`, plus the `model/levels` config group.
Real models and real collators; the reference's rules are restated here, not imported."""

import json
import math
from pathlib import Path

import pytest
import torch

from hjepa import CONF_DIR
from hjepa.config import build, validate
from hjepa.engine.optim import Optimization
from hjepa.errors import ConfigError
from hjepa.masks import MultiBlockMaskCollator
from hjepa.models.hjepa import HJEPA
from hjepa.train import train

IJEPA = [{"depth": "last", "stride": 1, "weight": 1.0}]



def _model(init: str, arch: str = "test_vit", img: int = 32, patch: int = 4, seed: int = 0) -> HJEPA:
    torch.manual_seed(seed)
    return HJEPA(arch, img, patch, IJEPA, predictor_dim=64, predictor_depth=4, predictor_heads=2, init=init)


# ---- model.init ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,img,patch", [("test_vit", 32, 4), ("vit_small_patch16_224", 224, 16)])
def test_reference_init_is_trunc_normal_002_everywhere_without_the_residual_rescale(arch, img, patch):
    ref, ours = _model("reference", arch, img, patch), _model("rescaled", arch, img, patch)
    for model in (ref.encoder, ref.predictor):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) >= 8
        for m in linears:  # every Linear: std 0.02 (no rescale), zero bias, no weight beyond +-2 (trunc)
            tol = 0.2 if m.weight.numel() < 10_000 else 0.05
            assert m.weight.std().item() == pytest.approx(0.02, rel=tol)
            assert torch.count_nonzero(m.bias) == 0
    conv = ref.encoder.patch_embed.proj
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.1) and torch.count_nonzero(conv.bias) == 0
    # Today's: timm's Conv2d default, kaiming-uniform(a=sqrt(5)): std 1 / sqrt(3 * fan_in).
    fan_in = 3 * patch * patch
    assert ours.encoder.patch_embed.proj.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
    # Today's divides the residual outputs by sqrt(2 * layer); the reference's do not decay with depth.
    for blocks, ref_blocks in ((ours.encoder.blocks, ref.encoder.blocks), (ours.predictor.blocks, ref.predictor.blocks)):
        for layer, (b, rb) in enumerate(zip(blocks, ref_blocks), start=1):
            for name in ("attn.proj", "mlp.fc2"):
                w, rw = b.get_submodule(name).weight, rb.get_submodule(name).weight
                tol = 0.25 if w.numel() < 10_000 else 0.05
                assert w.std().item() == pytest.approx(0.02 / math.sqrt(2 * layer), rel=tol)
                assert rw.std().item() == pytest.approx(0.02, rel=tol)
    # Both: LayerNorms at 1 / 0, fixed sin-cos positions, identical target encoder at the start.
    for model in (ref, ours):
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        for p, q in zip(model.encoder.parameters(), model.target_encoder.parameters()):
            assert torch.equal(p, q)
    assert torch.equal(ref.encoder.pos_embed, ours.encoder.pos_embed)


def test_init_is_a_config_option_and_a_bad_value_is_a_clear_error(compose_config):
    cfg = validate(compose_config("model=hjepa_vit_micro", "model.init=reference"))
    assert cfg.model.init == "reference"
    model = build(cfg.model)
    assert model.encoder.patch_embed.proj.weight.std().item() < 0.03  # not timm's 0.083 at patch 4
    with pytest.raises(ConfigError, match="model.init"):
        validate(compose_config("model.init=ijepa"))
    with pytest.raises(ConfigError, match="model.init"):
        HJEPA("test_vit", 32, 4, IJEPA, predictor_dim=64, predictor_heads=2, init="xavier")


def test_both_inits_train_a_step_and_start_from_different_weights():
    ref, ours = _model("reference"), _model("rescaled")
    assert not torch.equal(ref.encoder.blocks[5].mlp.fc2.weight, ours.encoder.blocks[5].mlp.fc2.weight)
    collator = MultiBlockMaskCollator(ref.grid_size, min_keep=4)
    context, targets = collator.sample(8, torch.Generator().manual_seed(0))
    images = torch.randn(8, 3, 32, 32)
    for model in (ref, ours):
        out = model(images, context, targets)
        out["loss"].backward()
        assert math.isfinite(out["loss"].item()) and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


# ---- mask.geometry -------------------------------------------------------------------------

def _reference_shapes(grid: int, scale, aspect) -> set:
    """Every (h, w) the reference's _sample_block_size can return: one number u sets both
    the scale and the aspect ratio; sides are capped at grid - 1."""
    shapes = set()
    for u in torch.linspace(0, 1, 20001).tolist():
        area = int(grid * grid * (scale[0] + u * (scale[1] - scale[0])))
        ratio = aspect[0] + u * (aspect[1] - aspect[0])
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        shapes.add((min(h, grid - 1), min(w, grid - 1)))
    return shapes


def _shape(indices: torch.Tensor, grid: int) -> tuple[int, int]:
    rows, cols = indices // grid, indices % grid
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("grid,min_keep,fewer", [(8, 4, 0.75), (14, 10, 0.95)])
def test_reference_geometry_follows_the_reference_rules(grid, min_keep, fewer):
    ref = MultiBlockMaskCollator((grid, grid), min_keep=min_keep, geometry="reference")
    ours = MultiBlockMaskCollator((grid, grid), min_keep=min_keep)
    allowed = _reference_shapes(grid, (0.15, 0.2), (0.75, 1.5))
    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref_shapes, our_shapes, ref_k, our_k = set(), set(), [], []
    ref_touch = our_touch = 0
    for _ in range(150):
        context, targets = ref.sample_blocks(16, g_ref)
        for block in targets.reshape(-1, targets.shape[-1]):
            ref_shapes.add(_shape(block, grid))
            assert len(block) == math.prod(_shape(block, grid))  # a full rectangle
        # exclusive offset bound: no block ever reaches the last row or column
        last = torch.tensor([i for i in range(grid * grid) if i % grid == grid - 1 or i // grid == grid - 1])
        ref_touch += int(torch.isin(targets, last).sum() + context[:, last].sum())
        assert (context.sum(1) > min_keep).all()  # the reference keeps contexts of more than min_keep
        ref_k.append(ref.sample(16, g_ref)[0].shape[1])
        c2, t2 = ours.sample_blocks(16, g_ours)
        our_shapes.update(_shape(b, grid) for b in t2.reshape(-1, t2.shape[-1]))
        our_touch += int(torch.isin(t2, last).sum() + c2[:, last].sum())
        our_k.append(ours.sample(16, g_ours)[0].shape[1])
    assert ref_touch == 0 and our_touch > 0
    assert ref_shapes <= allowed and len(ref_shapes) >= 2
    assert not our_shapes <= allowed  # independent scale and aspect reach other shapes
    # Fewer context patches than the unbiased sampler (measured: ~0.6x at 8x8, ~0.87x at 14x14).
    assert sum(ref_k) < fewer * sum(our_k)


def test_reference_geometry_on_the_cifar_grid_puts_the_context_block_top_left():
    # 8x8 grid, context scale 0.85-1.0 -> a 7x7 block (capped at grid - 1), offsets randint(0, 1) = 0.
    ref = MultiBlockMaskCollator((8, 8), min_keep=4, geometry="reference")
    context, targets = ref.sample_blocks(64, torch.Generator().manual_seed(0))
    block = torch.tensor([r * 8 + c for r in range(7) for c in range(7)])
    outside = torch.ones(64, dtype=torch.bool)
    outside[block] = False
    assert not context[:, outside].any()
    # the context is that block minus the targets
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[:, block] = True
    expected.scatter_(1, targets.reshape(64, -1), False)
    assert torch.equal(context, expected)


@pytest.mark.parametrize("geometry", ["reference", "unbiased"])
def test_truncation_keeps_the_first_indices_in_the_reference_and_a_random_subset_otherwise(geometry):
    collator = MultiBlockMaskCollator((8, 8), min_keep=4, geometry=geometry)
    full, targets = collator.sample_blocks(32, torch.Generator().manual_seed(3))
    keep, targets2 = collator.sample(32, torch.Generator().manual_seed(3))  # starts with the same call
    assert torch.equal(targets, targets2)
    k = int(full.sum(1).min())
    assert keep.shape == (32, k)
    firsts = 0
    for b in range(32):
        mine = full[b].nonzero().squeeze(1)
        assert torch.isin(keep[b], mine).all() and torch.equal(keep[b], keep[b].sort().values)
        firsts += torch.equal(keep[b], mine[:k])
    if geometry == "reference":
        assert firsts == 32
    else:
        assert firsts < 32


def test_reference_geometry_relaxes_the_target_exclusion_instead_of_failing():
    # Targets of the whole grid: the reference caps them at 5x5 on a 6x6 grid and places them,
    # like the 5x5 context block, at offset 0 (randint(0, 1)), so excluding them leaves nothing;
    # it then stops excluding the last targets, one after another, and contexts overlap them.
    collator = MultiBlockMaskCollator((6, 6), target_scale=[1.0, 1.0], target_aspect=[1.0, 1.0],
                                      context_scale=[0.7, 0.7], min_keep=4, geometry="reference")
    context, targets = collator.sample_blocks(16, torch.Generator().manual_seed(0))
    assert (context.sum(1) > 4).all()
    overlap = context.gather(1, targets.reshape(16, -1)).any(1)
    assert overlap.any()
    # the unbiased sampler refuses such settings with a clear message
    strict = MultiBlockMaskCollator((6, 6), target_scale=[1.0, 1.0], target_aspect=[1.0, 1.0],
                                    context_scale=[0.7, 0.7], min_keep=4)
    with pytest.raises(ConfigError, match="min_keep"):
        strict.sample_blocks(16, torch.Generator().manual_seed(0))


def test_geometry_is_a_config_option_and_a_bad_value_is_a_clear_error(compose_config):
    cfg = validate(compose_config("experiment=cifar10_cpu", "mask.geometry=reference"))
    collator = build(cfg.mask, grid_size=[8, 8])
    assert collator.geometry == "reference"
    with pytest.raises(ConfigError, match="mask.geometry"):
        validate(compose_config("mask.geometry=ijepa"))
    with pytest.raises(ConfigError, match="2x2"):
        MultiBlockMaskCollator((1, 8), target_scale=[0.2, 0.3], context_scale=[0.9, 1.0], min_keep=1,
                               geometry="reference")


# ---- optim.warmup_epochs -------------------------------------------------------------------

def test_warmup_in_epochs_as_the_reference_counts_it():
    opt = Optimization(lr=1e-3, start_lr=2e-4, final_lr=1e-6, warmup=None, warmup_epochs=40)
    opt.set_steps_per_epoch(10)
    total = 300 * 10  # the reference's ImageNet schedule: 40 of 300 epochs of warmup
    assert opt.warmup_steps(total) == 400
    assert opt.lr_at(0, total) == pytest.approx(2e-4)
    assert opt.lr_at(200, total) == pytest.approx(6e-4)  # linear
    assert opt.lr_at(400, total) == pytest.approx(1e-3)
    assert opt.lr_at(399, total) < 1e-3 and opt.lr_at(401, total) < 1e-3
    assert opt.lr_at(400 + 1300, total) == pytest.approx((1e-3 + 1e-6) / 2)  # cosine midpoint
    assert opt.lr_at(total, total) == pytest.approx(1e-6)
    # the same warmup as a fraction of training
    frac = Optimization(lr=1e-3, start_lr=2e-4, final_lr=1e-6, warmup=40 / 300)
    assert all(frac.lr_at(s, total) == pytest.approx(opt.lr_at(s, total)) for s in range(0, total + 1, 50))
    # more warmup epochs than the run has: warmup all the way
    short = Optimization(warmup=None, warmup_epochs=5)
    short.set_steps_per_epoch(10)
    assert short.warmup_steps(30) == 30


def test_warmup_settings_are_checked():
    with pytest.raises(ConfigError, match="exactly one"):
        Optimization(warmup=0.1, warmup_epochs=2)
    with pytest.raises(ConfigError, match="exactly one"):
        Optimization(warmup=None, warmup_epochs=None)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        Optimization(warmup=None, warmup_epochs=-1)
    with pytest.raises(ConfigError, match="set_steps_per_epoch"):
        Optimization(warmup=None, warmup_epochs=1).lr_at(0, 100)


def test_the_trainer_warms_up_over_epochs(tmp_path, tiny):
    # synthetic data, 2 epochs of 8 steps, warmup 1 epoch: the lr peaks at the end of epoch 1
    cfg = tiny("dataset.num_train=128", "optim.warmup=null", "optim.warmup_epochs=1")
    result = train(cfg, tmp_path / "run")
    assert result.status == "completed" and result.steps == 16
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    # record of step s carries the lr of optimizer step s - 1 (0-based)
    peak = max(lrs, key=lrs.get)
    assert peak == 9 and lrs[9] == pytest.approx(cfg.optim.lr)
    assert all(lrs[s] < lrs[s + 1] for s in range(1, 9)) and all(lrs[s] > lrs[s + 1] for s in range(9, 16))


# ---- model/levels --------------------------------------------------------------------------

def test_levels_are_a_config_group_and_the_list_override_still_works(compose_config):
    default = validate(compose_config("model=hjepa_vit_small")).model.levels
    assert len(default) >= 1
    assert list(validate(compose_config("model/levels=ijepa")).model.levels) == IJEPA
    assert list(validate(compose_config("model=ijepa_vit_small")).model.levels) == IJEPA
    three = validate(compose_config("model=hjepa_vit_tiny", "model/levels=hjepa3")).model.levels
    assert [(lv.stride, lv.weight) for lv in three] == [(1, 1.0), (2, 0.5), (4, 0.25)]
    custom = validate(compose_config("model.levels=[{depth:3,stride:2,weight:0.5}]")).model.levels
    assert list(custom) == [{"depth": 3, "stride": 2, "weight": 0.5}]


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF_DIR) / "model" / "levels").glob("*.yaml")))
def test_every_levels_option_builds_on_the_cpu_recipe(name, compose_config):
    cfg = validate(compose_config("experiment=cifar10_cpu", f"model/levels={name}"))
    model = build(cfg.model)
    assert len(model.levels) == len(cfg.model.levels) >= 1
