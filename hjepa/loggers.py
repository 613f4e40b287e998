"""Metric sinks: a JSONL file (always), a tqdm progress bar, and optionally TensorBoard and
Weights & Biases, in any combination (logger=tensorboard logger.wandb=true: all three).

Only the process of rank 0 creates a Logger that writes; other ranks get `enabled=False`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from PIL import Image

from hjepa.atomic import atomic_write

class Logger:
    """Every metric goes to <run dir>/metrics.jsonl. `tensorboard: true` also writes them, and
    the mask picture, as TensorBoard events into the run directory (`tensorboard --logdir
    outputs` then shows every run and sweep job). `wandb: true` mirrors the metrics, the
    resolved config and the mask picture to W&B.

    `mode: auto` runs W&B online when an API key is configured (WANDB_API_KEY or a
    `wandb login`) and offline otherwise, so a machine without an account or network never
    prompts; WANDB_MODE in the environment wins over both.
    """

    def __init__(
        self,
        wandb: bool = False,
        tensorboard: bool = False,
        project: str = "hjepa",
        entity: Optional[str] = None,
        mode: Literal["auto", "online", "offline"] = "auto",
        tags: list[str] = (),
        progress: bool = True,
    ):
        self.use_wandb, self.use_tensorboard, self.project, self.entity = wandb, tensorboard, project, entity
        self.mode, self.tags, self.show_progress = mode, list(tags), progress
        self.enabled = False
        self._bar = None
        self._wandb_run = None
        self._tensorboard = None
        self._file = None

    def start(self, run_dir: Path, config: dict, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        torn = _truncate_after(self.metrics_path, start_step)
        if torn:
            print(f"repaired {self.metrics_path}: dropped {torn} torn line(s)", flush=True)
        self._file = open(self.metrics_path, "a", buffering=1)
        if self.show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
        if self.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events logged after its checkpoint, as metrics.jsonl does.
            self._tensorboard = SummaryWriter(str(self.run_dir), purge_step=start_step + 1 if start_step else None)
        if self.use_wandb:
            self._wandb_run = _start_wandb(self, config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def progress(self, step: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def image(self, name: str, picture: np.ndarray, step: int = 0) -> Path | None:
        """Save an HxWx3 uint8 picture as <run_dir>/<name>.png (and to TensorBoard and W&B)."""
        if not self.enabled:
            return None
        path = self.run_dir / f"{name}.png"
        Image.fromarray(picture).save(path)
        if self._tensorboard is not None:
            self._tensorboard.add_image(name, picture, step, dataformats="HWC")
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({name: wandb.Image(picture)}, commit=False)
        return path

    def write(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """Close every sink; also on the way out of a failure (a full disk fails the flush of
        the metrics file again: that second error must not hide the first)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _truncate_after(path: Path, step: int) -> int:
    """On resume, drop the records logged after the checkpoint we resume from (they are
    redone), and any line that is not a whole record (torn by a kill or a full disk).
    Returns how many torn lines were dropped."""
    if not path.exists():
        return 0
    keep, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            torn += bool(line.strip())
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    atomic_write(path, "".join(line + "\n" for line in keep))
    return torn


def _start_wandb(logger: Logger, config: dict) -> Any:
    import wandb

    mode = os.environ.get("WANDB_MODE") or logger.mode
    if mode == "auto":
        mode = "online" if _wandb_has_key() else "offline"
    kwargs = dict(project=logger.project, entity=logger.entity, tags=logger.tags, config=config,
                  dir=str(logger.run_dir), name=logger.run_dir.name, resume="allow",
                  id=_wandb_run_id(logger.run_dir))
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, silent=True), **kwargs)
    except Exception as e:  # no network, server down: keep training, log locally
        logger.write(f"wandb online init failed ({type(e).__name__}: {e}); logging offline instead")
        mode = "offline"
        run = wandb.init(mode=mode, settings=wandb.Settings(silent=True), **kwargs)
    if mode == "offline":
        where = Path(run.dir).parent  # <run dir>/wandb/offline-run-<time>-<id>
        logger.write(f"W&B is logging offline to {where}; upload it later with: wandb sync {where}")
    return run


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _wandb_run_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
