"""The Slurm launcher of conf/hydra/launcher/slurm.yaml: hydra-submitit-launcher's, except that
jobs Slurm refuses to take (sbatch fails: a GPU asked of a CPU-only partition, an unknown
partition or account) end the command with one line saying what sbatch said and what to
change, instead of a traceback. (Hydra takes launchers only from the hydra_plugins namespace
package, hence this folder beside hjepa/.)"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher

# What to change, by what sbatch says (matched case-insensitively).
HINTS = {
    "invalid generic resource": "the partition has no GPUs: add hydra.launcher.gpus_per_node=null "
                                "hydra.launcher.tasks_per_node=1 hardware=cpu",
    "invalid partition": "choose one with hydra.launcher.partition=<name> (sinfo lists them)",
    "invalid account": "set hydra.launcher.account=<account> (sacctmgr show assoc user=$USER lists yours)",
    "invalid qos": "set hydra.launcher.qos=<qos> or null",
    "time limit": "lower hydra.launcher.timeout_min",
}


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        try:
            return super().launch(job_overrides, initial_job_idx)
        except Exception as e:  # submission failures only; a job's own failure is Hydra's to report
            refused = sbatch_error(e)
            if refused is None:
                raise
            hint = next((h for key, h in HINTS.items() if key in refused.lower()), None)
            print(f"error: Slurm refused the jobs: {refused}" + (f"; {hint}" if hint else ""), file=sys.stderr)
            sys.exit(1)


def sbatch_error(e: BaseException) -> Optional[str]:
    """What sbatch said when it refused a submission, from submitit's exception; else None."""
    for line in str(e).splitlines():
        if "sbatch: error:" in line:
            return line.split("sbatch: error:", 1)[1].strip()
    return None
