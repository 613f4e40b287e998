"""A run directory: the files `python -m hjepa.train` writes, the summary.json schema, and
loading a trained run (and its random-init twin) for evaluate, export and report.

    <run dir>/config.yaml            the resolved config
    <run dir>/summary.json           Summary: status and final numbers (rewritten atomically)
    <run dir>/metrics.jsonl          one record per trainer.log_every steps
    <run dir>/masks.png              the context and target blocks of the first batch
    <run dir>/train.log              what the run printed (every segment of it, appended)
    <run dir>/checkpoints/last.pt    the checkpoint a resume starts from
    <run dir>/eval_<protocol>.json   python -m hjepa.evaluate results; features in eval_cache/
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Optional, TextIO

import torch
from omegaconf import DictConfig, OmegaConf

from hjepa.atomic import atomic_write
from hjepa.config import build
from hjepa.engine import checkpoint as ckpt
from hjepa.errors import CheckpointError, ConfigError

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
MASKS = "masks.png"
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
EVAL_CACHE = "eval_cache"

Status = Literal["running", "completed", "interrupted", "failed"]


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST


def eval_result(run_dir: Path, protocol: str) -> Path:
    return Path(run_dir) / f"eval_{protocol}.json"


@dataclass
class Summary:
    """summary.json. `status` running -> completed | interrupted (resumable) | failed. A
    completed run's results are never overwritten by a rerun that does nothing or fails."""

    status: Status
    started: Optional[float] = None          # time.time() at the start of this process
    steps: Optional[int] = None              # optimizer steps done
    epochs: Optional[int] = None
    global_batch: Optional[int] = None
    checkpoint: Optional[str] = None         # the checkpoint a resume starts from
    wall_time_s: Optional[float] = None      # training time over all segments of a resumed run
    resumed_from_step: Optional[int] = None
    final_loss: Optional[float] = None
    img_per_s: Optional[float] = None
    mixture: Optional[dict[str, Any]] = None  # per component: size, normalised weight, expected draws
    knn_top1: Optional[float] = None
    knn_top5: Optional[float] = None
    random_init_knn_top1: Optional[float] = None
    feature_std: Optional[float] = None
    feature_effective_rank: Optional[float] = None
    collapse_warning: Optional[str] = None
    stopped_by: Optional[str] = None         # the signal that interrupted it: SIGUSR2 (preemption), SIGTERM, SIGINT
    error: Optional[str] = None
    rerun_error: Optional[str] = None        # a later run of the same command failed; these results stand

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Summary":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def write_summary(run_dir: Path, summary: Summary) -> None:
    atomic_write(Path(run_dir) / SUMMARY, json.dumps(summary.to_dict(), indent=2))


def read_summary(run_dir: Path) -> Optional[Summary]:
    """The run's summary, or None when it has none (never started, or unreadable)."""
    path = Path(run_dir) / SUMMARY
    try:
        return Summary.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class _Copy:
    """A text stream that also appends what it is given to a file (progress-bar redraws,
    which end in a carriage return, excepted). If the file cannot be written (a full disk),
    the copy stops and the stream goes on."""

    def __init__(self, stream: TextIO, file: TextIO):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        if self.file is not None and "\r" not in text:
            try:
                self.file.write(text)
                self.file.flush()
            except OSError:
                self.file = None
        return n

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def copy_output(path: Path) -> Iterator[None]:
    """Append what this process prints (stdout and stderr) to `path` while inside."""
    try:
        file = open(path, "a", encoding="utf-8")
    except OSError:
        yield
        return
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Copy(stdout, file), _Copy(stderr, file)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        try:
            file.close()
        except OSError:
            pass


class LoadedRun(NamedTuple):
    config: DictConfig        # the run's resolved config.yaml
    model: torch.nn.Module    # the HJEPA model with the checkpoint's weights, in eval mode
    checkpoint: Path
    step: int


def load_run(run: str | Path, checkpoint: Optional[str | Path] = None) -> LoadedRun:
    """The model of a training run, rebuilt from its config.yaml and loaded from
    checkpoints/last.pt (or `checkpoint`); a checkpoint of another shape is refused."""
    run_dir = Path(run).expanduser()
    config_file = run_dir / CONFIG
    if not config_file.is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {CONFIG}"
        raise ConfigError(f"run={run_dir} {what}: expected a run directory written by python -m hjepa.train "
                          f"({CONFIG}, {CHECKPOINTS}/{LAST})")
    run_cfg = OmegaConf.load(config_file)
    path = Path(checkpoint).expanduser() if checkpoint else last_checkpoint(run_dir)
    if not path.is_file():
        hint = "" if checkpoint else (" (a run saves it at the end of each epoch and every trainer.checkpoint_every "
                                      "steps); pass ckpt=<file> to use another checkpoint")
        raise CheckpointError(f"no checkpoint: {path} does not exist{hint}")
    state = ckpt.load(path)
    model = random_model(run_cfg)
    try:
        ckpt.check_compatible(state["model"], model, str(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n  (the model is rebuilt from {config_file})") from None
    model.load_state_dict(state["model"])
    return LoadedRun(run_cfg, model.eval(), path, int(state["step"]))


def random_model(run_cfg: DictConfig) -> torch.nn.Module:
    """The run's model as initialised at its start (same config, same seed): the baseline
    every evaluation scores beside the trained one."""
    torch.manual_seed(run_cfg.seed)
    return build(run_cfg.model)
