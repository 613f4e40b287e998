"""Preemption, time limits, SIGTERM and Ctrl-C: stop at a step boundary with a checkpoint.

SLURM warns a job with SIGUSR2 (submitit asks for `--signal=USR2@<signal_delay_s>`; it
also arrives from `scancel --signal=USR2` and from preemption with
preempt_send_user_signal). submitit's own handler checkpoints and requeues at once, which
would lose the steps since the last checkpoint. While training, `StopSignals` takes the
signal instead and only asks the Trainer to stop: the loop writes last.pt at the next step
boundary (under DDP at the next trainer.log_every step, where the ranks agree) and returns
"interrupted". `pass_on()` then runs the handler it displaced: under hydra-submitit-launcher
that resubmits the same job (same config and run directory) with `scontrol requeue` and
exits, and the requeued job resumes from last.pt (trainer.resume=auto). Outside submitit the
run just ends as "interrupted".

SIGTERM (`kill`, `scancel`, a container stopping) and the first Ctrl-C (SIGINT) are handled
the same way, without the requeue: the run saves, records "interrupted" and exits with
128 + the signal number; running the same command resumes it. A second Ctrl-C stops at once.
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


class StopSignals:
    """`with StopSignals(trainer.request_stop) as s: trainer.fit(...)`, then `s.pass_on()`
    once the interrupted run's outputs are written; `s.name` is the signal that came."""

    def __init__(self, request_stop: Callable[[], None]):
        self.request_stop = request_stop
        self.preemption = preemption_signal()
        self.signals = list(dict.fromkeys([self.preemption, signal.SIGTERM, signal.SIGINT]))
        self.previous: dict[signal.Signals, object] = {}
        self.received: Optional[tuple[int, Optional[FrameType]]] = None

    def __enter__(self) -> "StopSignals":
        # Python runs signal handlers in the main thread only (and refuses to set them elsewhere).
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():  # kept in self.previous for pass_on
            signal.signal(s, handler)

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.received[0]).name if self.received else None

    @property
    def exit_code(self) -> Optional[int]:
        """128 + the signal for SIGTERM and SIGINT (the shell's convention), else None."""
        if self.received and self.received[0] != self.preemption:
            return 128 + self.received[0]
        return None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self.received and self.received[0] == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        hint = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step boundary{hint}",
              flush=True)
        self.received = (signum, frame)
        self.request_stop()

    def pass_on(self) -> None:
        """Run the displaced handler of the preemption signal (submitit: checkpoint, requeue,
        exit) if that is the signal that came."""
        if self.received is not None and self.received[0] == self.preemption:
            previous = self.previous.get(self.preemption)
            if callable(previous):
                previous(*self.received)
