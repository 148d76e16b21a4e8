"""Run a job on a multi-node GPU allocation with SLURM: writes an sbatch script and submits it.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --config configs/x.py --workdir /shared/runs/x
    python launch/slurm.py --nodes 1 --gpus-per-node 8 --sweep /shared/sweeps/s --max-parallel 8

One task per node drives that node's GPUs; JAX reads its peers from SLURM's environment
(no coordinator flags). SLURM sends SIGTERM 120 s before the time limit (--signal);
jit-tune saves and exits 75, and the script then requeues the job, which resumes from
that checkpoint. Preempted jobs are requeued by SLURM itself (--requeue).

With --sweep, one job array runs the sweep's pending runs, at most --max-parallel at a
time: <sweep dir>/launch/slurm_runs.txt lists one run's jit-tune argv a line, and array
task i runs line i+1 as the one job above would (each task is requeued on its own).
"""

from __future__ import annotations

import hashlib
import shlex
import sys
from pathlib import Path

import common
from common import EXIT_PREEMPTED


def script(args, train: str, output: str, requeue: str = "$SLURM_JOB_ID", select: str = "", **options) -> str:
    """The batch script: `select` (shell lines) picks what to run, then `train` runs under
    srun, and `requeue` is requeued when it exits 75."""
    options = {"job-name": args.job_name, "nodes": args.nodes, "ntasks-per-node": 1,
               "gpus-per-node": args.gpus_per_node, "time": args.time, "requeue": None,
               "signal": "B:TERM@120", "output": output, **options}
    if args.partition:
        options["partition"] = args.partition
    if args.account:
        options["account"] = args.account
    header = "\n".join(f"#SBATCH --{k}" + ("" if v is None else f"={v}") for k, v in options.items())
    return f"""#!/bin/bash
{header}
set -u
cd {args.remote_dir}
{select}srun --kill-on-bad-exit=1 {train} &
child=$!
# The batch shell gets the SIGTERM (B:); pass it on to every task, which saves and exits {EXIT_PREEMPTED}.
trap 'kill -TERM $child; interrupted=1' TERM
# The trapped signal ends `wait` early (128+15) while the tasks are still saving: wait
# again until srun itself has exited, for its own exit code.
interrupted=1
while [ $interrupted = 1 ]; do interrupted=0; wait $child; code=$?; done
if [ $code -eq {EXIT_PREEMPTED} ]; then scontrol requeue {requeue}; fi
exit $code
"""


def array_script(args, runs: Path, text: str, count: int) -> str:
    """The job array over `runs` (holding `text`): task i runs the jit-tune argv on line i+1."""
    quoted = shlex.quote(str(runs))
    # A requeued task reads its line again: refuse a list rewritten since (by a later launch).
    select = f"""if [ "$(sha256sum < {quoted})" != "{hashlib.sha256(text.encode()).hexdigest()}  -" ]; then
  echo "{runs} changed since this array was submitted; launch the sweep again" >&2; exit 1
fi
eval "set -- $(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {quoted})"
"""
    return script(args, f'{args.remote_dir}/.venv/bin/jit-tune "$@"', f"{runs.parent}/slurm-%A_%a.out",
                  requeue="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}", select=select,
                  array=f"0-{count - 1}%{args.max_parallel or count}")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0], sweeps=True)
    p.add_argument("--nodes", type=int, required=True, help="nodes per run")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--time", default="24:00:00", help="time limit of the job (of each run with --sweep)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="jit-tune")
    p.add_argument("--remote-dir", default=str(common.REPO), help="the repo's directory on the nodes")
    p.add_argument("--max-parallel", type=int, metavar="P", help="with --sweep: at most P runs at a time (default: all)")
    args, overrides = common.parse(p, argv)
    if args.max_parallel is not None and (not args.sweep or args.max_parallel < 1):
        p.error("--max-parallel needs --sweep and a positive number")
    jobs = common.jobs(args, overrides)
    if not jobs:
        return 0
    if args.sweep:
        runs = Path(args.sweep).absolute() / "launch" / "slurm_runs.txt"
        listed = "".join(common.shell(common.train_command(job.args, job.overrides, "")) + "\n" for job in jobs)
        path = runs.with_name("slurm_array.sbatch")
        files = {path: array_script(args, runs, listed, len(jobs)), runs: listed}
    else:
        train = common.shell(common.train_command(args, overrides, f"{args.remote_dir}/.venv/bin/jit-tune"))
        path = Path(args.workdir) / "launch" / "job.sbatch"
        files = {path: script(args, train, f"{args.workdir}/slurm-%j.out")}
    if args.dry_run:
        for name, text in files.items():
            print(f"# {name}\n{text}")
        print(common.shell(["sbatch", str(path)]))
        return 0
    for name, text in files.items():
        name.parent.mkdir(parents=True, exist_ok=True)
        name.write_text(text)
    return common.run([["sbatch", str(path)]], dry_run=False)


if __name__ == "__main__":
    sys.exit(main())
