"""H-JEPA from Python, without Hydra: datasets, a mixture, the mask collator, the model and
training steps, built with the same plain constructors the configs name in `_target_`.

    python experiments/python_api.py                                  # two synthetic datasets, CPU, seconds
    python experiments/python_api.py --imagenet /data/imagenet        # + ImageNet-100 from an ImageNet folder
    python experiments/python_api.py --steps 20 --device cuda

It prints the loss of each step. The Trainer (hjepa.engine.trainer.Trainer.fit) runs the
same step in a loop with checkpoints, logging and resume; `python -m hjepa.train` composes
all of this from conf/.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from hjepa.data.imagenet import ImageNet
from hjepa.data.mixture import Mixture, MixtureSampler
from hjepa.data.synthetic import SyntheticShapes
from hjepa.data.transforms import normalize, train_transform
from hjepa.engine.device import Hardware
from hjepa.engine.optim import Optimization
from hjepa.engine.step import forward_backward, optimizer_update
from hjepa.masks import MultiBlockMaskCollator
from hjepa.models.hjepa import HJEPA


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imagenet", default=None, help="an ImageNet folder <root>/{train,val}/<wnid>/*.JPEG")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "auto"])
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    image_size, patch_size = 32, 4

    # 1. Datasets: any of hjepa.data (they return (uint8 image [3, H, W], label)).
    transform = train_transform(image_size, scale=[0.3, 1.0], ratio=[0.75, 1.333], hflip=0.5, color_jitter=0.1)
    datasets = {
        "shapes_a": SyntheticShapes("train", transform, image_size=image_size, num_train=512, seed=0),
        "shapes_b": SyntheticShapes("train", transform, image_size=image_size, num_train=512, seed=1),
    }
    if a.imagenet:  # the 100 CMC classes, read in place from a full ImageNet (or an ImageNet-100) folder
        datasets["imagenet100"] = ImageNet(a.imagenet, "train", transform, subset="imagenet100")

    # 2. A mixture: weights are proportional; every draw picks a component by weight.
    weights = {"shapes_a": 0.5, "shapes_b": 0.25, "imagenet100": 0.25}
    mixture = Mixture(datasets, {n: weights[n] for n in datasets}, strategy="weighted", seed=0)
    for name, s in mixture.stats().items():
        print(f"{name}: {s['size']} images, weight {s['weight']:.2f}")

    # 3. The model (timm's test_vit encoder here; e.g. arch="vit_small_patch16_224" with
    # img_size=224, patch_size=16 for ViT-S/16) with three levels, and the mask collator on its grid.
    levels = [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": "last", "stride": 2, "weight": 0.5},
              {"depth": 3, "stride": 4, "weight": 0.25}]
    model = HJEPA("test_vit", image_size, patch_size, levels, predictor_dim=64, predictor_depth=2,
                  predictor_heads=2, grad_checkpointing=a.grad_checkpointing)
    collator = MultiBlockMaskCollator(model.grid_size, min_keep=4)

    # 4. Device, optimizer and schedules, the data loader (the collator returns a hjepa.data.batch.Batch).
    hardware = Hardware(device=a.device, batch_size=a.batch, num_workers=0)
    model.to(hardware.device).train()
    optimization = Optimization()
    optimizer = optimization.build(model)
    scaler = hardware.grad_scaler()
    loader = DataLoader(mixture, batch_size=a.batch, sampler=MixtureSampler(mixture, seed=0), collate_fn=collator,
                        drop_last=True)

    # 5. Training steps: exactly the Trainer's (hjepa.engine.step).
    losses = []
    for step, batch in zip(range(a.steps), loader):
        batch = mixture.to_device(batch, hardware.device)
        optimization.apply(optimizer, step, a.steps)
        out = forward_backward(model, normalize(batch.images), batch.context, batch.targets,
                               hardware.autocast(), scaler)
        optimizer_update(model, optimizer, scaler, clip_grad=None, momentum=optimization.momentum_at(step, a.steps))
        losses.append(out["loss"].item())
        levels_txt = "  ".join(f"{k}={float(v):.4f}" for k, v in out.items() if k != "loss")
        print(f"step {step}: loss {losses[-1]:.4f}  ({levels_txt}); images from "
              f"{dict(zip(datasets, torch.bincount(batch.sources, minlength=len(datasets)).tolist()))}")

    # Features for downstream use: the target encoder's tokens, average-pooled.
    features = model.features(normalize(batch.images)).mean(1)
    print(f"features: {tuple(features.shape)}")
    return losses


if __name__ == "__main__":
    main()
