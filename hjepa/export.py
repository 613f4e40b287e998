"""`python -m hjepa.export run=<run dir> [ckpt=<file>] [out=<file.pt>]`

Writes the run's target encoder (the EMA encoder that every evaluation scores) as a plain
timm backbone state_dict, `<run dir>/backbone.pt` by default, and beside it
`backbone.json` with the exact `timm.create_model` call. It loads without this package:

    import json, timm, torch
    meta = json.load(open("backbone.json"))
    model = timm.create_model(meta["arch"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(torch.load("backbone.pt", weights_only=True), strict=True)
    model.eval()

For `model=hjepa_vit_small` on ImageNet-100 (224 px, patch 16) that is

    timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=224,
                      patch_size=16, class_token=False, global_pool="avg", fc_norm=False,
                      drop_path_rate=0.0)

Inputs are RGB float images normalised with the ImageNet mean and std (in `backbone.json`)
at `img_size`; `model.forward_features(x)` gives the normed tokens [B, N, D] and `model(x)`
their average [B, D], the features the kNN and linear probes use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from hjepa import CONF_DIR
from hjepa.atomic import atomic_write
from hjepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hjepa.errors import ConfigError, HJEPAError
from hjepa.models.vit import timm_kwargs
from hjepa.runs import load_run


def export(run: str | Path, ckpt: Optional[str] = None, out: Optional[str] = None) -> dict[str, Any]:
    run_cfg, model, ckpt_path, step = load_run(run, ckpt)
    m = run_cfg.model
    kwargs = timm_kwargs(m.img_size, m.patch_size, m.drop_path_rate)
    out_path = Path(out).expanduser() if out else Path(run).expanduser() / "backbone.pt"
    state = {k: v.detach().clone().contiguous() for k, v in model.target_encoder.state_dict().items()}
    atomic_write(out_path, lambda f: torch.save(state, f))  # a plain state_dict: what timm loads
    call = ", ".join([repr(m.arch), "pretrained=False", *(f"{k}={v!r}" for k, v in kwargs.items())])
    meta = {
        "arch": m.arch,
        "kwargs": kwargs,
        "call": f"timm.create_model({call})",
        "state_dict": out_path.name,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "source": {"run": str(run), "checkpoint": str(ckpt_path), "step": step, "weights": "target_encoder"},
    }
    atomic_write(out_path.with_suffix(".json"), json.dumps(meta, indent=2))
    print(f"backbone: {out_path}\nload it:  model = {meta['call']}\n"
          f"          model.load_state_dict(torch.load({str(out_path)!r}, weights_only=True), strict=True)")
    return meta


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        if OmegaConf.is_missing(cfg, "run"):
            raise ConfigError("run=<run dir> is required: the folder python -m hjepa.train wrote")
        export(cfg.run, cfg.ckpt, cfg.out)
    except HJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
