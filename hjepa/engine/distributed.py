"""torch.distributed setup from the environment: torchrun, or the tasks of a submitit job
(SLURM or local) or of a plain `srun`.

Nothing is hard-coded: torchrun hands every process RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; for scheduler tasks `export_task_env` derives the same
variables from the job (rank and world from the task, the master from the first host of
the job, the port from the job id, so every task computes the same one).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def export_task_env() -> None:
    """Export torchrun's variables for the tasks of a submitit job or an `srun` step.

    Call it before choosing the device: Hardware picks cuda:LOCAL_RANK. A no-op under
    torchrun (RANK is set) and for a single task. SLURM_NTASKS alone is not enough: the
    batch script of a multi-task job sees it too but is one process, so a plain Slurm step
    is recognised by SLURM_STEP_NUM_TASKS, which only `srun` sets.
    """
    if "RANK" in os.environ:
        return
    if os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment

        job = JobEnvironment()  # the slurm or local one, whichever runs this job
    elif int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        from submitit.slurm.slurm import SlurmJobEnvironment

        job = SlurmJobEnvironment()
    else:
        return
    if job.num_tasks <= 1:
        return
    os.environ.update(
        RANK=str(job.global_rank),
        WORLD_SIZE=str(job.num_tasks),
        LOCAL_RANK=str(job.local_rank),
        LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes),
        MASTER_ADDR=job.hostnames[0],
        # The same rule as submitit's TorchDistributedEnvironment: a port from the job id.
        MASTER_PORT=os.environ.get("MASTER_PORT") or str(random.Random(job.job_id).randint(20000, 60000)),
    )


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group the environment describes; a no-op for one process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    export_task_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", init_method="env://")
    return info


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= info.world_size
    return tensor


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (a collective: all ranks call it)."""
    if not info.enabled:
        return flag
    return all_reduce_sum(torch.tensor(int(flag), device=device), info).item() > 0


def broadcast(value: Any, info: DistInfo) -> Any:
    """Rank 0's `value` (any picklable object), on every rank."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
