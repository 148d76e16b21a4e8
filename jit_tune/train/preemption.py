"""Preemption: SIGTERM, which TPU maintenance events, GKE and SLURM send before they kill
a job, asks for a checkpoint at the next step boundary and a clean exit with
EXIT_PREEMPTED, so the launcher can requeue and the rerun resumes there.

Hosts get the signal at slightly different moments; they agree on the step to stop at
by an all-gather of the flag at every step boundary (multi-process runs only), so every
process saves the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again". Distinct from a crash
# (1), a user error (2) and a diverged run (3), so requeue policies can match it.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): saved a checkpoint at step {step}; run the same command to resume")
        self.step = step


class PreemptionWatch:
    """Installs a SIGTERM handler for the duration of a run (a context manager)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        """True on every process once any process has received SIGTERM."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())
