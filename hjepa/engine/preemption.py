"""Preemption and time-limit warnings: stop at a step boundary, then let submitit requeue.

SLURM warns a job with SIGUSR2 (submitit asks for `--signal=USR2@<signal_delay_s>`; it
also arrives from `scancel --signal=USR2` and from preemption with
preempt_send_user_signal). submitit's own handler checkpoints and requeues at once, which
would lose the steps since the last checkpoint. While training, `PreemptionSignal` takes
the signal instead and only asks the Trainer to stop: the loop writes last.pt at the next
step boundary (under DDP at the next trainer.log_every step, where the ranks agree) and
returns "interrupted". `pass_on()` then runs the handler it displaced:
under hydra-submitit-launcher that resubmits the same job (same config and run directory)
with `scontrol requeue` and exits, and the requeued job resumes from last.pt
(trainer.resume=auto). Outside submitit the run just ends as "interrupted".
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Callable, Optional


def preemption_signal() -> signal.Signals:
    # The variable submitit reads to choose its signal (USR2 unless told otherwise).
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


class PreemptionSignal:
    """`with PreemptionSignal(trainer.request_stop) as p: trainer.fit(...)`, then
    `p.pass_on()` once the interrupted run's outputs are written."""

    def __init__(self, request_stop: Callable[[], None]):
        self.request_stop = request_stop
        self.signum = preemption_signal()
        self.installed = False
        self.previous = None
        self.received: Optional[tuple[int, Optional[FrameType]]] = None

    def __enter__(self) -> "PreemptionSignal":
        # Python runs signal handlers in the main thread only (and refuses to set them elsewhere).
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(self.signum, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(self.signum, self.previous)
            self.installed = False

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step boundary", flush=True)
        self.received = (signum, frame)
        self.request_stop()

    def pass_on(self) -> None:
        """Run the displaced handler (submitit: checkpoint, requeue, exit) if the signal came."""
        if self.received is not None and callable(self.previous):
            self.previous(*self.received)
