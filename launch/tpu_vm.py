"""Run a job on every worker of a Cloud TPU VM pod slice, over `gcloud ... ssh --worker=all`.

    python launch/tpu_vm.py --tpu my-v5p --zone us-east5-a --config configs/x.py --workdir /gcs/bucket/runs/x
    python launch/tpu_vm.py --tpu my-v5p --zone us-east5-a --queued-resource my-qr \\
        --accelerator v5p-128 --runtime-version v2-alpha-tpuv5 --config ... --workdir ...

With --queued-resource it first asks for the slice as a queued resource (and waits for
it), otherwise the TPU VM must exist. --bootstrap REPO_URL clones or updates the repo on
every worker and runs its setup (with the tpu extra) before training. No coordinator
flags are needed: on TPU VMs JAX finds its peers itself. The workdir must be storage
every worker shares (a GCS FUSE mount or Filestore), since Orbax writes one checkpoint
from all of them.

The config file is copied to every worker, into <remote-dir>/launch_configs/<workdir
name>/, and training reads that copy. What the config reads (data.tasks.*.path,
data.task_dirs.*.path, model.init_from, a tokenizer directory) must lie on storage every
worker sees at the same path (--shared DIR; by default the workdir's parent), or is
copied to that path on every worker with --copy-data. The workers get each such path as
an absolute --config override, so a config that computes paths from its own location
reads the same files from its copy.

Each worker writes its output to <workdir>/logs/worker-<hostname>.log. The remote command
exits with jit-tune's code, and the launcher with gcloud's: 75 after a preemption; rerun
the same command and training resumes.

With --sweep SWEEP_DIR (instead of --config/--workdir) the slice runs the sweep's pending
runs one after another, each as the one job above (its log in <run workdir>/logs/). A
run exiting 75 stops the queue with 75: rerun the command to resume it and go on
(finished runs are skipped). Another failure is reported and the queue goes on; the
launcher then exits 1, naming the failed runs. The config is copied to
<remote-dir>/launch_configs/<sweep dir name>/, and --shared defaults to the sweep dir's parent.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path, PurePosixPath

import common


def commands(args, jobs: list[common.Job], copies: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """The steps that set the slice up, and each job's training on every worker.
    `copies`: local paths to copy to the same path on every worker."""
    where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
    steps = []
    if args.queued_resource:
        steps.append(["gcloud", "compute", "tpus", "queued-resources", "create", args.queued_resource,
                      "--node-id", args.tpu, "--accelerator-type", args.accelerator,
                      "--runtime-version", args.runtime_version, *where])
        steps.append(["bash", "-c", f"until gcloud compute tpus queued-resources describe {args.queued_resource} "
                      f"{common.shell(where)} --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done"])

    def on_all_workers(remote: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *where, "--worker=all", "--command", remote]

    def copy_to_all_workers(local: str, remote_dir: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", local, f"{args.tpu}:{remote_dir}/",
                *where, "--worker=all"]

    if args.bootstrap:
        steps.append(on_all_workers(
            f"(git clone {args.bootstrap} {args.remote_dir} || git -C {args.remote_dir} pull) && "
            f"cd {args.remote_dir} && bash tools/setup_env.sh tpu"))
    config_file = jobs[0].args.config.partition(":")[0]  # the same for every job
    # inside remote-dir, where jit-tune runs
    config_dir = f"launch_configs/{PurePosixPath(os.path.abspath(args.sweep or args.workdir)).name}"
    parents = sorted({os.path.dirname(path) for path in copies})
    steps.append(on_all_workers(f"mkdir -p {args.remote_dir}/{config_dir} {common.shell(parents)}".rstrip()))
    steps.append(copy_to_all_workers(config_file, f"{args.remote_dir}/{config_dir}"))
    steps += [copy_to_all_workers(path, os.path.dirname(path)) for path in copies]
    trains = []
    for job in jobs:
        _, colon, variant = job.args.config.partition(":")
        remote = argparse.Namespace(config=f"{config_dir}/{Path(config_file).name}{colon}{variant}",
                                    workdir=job.args.workdir)
        train = common.shell(common.train_command(remote, job.overrides, ".venv/bin/jit-tune"))
        logs = shlex.quote(f"{job.args.workdir}/logs")
        # The redirection leaves jit-tune's exit code (75: preempted) as the remote command's.
        trains.append(on_all_workers(
            f"cd {args.remote_dir} && mkdir -p {logs} && {train} > {logs}/worker-$(hostname).log 2>&1"))
    return steps, trains


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0], sweeps=True)
    p.add_argument("--tpu", required=True, help="TPU VM (node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project")
    p.add_argument("--queued-resource", help="create the slice as this queued resource first")
    p.add_argument("--accelerator", help="for --queued-resource, e.g. v5p-128")
    p.add_argument("--runtime-version", help="for --queued-resource, e.g. v2-alpha-tpuv5")
    p.add_argument("--bootstrap", metavar="REPO_URL", help="clone/update the repo and set it up on every worker")
    p.add_argument("--remote-dir", default="jit_tune", help="the repo's directory on the workers")
    p.add_argument("--shared", action="append", metavar="DIR",
                   help="storage every worker sees at this same path (repeatable; default: the workdir's parent)")
    p.add_argument("--copy-data", action="store_true",
                   help="copy the config's local data, model and tokenizer paths to the same path on every worker")
    args, overrides = common.parse(p, argv)
    if args.queued_resource and not (args.accelerator and args.runtime_version):
        p.error("--queued-resource needs --accelerator and --runtime-version")
    jobs = common.jobs(args, overrides)
    if not jobs:
        return 0
    config_files = sorted({job.args.config.partition(":")[0] for job in jobs})
    if len(config_files) > 1:
        common.fail(f"the runs read different config files ({', '.join(config_files)}); launch them apart (--kind)")
    home = os.path.abspath(args.sweep or args.workdir)  # the sweep's or the job's directory
    shared = [os.path.abspath(d) for d in args.shared or [os.path.dirname(home)]]
    local, pinned = {}, []  # local: path -> the config field that reads it
    for job in jobs:
        paths = {field: os.path.abspath(path) for field, path in common.local_paths(job.config).items()}
        local |= {path: field for field, path in paths.items() if not any(common.under(path, d) for d in shared)}
        # The workers read these exact paths, whatever the config computes on their side.
        pins = [pin for pin in (f"--{field}={path}" for field, path in paths.items()) if pin not in job.overrides]
        pinned.append(job._replace(overrides=job.overrides + pins))
    if local and not args.copy_data:
        common.fail(f"the workers cannot read {', '.join(f'{f} = {path}' for path, f in local.items())}: put it "
                    f"under storage every worker sees at the same path (--shared DIR, now {', '.join(shared)}) "
                    "or copy it to every worker with --copy-data")
    for job, unpinned in zip(pinned, jobs):
        if job.overrides != unpinned.overrides:  # they load there as they do here
            common.check_config(job.args.config, job.overrides, f"run {job.run}: " if job.run else "")
    setup, trains = commands(args, pinned, list(local))
    print(f"# each worker's output goes to {'<run workdir>' if args.sweep else args.workdir}/logs/"
          "worker-<hostname>.log", flush=True)
    if not args.sweep:
        return common.run(setup + trains, args.dry_run)
    return common.run(setup, args.dry_run) or common.run_queue(
        [(job.run, train) for job, train in zip(jobs, trains)], args.dry_run, stop_on_preemption=True)


if __name__ == "__main__":
    sys.exit(main())
