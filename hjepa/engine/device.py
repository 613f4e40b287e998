"""Device, precision and data-loading settings (the `hardware` config group)."""

from __future__ import annotations

import contextlib
import os
from typing import Literal, Optional

import torch

from hjepa.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


class Hardware:
    """Where and how one process trains.

    `batch_size` is per device (per process); the global batch is batch_size x world size
    x trainer.grad_accum. `precision: auto` is bf16 on GPUs that support it, fp16 with a
    GradScaler on other CUDA GPUs and on Apple MPS, fp32 on CPUs.
    """

    def __init__(
        self,
        device: Literal["auto", "cpu", "cuda", "mps"] = "auto",
        precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto",
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 4,
        compile: bool = False,
        threads: Optional[int] = None,
    ):
        if batch_size <= 0 or num_workers < 0 or prefetch_factor <= 0 or (threads is not None and threads <= 0):
            raise ConfigError("hardware: batch_size, prefetch_factor and threads must be > 0, num_workers >= 0")
        self.requested = device
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.prefetch_factor, self.compile = prefetch_factor, compile
        # Intra-op threads of the training process. A thread team that shares its cores with
        # loader workers (or anything else) stalls at every barrier: on 2 busy cores a small
        # ViT step took 4.2 s with 2 threads and 0.24 s with 1. So by default leave a core
        # per loader worker (and split the cores between the processes of one node).
        per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.threads = threads or max(1, per_process - num_workers)
        self.device = self._resolve_device(device)
        self.precision = self._resolve_precision(precision)

    @staticmethod
    def _resolve_device(name: str) -> torch.device:
        if name == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            return torch.device("mps") if mps_available() else torch.device("cpu")
        if name == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    "hardware.device=cuda but no CUDA GPU is visible to PyTorch "
                    f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                    "use hardware=cpu, hardware=m1_max or hardware=auto"
                )
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if name == "mps":
            if not mps_available():
                raise ConfigError(
                    "hardware.device=mps but Apple's MPS backend is not available here "
                    "(needs an Apple-silicon Mac and a macOS build of PyTorch); use hardware=auto"
                )
            return torch.device("mps")
        return torch.device("cpu")

    def _resolve_precision(self, precision: str) -> str:
        kind = self.device.type
        if precision == "auto":
            if kind == "cuda":
                return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return "fp16" if kind == "mps" else "fp32"
        if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("hardware.precision=bf16 but this GPU has no bf16 support; use fp16 or auto")
        if precision == "fp16" and kind == "cpu":
            raise ConfigError("hardware.precision=fp16 is not supported on the CPU; use bf16 or fp32")
        return precision

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def loader_kwargs(self) -> dict:
        workers = self.num_workers
        kw = {"num_workers": workers, "pin_memory": self.pin_memory and self.device.type == "cuda"}
        if workers > 0:
            kw.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        return kw

    def describe(self) -> str:
        name = self.device.type
        if name == "cuda":
            name = f"cuda:{self.device.index} ({torch.cuda.get_device_name(self.device)})"
        return (f"{name}, {self.precision}, batch {self.batch_size}/device, {self.num_workers} workers, "
                f"{self.threads} threads")
