"""Run a job on a multi-node GPU allocation with SLURM: writes an sbatch script and submits it.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --config configs/x.py --workdir /shared/runs/x

One task per node drives that node's GPUs; JAX reads its peers from SLURM's environment
(no coordinator flags). SLURM sends SIGTERM 120 s before the time limit (--signal);
jit-tune saves and exits 75, and the script then requeues the job, which resumes from
that checkpoint. Preempted jobs are requeued by SLURM itself (--requeue).
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
from common import EXIT_PREEMPTED


def script(args, overrides: list[str]) -> str:
    options = {"job-name": args.job_name, "nodes": args.nodes, "ntasks-per-node": 1,
               "gpus-per-node": args.gpus_per_node, "time": args.time, "requeue": None,
               "signal": "B:TERM@120", "output": f"{args.workdir}/slurm-%j.out"}
    if args.partition:
        options["partition"] = args.partition
    if args.account:
        options["account"] = args.account
    header = "\n".join(f"#SBATCH --{k}" + ("" if v is None else f"={v}") for k, v in options.items())
    train = common.shell(common.train_command(args, overrides, f"{args.remote_dir}/.venv/bin/jit-tune"))
    return f"""#!/bin/bash
{header}
set -u
cd {args.remote_dir}
srun --kill-on-bad-exit=1 {train} &
child=$!
# The batch shell gets the SIGTERM (B:); pass it on to every task, which saves and exits {EXIT_PREEMPTED}.
trap 'kill -TERM $child; interrupted=1' TERM
# The trapped signal ends `wait` early (128+15) while the tasks are still saving: wait
# again until srun itself has exited, for its own exit code.
interrupted=1
while [ $interrupted = 1 ]; do interrupted=0; wait $child; code=$?; done
if [ $code -eq {EXIT_PREEMPTED} ]; then scontrol requeue $SLURM_JOB_ID; fi
exit $code
"""


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="jit-tune")
    p.add_argument("--remote-dir", default=str(common.REPO), help="the repo's directory on the nodes")
    args, overrides = common.parse(p, argv)
    common.check_config(args.config, overrides)
    text = script(args, overrides)
    path = Path(args.workdir) / "launch" / "job.sbatch"
    if args.dry_run:
        print(f"# {path}\n{text}")
        print(common.shell(["sbatch", str(path)]))
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return common.run([["sbatch", str(path)]], dry_run=False)


if __name__ == "__main__":
    sys.exit(main())
