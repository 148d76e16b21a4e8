"""Preemption: SIGTERM, which TPU maintenance events, GKE and SLURM send before they kill
a job, asks for a checkpoint at the next step boundary and a clean exit with
EXIT_PREEMPTED, so the launcher can requeue and the rerun resumes there. SIGUSR1 asks
for a checkpoint at the next step boundary and training goes on.

Hosts get the signal at slightly different moments; they agree on the step to stop at
by an all-gather of the flags every AGREE_EVERY steps (multi-process runs only), so
every process saves the same step.
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
AGREE_EVERY = 10  # steps between the processes' agreement on a signal


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): saved a checkpoint at step {step}; run the same command to resume")
        self.step = step


class PreemptionWatch:
    """Signal handlers for the duration of a run (a context manager): SIGTERM asks to save
    and stop, SIGUSR1 to save and go on (a checkpoint on demand)."""

    def __init__(self):
        self.stop_requested = self.save_requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGTERM:
            self.stop_requested = True
        else:
            self.save_requested = True

    def poll(self, step: int) -> tuple[bool, bool]:
        """(save now, then stop), agreed by every process: a request on any process
        counts for all, so they save the same step. Across processes the agreement is a
        collective that waits for the devices, so it runs every AGREE_EVERY steps only
        (well inside the tens of seconds schedulers give between SIGTERM and kill)."""
        if jax.process_count() == 1:
            flags = (self.save_requested or self.stop_requested, self.stop_requested)
        elif step % AGREE_EVERY == 0:
            local = np.asarray([self.save_requested or self.stop_requested, self.stop_requested], np.int32)
            flags = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).max(axis=0)
        else:
            return False, False
        self.save_requested = False
        return bool(flags[0]), bool(flags[1])
