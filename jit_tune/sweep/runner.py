"""Running a sweep's pending runs on this machine: one after another in one process, or
in N processes at once, each taking every N-th run.

A process trains its runs through the ordinary training loop, one after another, so
runs of the same shape reuse the compiled train step and evaluation (the mixture weights
are sampler data, not array shapes): a sweep of small proxies pays one compile per
process, not one per run. A run that fails is recorded in its workdir (`.sweep_failed`)
and the others go on; a preempted run (SIGTERM) stops the process with exit 75, and
running the same command again resumes it and skips the finished ones. Clusters run the
same runs through launch/ (a SLURM array, GKE JobSets, a TPU VM queue).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from jit_tune.config import ConfigError, load_config
from jit_tune.data.sources import SourceError
from jit_tune.files import atomic_write_json, read_json
from jit_tune.sweep.plan import FAILED, load_manifest, pending
from jit_tune.train.preemption import Preempted


def train_arguments(argv: list[str]) -> tuple[str, str, list[str]]:
    """(config spec, workdir, overrides) of a run's `jit-tune train` argv."""
    if argv[:1] != ["train"] or "--config" not in argv or "--workdir" not in argv:
        raise ConfigError(f"not a `jit-tune train --config ... --workdir ...` command: {argv}")
    spec, workdir = argv[argv.index("--config") + 1], argv[argv.index("--workdir") + 1]
    return spec, workdir, [a for a in argv if a.startswith("--config.")]


def run_in_process(runs: list[dict], log=print) -> list[str]:
    """Train `runs` one after another in this process; returns the ids that failed."""
    from jit_tune.train.loop import train

    failed = []
    for i, run in enumerate(runs, 1):
        spec, workdir, overrides = train_arguments(run["argv"])
        log(f"[sweep] run {run['id']} ({i}/{len(runs)}): {workdir}")
        (Path(workdir) / FAILED).unlink(missing_ok=True)
        try:
            train(load_config(spec, overrides), workdir)
        except Preempted:
            raise
        except (ConfigError, SourceError, FileNotFoundError, FloatingPointError) as e:
            _record_failure(workdir, f"{type(e).__name__}: {e}")
            failed.append(run["id"])
        except Exception as e:  # anything else: recorded with where it came from, and the sweep goes on
            _record_failure(workdir, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
            failed.append(run["id"])
        if failed and failed[-1] == run["id"]:
            log(f"[sweep] run {run['id']} failed (see {workdir}/{FAILED}); going on with the next")
    return failed


def _record_failure(workdir: str, error: str) -> None:
    atomic_write_json(Path(workdir) / FAILED, {"error": error})


def run_local(directory: Path, processes: int = 1, kind: str | None = None, dry_run: bool = False) -> int:
    """Run the pending runs here; returns the exit code (0, 1 if some failed, 75 if preempted)."""
    runs = pending(load_manifest(directory), kind)
    if dry_run or not runs:
        for run in runs:
            print("jit-tune " + " ".join(run["argv"]))
        print(f"{len(runs)} pending runs" + (" (dry run: nothing started)" if dry_run and runs else ""))
        return 0
    if processes <= 1:
        try:
            failed = run_in_process(runs)
        except Preempted as e:
            print(f"[sweep] {e}", file=sys.stderr)
            return e.exit_code
        return 1 if failed else 0
    workers = [subprocess.Popen([sys.executable, "-m", "jit_tune.cli", "sweep", "worker", "--dir", str(directory),
                                 "--shard", str(i), "--shards", str(processes)] + (["--kind", kind] if kind else []),
                                env={**os.environ}) for i in range(processes)]

    def forward(signum, frame):  # preemption reaches every worker, which saves and exits 75
        for worker in workers:
            worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    codes = [worker.wait() for worker in workers]
    return 75 if 75 in codes else next((code for code in codes if code), 0)


def run_shard(directory: Path, shard: int, shards: int, kind: str | None = None) -> int:
    """A worker of run_local: every `shards`-th pending run, starting at `shard`."""
    runs = pending(load_manifest(directory), kind)[shard::shards]
    try:
        return 1 if run_in_process(runs, log=lambda m: print(f"[worker {shard}] {m}", flush=True)) else 0
    except Preempted as e:
        return e.exit_code


def failure(run: dict) -> str | None:
    path = Path(run["workdir"]) / FAILED
    return read_json(path)["error"] if path.is_file() else None
