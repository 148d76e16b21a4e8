"""SIGTERM, SIGINT (Ctrl-C) and SIGUSR1, handled in every phase of every command.

The handlers are installed when the process starts (`install`, from the CLI; `train`
installs them too for API users) and act by phase:

  phase        SIGTERM (preemption: TPU maintenance, GKE, SLURM)     SIGUSR1 (save on demand)
  startup      stop now, exit 75: no step was taken since the last    save at the first step
               checkpoint, so there is nothing to save (tokenizer,    boundary
               restore, model creation)
  training     save at the next step boundary, exit 75 (the first    save at the next step
               step's compile included)                               boundary, go on
  eval         (a periodic evaluation) noted, then as in training     as in training
  final_eval   stop now, exit 75: the final checkpoint is already    nothing to save: noted
               saved; rerunning evaluates it                          on stderr, go on
  command      (eval, export, generate, data, compile) stop now,     nothing to save: noted
               exit 75; files are written atomically, so nothing      on stderr, go on
               is left half-written

Ctrl-C in training (and a periodic evaluation) acts as SIGTERM does, with exit 130 (128 +
SIGINT, the shell's code for it); a second Ctrl-C, or one in any other phase, stops at
once with exit 130 (files are written atomically). From the CLI it exits right there, as
SIGTERM does; in a Python session (the API) it raises KeyboardInterrupt, as Python's own
handler does.

Hosts get the signal at slightly different moments; in training they agree on the step
to stop at by an all-gather of the flags every AGREE_EVERY steps (multi-process runs
only), so every process saves the same step; a Ctrl-C that reached one process makes
every process exit 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import numpy as np

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again". Distinct from a crash
# (1), a user error (2) and a diverged run (3), so requeue policies can match it.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT
AGREE_EVERY = 10  # steps between the processes' agreement on a signal
PHASES = ("startup", "training", "eval", "final_eval", "command")
_DEFERRED = ("training", "eval")  # phases where SIGTERM waits for a step boundary


class Preempted(Exception):
    """The run stopped on SIGTERM (or Ctrl-C: `interrupted`) at `step`, with a checkpoint
    there (`saved`: saved now; else there was one, or the run had not begun)."""

    def __init__(self, step: int, saved: bool = True, interrupted: bool = False):
        what = "saved a checkpoint at" if saved else "nothing new to save at"
        why = "interrupted (Ctrl-C)" if interrupted else "preempted (SIGTERM)"
        super().__init__(f"{why}: {what} step {step}; run the same command to resume")
        self.step = step
        self.exit_code = EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED


STOPPED = {"startup": "during start-up, before any new step; nothing was lost",
           "final_eval": "during the final evaluation; the final checkpoint is saved, and running the same command "
                         "evaluates it",
           "command": "before it finished; no file was left half-written"}


class Signals:
    """The process's signal state: the phase, and requests waiting for a step boundary."""

    def __init__(self):
        self.phase = "command"
        self.exit_at_once = False  # the CLI's: stop the process; the API's: raise KeyboardInterrupt
        self.reset()

    def reset(self) -> None:
        self.stop_requested = self.save_requested = self.interrupted = False

    def install(self) -> None:
        """Set the handlers (signals reach the main thread only). Called again once JAX's
        distributed runtime has started: it installs a SIGTERM handler of its own."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGUSR1, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        assert phase in PHASES, phase
        previous, self.phase = self.phase, phase
        try:
            yield self
        finally:
            self.phase = previous

    def _handle(self, signum, frame) -> None:
        deferred = self.phase in _DEFERRED
        if signum == signal.SIGINT:
            if not deferred or self.stop_requested:
                if self.exit_at_once:
                    self._exit_now(interrupted=True)
                signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler
            self.stop_requested = self.interrupted = True
            print("jit-tune: Ctrl-C: saving a checkpoint at the next step boundary, then stopping (Ctrl-C again "
                  "stops at once, losing the steps since the last checkpoint)", file=sys.stderr, flush=True)
        elif signum == signal.SIGTERM:
            if not deferred:
                self._exit_now()
            self.stop_requested, self.interrupted = True, False
        elif deferred or self.phase == "startup":
            self.save_requested = True
        else:
            print(f"jit-tune: SIGUSR1 ({self.phase.replace('_', ' ')}): nothing to save", file=sys.stderr, flush=True)

    def _exit_now(self, interrupted: bool = False) -> None:
        """Nothing to save in this phase (or a second Ctrl-C: stop regardless), and every
        file is written atomically: exit here. (An exception raised from a signal handler
        can land in a callback that swallows it, such as a garbage-collection hook, and the
        command would go on; and unwinding a KeyboardInterrupt through JAX's runtime can
        crash the interpreter's shutdown.)"""
        sys.stdout.flush()
        how = "interrupted (Ctrl-C)" if interrupted else "stopped by SIGTERM"
        when = STOPPED[self.phase] if self.phase in STOPPED else "at once; the steps since the last checkpoint are lost"
        print(f"jit-tune: {how} {when}", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED)

    def poll(self, step: int) -> tuple[bool, bool]:
        """(save now, then stop), agreed by every process: a request on any process
        counts for all, so they save the same step. Across processes the agreement is a
        collective that waits for the devices, so it runs every AGREE_EVERY steps only
        (well inside the tens of seconds schedulers give between SIGTERM and kill)."""
        import jax  # not at import time: the CLI installs the handlers before loading JAX
        from jax.experimental import multihost_utils

        local = (self.save_requested or self.stop_requested, self.stop_requested, self.interrupted)
        if jax.process_count() == 1:
            flags = local
        elif step % AGREE_EVERY == 0:
            flags = np.asarray(multihost_utils.process_allgather(np.asarray(local, np.int32))).reshape(-1, 3).max(0)
        else:
            return False, False
        self.save_requested = False
        # A Ctrl-C on any process is the run's: every process exits 130, none asks for a requeue.
        self.interrupted = bool(flags[2])
        return bool(flags[0]), bool(flags[1])


SIGNALS = Signals()
