"""The encoder: a plain timm VisionTransformer, plus the two ways H-JEPA runs it.

The encoder stays a stock ``timm.create_model(...)`` module (no CLS token, average pooling,
fixed 2-D sin-cos position embeddings stored in timm's own ``pos_embed`` parameter), so
``encoder.state_dict()`` is a backbone checkpoint that loads strictly into the same
``timm.create_model(...)`` call. H-JEPA only needs two extra forward paths, written here
as functions over that module and following the order of timm's ``forward_features``:

* ``encode_context``: patch-embed the image, add positions, then keep ONLY the context
  tokens before the blocks. Dropped tokens cost no compute and cannot leak into the output
  (no zeroing, no attention mask).
* ``encode_targets``: the full image through the blocks up to the deepest depth asked for,
  returning each requested block's output under a parameter-free LayerNorm.
"""

from __future__ import annotations

import math
from typing import Union

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from hjepa.errors import ConfigError

# A target depth: a block number 1..depth (that block's raw output), or "last" (the
# encoder's final norm output, which is what I-JEPA regresses).
Depth = Union[int, str]


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embeddings [H*W, dim], rows in row-major patch order.

    As in I-JEPA / MAE: the first half of the channels encodes the column, the second half
    the row, each as [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (dim / 4)).
    """
    if dim % 4:
        raise ConfigError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
    h, w = grid_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


# model.init: how the encoder and the predictor start.
#   rescaled:  timm's init (every Linear trunc-normal std 0.02, zero bias), then each block's
#              residual output projections (attn.proj, mlp.fc2) divided by sqrt(2 * layer);
#              the patch embedding keeps PyTorch's Conv2d default (kaiming-uniform, a=sqrt(5):
#              std 1/sqrt(3 * fan_in), 0.083 at patch 4, 0.014 at patch 16).
#   reference: what facebookresearch/ijepa trains from. Its model classes rescale the residual
#              projections too, but its helper then re-initialises every Linear layer
#              (trunc-normal std 0.02, zero bias) after building, which cancels the rescale;
#              its patch embedding is a Conv2d initialised trunc-normal std 0.02, zero bias.
INITS = ("rescaled", "reference")
INIT_STD = 0.02


def check_init(init: str) -> str:
    if init not in INITS:
        raise ConfigError(f"model.init: expected one of {', '.join(INITS)}, got {init!r}")
    return init


def rescale_residual_init(blocks: nn.Sequential) -> None:
    """Divide each block's residual output projections by sqrt(2 * layer) (I-JEPA's model classes)."""
    for layer, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))


@torch.no_grad()
def reinit_linear(module: nn.Module, std: float = INIT_STD) -> None:
    """Every Linear layer of `module`: weight trunc-normal(std) (cut at +-2, as timm and the
    reference do), bias zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_weights(module: nn.Module, blocks: nn.Sequential, init: str) -> None:
    """Apply `init` (one of INITS) to a freshly built encoder or predictor (whose Linear
    layers already start trunc-normal std 0.02) with residual blocks `blocks`. LayerNorms
    stay at weight 1, bias 0 in both."""
    if check_init(init) == "rescaled":
        rescale_residual_init(blocks)
    else:
        reinit_linear(module)


def timm_kwargs(img_size: int, patch_size: int, drop_path_rate: float) -> dict:
    """The ``timm.create_model`` arguments of the encoder; an exported backbone loads into
    ``timm.create_model(arch, pretrained=False, **timm_kwargs(...))``.

    ``fc_norm=False`` keeps the final LayerNorm on the tokens (``encoder.norm``) instead of
    moving it after the average pool, which timm does by default for ``global_pool="avg"``:
    I-JEPA's context output and "last" target are the normed tokens, and its probes average
    normed tokens. timm's own I-JEPA checkpoints (``vit_huge_patch14_gap_224``) are built the
    same way (no class token, avg pool, fc_norm=False).
    """
    return dict(
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        drop_path_rate=drop_path_rate,
    )


def create_encoder(arch: str, img_size: int, patch_size: int, drop_path_rate: float,
                   init: str = "rescaled") -> VisionTransformer:
    if img_size % patch_size:
        raise ConfigError(f"model.img_size ({img_size}) must be a multiple of model.patch_size ({patch_size})")
    try:
        encoder = timm.create_model(arch, pretrained=False, **timm_kwargs(img_size, patch_size, drop_path_rate))
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ConfigError(f"model.arch: {e}") from None
    if not isinstance(encoder, VisionTransformer) or encoder.pos_embed is None or encoder.num_prefix_tokens:
        raise ConfigError(f"model.arch: '{arch}' is not a plain timm VisionTransformer with absolute position embeddings")
    # Fixed sin-cos positions, kept in timm's parameter (frozen) so the export stays stock timm.
    pos = sincos_pos_embed_2d(encoder.embed_dim, encoder.patch_embed.grid_size)
    encoder.pos_embed.data.copy_(pos.unsqueeze(0))
    encoder.pos_embed.requires_grad_(False)
    init_weights(encoder, encoder.blocks, init)
    if init == "reference":
        with torch.no_grad():
            nn.init.trunc_normal_(encoder.patch_embed.proj.weight, std=INIT_STD)
            if encoder.patch_embed.proj.bias is not None:
                nn.init.zeros_(encoder.patch_embed.proj.bias)
    enable_sdpa(encoder)
    return encoder


def enable_sdpa(module: nn.Module) -> None:
    """Route every timm attention layer through F.scaled_dot_product_attention (timm can be
    told otherwise by TIMM_FUSED_ATTN=0; the manual softmax path is slower and uses more memory)."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, D], index [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def run_blocks(blocks: nn.Sequential, x: Tensor, grad_checkpointing: bool = False) -> Tensor:
    """x through `blocks`; with `grad_checkpointing` (and gradients on), each block's
    activations are recomputed in the backward pass instead of kept: less memory, one more
    forward of the blocks, the same values and gradients (RNG state is replayed)."""
    if not (grad_checkpointing and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return x


def encode_context(encoder: VisionTransformer, images: Tensor, context: Tensor,
                   grad_checkpointing: bool = False) -> Tensor:
    """The encoder on the context tokens only: [B, 3, H, W], [B, K] -> [B, K, D]."""
    x = encoder.patch_embed(images)
    x = encoder._pos_embed(x)  # positions are added before tokens are dropped
    x = gather_tokens(x, context)
    x = encoder.patch_drop(x)
    x = encoder.norm_pre(x)
    x = run_blocks(encoder.blocks, x, grad_checkpointing)
    return encoder.norm(x)


def encode_targets(encoder: VisionTransformer, images: Tensor, depths: list[Depth]) -> dict[Depth, Tensor]:
    """The full image through the blocks; for each requested depth its output, normalised
    by a parameter-free LayerNorm over features: {depth: [B, N, D]}. Only the blocks up to
    the deepest requested depth run."""
    num_blocks = len(encoder.blocks)
    stop = max(num_blocks if d == "last" else d for d in depths)
    x = encoder.patch_embed(images)
    x = encoder._pos_embed(x)
    x = encoder.patch_drop(x)
    x = encoder.norm_pre(x)
    out: dict[Depth, Tensor] = {}
    for i, block in enumerate(encoder.blocks[:stop], start=1):
        x = block(x)
        if i in depths:
            out[i] = F.layer_norm(x, x.shape[-1:])
    if "last" in depths:  # exactly I-JEPA's target: final norm, then layer_norm without affine
        out["last"] = F.layer_norm(encoder.norm(x), x.shape[-1:])
    return out
