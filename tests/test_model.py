"""The H-JEPA model on a real (tiny) timm ViT: context isolation, targets, levels, loss, EMA, export."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer

from hjepa.errors import ConfigError
from hjepa.masks import MultiBlockMaskCollator
from hjepa.models.hjepa import HJEPA
from hjepa.models.vit import timm_kwargs

ARCH, IMG, PATCH = "vit_hjepa_test", 32, 4  # 8x8 patch grid
WIDTH, DEPTH = 64, 3
IJEPA = [{"depth": "last", "stride": 1, "weight": 1.0}]
THREE = [
    {"depth": "last", "stride": 1, "weight": 1.0},
    {"depth": 2, "stride": 2, "weight": 0.5},
    {"depth": 1, "stride": 4, "weight": 0.25},
]


@register_model
def vit_hjepa_test(pretrained: bool = False, **kwargs):
    """A real timm VisionTransformer, just small: width 64, 3 blocks, 2 heads."""
    args = dict(embed_dim=WIDTH, depth=DEPTH, num_heads=2, **kwargs)
    return _create_vision_transformer("vit_hjepa_test", pretrained=pretrained, **args)


def make_model(levels=IJEPA, **kwargs) -> HJEPA:
    torch.manual_seed(0)
    args = dict(predictor_dim=32, predictor_depth=2, predictor_heads=2)
    return HJEPA(ARCH, IMG, PATCH, levels, **{**args, **kwargs})


def make_batch(batch_size=3, seed=0):
    collator = MultiBlockMaskCollator((8, 8), min_keep=4)
    generator = torch.Generator().manual_seed(seed)
    context, targets = collator.sample(batch_size, generator)
    images = torch.randn(batch_size, 3, IMG, IMG, generator=generator)
    return images, context, targets


def patch_pixels(index: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, IMG, IMG]: True on the pixels of the given patches (indices [B, K])."""
    grid = IMG // PATCH
    on = torch.zeros(index.shape[0], grid * grid, dtype=torch.bool).scatter_(1, index, True)
    return on.view(-1, 1, grid, grid).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)


def test_context_encoder_sees_only_context_tokens():
    model = make_model().eval()
    images, context, _ = make_batch()
    out = model.encode_context(images, context)
    assert out.shape == (3, context.shape[1], WIDTH)

    outside = ~patch_pixels(context)
    perturbed = torch.where(outside, torch.randn_like(images) * 10, images)
    torch.testing.assert_close(model.encode_context(perturbed, context), out, rtol=0, atol=1e-6)
    # The perturbation is real: the full-image forward does change.
    assert not torch.allclose(model.encoder.forward_features(perturbed), model.encoder.forward_features(images))
    # And no gradient path leads from the dropped pixels to the output.
    pixels = images.clone().requires_grad_(True)
    model.encode_context(pixels, context).square().sum().backward()
    assert pixels.grad[outside.expand_as(pixels)].abs().max() == 0
    assert pixels.grad[~outside.expand_as(pixels)].abs().max() > 0


def test_target_encoder_starts_equal_and_frozen():
    model = make_model()
    online, target = model.encoder.state_dict(), model.target_encoder.state_dict()
    assert online.keys() == target.keys()
    for key in online:
        assert torch.equal(online[key], target[key]), key
        assert online[key].data_ptr() != target[key].data_ptr()  # a copy, not shared storage
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    assert not model.encoder.pos_embed.requires_grad
    model.train()
    assert not model.target_encoder.training  # no drop-path noise in the targets


def test_backward_reaches_encoder_predictor_and_every_head_but_not_target():
    model = make_model(THREE)
    images, context, targets = make_batch()
    model(images, context, targets)["loss"].backward()
    for name, module in [("encoder", model.encoder), ("predictor", model.predictor)]:
        for pname, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"
    assert len(model.predictor.heads) == 3
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert model.encoder.pos_embed.grad is None


def test_predictions_of_one_block_ignore_the_other_blocks():
    model = make_model().eval()
    images, context, targets = make_batch(batch_size=2)
    z = model.encode_context(images, context)
    moved = targets.clone()
    moved[:, 1:] = (moved[:, 1:] + 1) % model.num_patches  # move every block but the first
    first = model.predictor(z, context, targets)[0][:, 0]
    torch.testing.assert_close(model.predictor(z, context, moved)[0][:, 0], first)


def plain_context_encoder(encoder, images, context):
    """Written out without the package's helpers: embed, add positions, keep the context, blocks, norm."""
    x = encoder.patch_embed(images) + encoder.pos_embed
    x = torch.stack([x[b, context[b]] for b in range(len(x))])
    return encoder.norm(encoder.blocks(x))


def plain_predictions(predictor, z, context, block, level=0):
    """One target block at a time, I-JEPA style: [context tokens, mask tokens] -> head."""
    x = predictor.embed(z) + predictor.pos_embed[context]
    queries = predictor.mask_token + predictor.pos_embed[block]
    y = predictor.blocks(torch.cat([x, queries], dim=1))
    return predictor.heads[level](predictor.norm(y[:, context.shape[1]:]))


@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
def test_ijepa_levels_give_the_ijepa_loss(loss):
    model = make_model(IJEPA, loss=loss)
    images, context, targets = make_batch()
    out = model(images, context, targets)

    with torch.no_grad():
        h = model.target_encoder.forward_features(images)  # final norm output
        h = F.layer_norm(h, (h.shape[-1],))
    z = plain_context_encoder(model.encoder, images, context)
    loss_fn = F.smooth_l1_loss if loss == "smooth_l1" else F.mse_loss
    per_block = []
    for t in range(targets.shape[1]):
        block = targets[:, t]
        target = torch.stack([h[b, block[b]] for b in range(len(h))])
        per_block.append(loss_fn(plain_predictions(model.predictor, z, context, block), target))
    reference = torch.stack(per_block).mean()
    torch.testing.assert_close(out["loss"], reference)
    torch.testing.assert_close(out["loss/level0"], reference.detach())
    assert not out["loss/level0"].requires_grad


def test_three_levels_pool_targets_and_predictions_over_grid_cells():
    model = make_model(THREE)
    images, context, targets = make_batch(seed=3)
    out = model(images, context, targets)

    grid = IMG // PATCH
    with torch.no_grad():  # the target encoder's features by hand, per requested depth
        x = model.target_encoder.patch_embed(images) + model.target_encoder.pos_embed
        per_depth = {}
        for i, block in enumerate(model.target_encoder.blocks, start=1):
            x = block(x)
            per_depth[i] = F.layer_norm(x, (WIDTH,))
        per_depth["last"] = F.layer_norm(model.target_encoder.norm(x), (WIDTH,))
    z = plain_context_encoder(model.encoder, images, context)

    total = 0.0
    for k, level in enumerate(THREE):
        h, s = per_depth[level["depth"]], level["stride"]
        block_losses = []
        for t in range(targets.shape[1]):
            pred = plain_predictions(model.predictor, z, context, targets[:, t], level=k)
            for b in range(len(images)):
                cells = {}  # (cell row, cell col) -> positions in the block
                for j, patch in enumerate(targets[b, t].tolist()):
                    cells.setdefault((patch // grid // s, patch % grid // s), []).append(j)
                cell_losses = []
                for members in cells.values():
                    pooled_target = h[b, targets[b, t, members]].mean(0)
                    pooled_pred = pred[b, members].mean(0)
                    cell_losses.append(F.smooth_l1_loss(pooled_pred, pooled_target))
                block_losses.append(torch.stack(cell_losses).mean())
        level_loss = torch.stack(block_losses).mean()
        torch.testing.assert_close(out[f"loss/level{k}"], level_loss.detach())
        total = total + level["weight"] * level_loss
    torch.testing.assert_close(out["loss"], total)


def test_pooled_target_is_the_mean_over_each_cell():
    from hjepa.models.hjepa import cell_slots, pool_cells

    grid, s = 8, 4
    targets = torch.tensor([[[9, 10, 11, 12, 17, 18, 19, 20]]])  # rows 1-2, cols 1-4: cells (0,0), (0,1)
    features = torch.randn(1, 1, 8, 5)
    slot, counts = cell_slots(targets, grid, s)
    pooled = pool_cells(features, slot, counts)
    assert counts[0, 0].tolist() == [6, 2, 0, 0, 0, 0, 0, 0]
    left = [0, 1, 2, 4, 5, 6]  # block positions of patches in columns 1-3
    torch.testing.assert_close(pooled[0, 0, 0], features[0, 0, left].mean(0))
    torch.testing.assert_close(pooled[0, 0, 1], features[0, 0, [3, 7]].mean(0))
    assert pooled[0, 0, 2:].abs().sum() == 0


def test_loss_is_float32_under_autocast():
    model = make_model(THREE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*make_batch())
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_ema_moves_target_by_the_momentum_formula():
    model = make_model()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    online = [p.clone() for p in model.encoder.parameters()]
    model.update_target(0.9)
    for old, new, o in zip(before, model.target_encoder.parameters(), online):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * o, rtol=1e-6, atol=1e-6)
    snapshot = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.target_encoder.parameters()))
    model.update_target(0.0)
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.parameters(), model.target_encoder.parameters()))


def test_exported_encoder_loads_strictly_into_timm():
    model = make_model()
    images = torch.randn(2, 3, IMG, IMG)
    fresh = timm.create_model(ARCH, pretrained=False, **timm_kwargs(IMG, PATCH, 0.0))
    fresh.load_state_dict(model.encoder.state_dict(), strict=True)
    tokens = model.encoder.eval().forward_features(images)
    torch.testing.assert_close(fresh.eval().forward_features(images), tokens)
    # The final norm is on the tokens (fc_norm=False), so timm's pooled output is I-JEPA's
    # probe feature: the average of the normed tokens.
    assert isinstance(model.encoder.norm, torch.nn.LayerNorm)
    torch.testing.assert_close(fresh(images), tokens.mean(1))
    assert model.features(images).shape == (2, model.num_patches, WIDTH)
    assert model.grid_size == (8, 8) and model.num_patches == 64


def test_attention_runs_through_sdpa():
    model = make_model()
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(flags) == 2 * DEPTH + 2 and all(flags)  # encoder, target encoder, predictor blocks


@pytest.mark.parametrize(
    "levels",
    [
        [],
        [{"depth": "last", "stride": 1}],
        [{"depth": "last", "stride": 1, "weight": 1.0, "extra": 1}],
        [{"depth": 0, "stride": 1, "weight": 1.0}],
        [{"depth": DEPTH + 1, "stride": 1, "weight": 1.0}],
        [{"depth": "first", "stride": 1, "weight": 1.0}],
        [{"depth": "last", "stride": 0, "weight": 1.0}],
        [{"depth": "last", "stride": 9, "weight": 1.0}],  # the grid is 8x8
        [{"depth": "last", "stride": 1, "weight": -1.0}],
        [{"depth": "last", "stride": 1, "weight": 0.0}, {"depth": 1, "stride": 2, "weight": 0}],
    ],
)
def test_invalid_levels_raise_config_error(levels):
    with pytest.raises(ConfigError, match="model.levels"):
        make_model(levels)


@pytest.mark.parametrize(
    "kwargs",
    [{"arch": "no_such_vit"}, {"img_size": 30}, {"predictor_dim": 30, "predictor_heads": 4}, {"loss": "l1"}],
)
def test_invalid_model_arguments_raise_config_error(kwargs):
    args = dict(arch=ARCH, img_size=IMG, patch_size=PATCH, levels=IJEPA, predictor_dim=32, predictor_depth=1, predictor_heads=2)
    with pytest.raises(ConfigError):
        HJEPA(**{**args, **kwargs})


@pytest.mark.parametrize("name", ["hjepa_vit_tiny", "hjepa_vit_small", "hjepa_vit_base", "ijepa_vit_small"])
def test_model_configs_compose_and_build(name, compose_config):
    """conf/model/*.yaml through Hydra's compose and instantiate (DictConfig arguments)."""
    from hjepa.config import build

    cfg = compose_config(f"model={name}", "image_size=32", "patch_size=4")
    model = build(cfg.model)
    assert isinstance(model, HJEPA) and model.grid_size == (8, 8)
    assert len(model.predictor.heads) == len(cfg.model.levels)
    if name == "ijepa_vit_small":
        assert [(lv.depth, lv.stride, lv.weight) for lv in model.levels] == [("last", 1, 1.0)]


# ---- the batched path against a straightforward implementation ----------------------------

SLOW_LEVELS = [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": 2, "stride": 2, "weight": 0.5},
               {"depth": "last", "stride": 4, "weight": 0.25}]


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
    model = HJEPA("test_vit", 32, 4, SLOW_LEVELS, 32, 2, 2).double()
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
