"""`python -m hjepa.bench {step,memory,masks,data,loader,e2e,pack}`: throughput of the training step, the
data pipeline and the mask collator, each next to its baseline measured the same way.

    python -m hjepa.bench step                      # ViT-S/16 and ViT-B/16, I-JEPA and model levels, eager and compiled
    python -m hjepa.bench step --models hjepa_vit_small --levels ijepa --compile off --json
    python -m hjepa.bench step --arch test_vit --img 32 --patch 4 --batch 8 --precision fp32 --steps 3   # CPU logic check
    python -m hjepa.bench memory --models hjepa_vit_small --batch 64   # peak memory with and without grad checkpointing
    python -m hjepa.bench data --images ../shared/data/imagenet-samples --n 200
    python -m hjepa.bench masks
    python -m hjepa.bench loader --images pack.tar --workers 15    # input pipeline: JPEGs decoded on CPU / GPU, prepared
    python -m hjepa.bench e2e --images pack.tar --copies 10 --workers 15      # real Trainer on JPEG folders

Every command prints a table; ``--json`` prints one JSON object per row instead (keys: what,
config, value, unit, baseline, baseline_of, ratio, device, torch, and row-specific extras),
and ``--out FILE`` appends the same JSON lines to FILE. Nothing here needs Hydra: the model
is built from conf/model/<name>.yaml with a plain constructor call (the same arguments the
Hydra config passes), so the GPU machine, which has torch and timm only, runs it as is.

`step` times exactly the Trainer's step (hjepa.engine.step: normalise, target forward +
context encoder + predictor + loss under autocast, backward, fused AdamW, foreach EMA) on
uint8 images already on the device, with fresh I-JEPA masks from the project's collator,
warm-up then the median of timed steps (CUDA events on a GPU). FLOPs are counted with
torch.utils.flop_counter on the same steps: "matmul" FLOPs are those of the linear layers
and the patch embedding (forward + backward; the definition of ../shared/PEER_BENCHMARKS.md),
attention score FLOPs are reported apart. The card's bf16 matmul rate is measured in the
same process (8192^3 product).
"""
