"""Run a job on every worker of a Cloud TPU VM pod slice, over `gcloud ... ssh --worker=all`.

    python launch/tpu_vm.py --tpu my-v5p --zone us-east5-a --config configs/x.py --workdir /gcs/bucket/runs/x
    python launch/tpu_vm.py --tpu my-v5p --zone us-east5-a --queued-resource my-qr \\
        --accelerator v5p-128 --runtime-version v2-alpha-tpuv5 --config ... --workdir ...

With --queued-resource it first asks for the slice as a queued resource (and waits for
it), otherwise the TPU VM must exist. --bootstrap REPO_URL clones or updates the repo on
every worker and runs its setup (with the tpu extra) before training. No coordinator
flags are needed: on TPU VMs JAX finds its peers itself. The workdir must be storage
every worker shares (a GCS FUSE mount or Filestore), since Orbax writes one checkpoint
from all of them. Rerun the same command after a preemption: training resumes.
"""

from __future__ import annotations

import sys

import common


def commands(args, overrides: list[str]) -> list[list[str]]:
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

    if args.bootstrap:
        steps.append(on_all_workers(
            f"(git clone {args.bootstrap} {args.remote_dir} || git -C {args.remote_dir} pull) && "
            f"cd {args.remote_dir} && bash tools/setup_env.sh tpu"))
    train = common.shell(common.train_command(args, overrides, ".venv/bin/jit-tune"))
    steps.append(on_all_workers(f"cd {args.remote_dir} && {train}"))
    return steps


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--tpu", required=True, help="TPU VM (node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project")
    p.add_argument("--queued-resource", help="create the slice as this queued resource first")
    p.add_argument("--accelerator", help="for --queued-resource, e.g. v5p-128")
    p.add_argument("--runtime-version", help="for --queued-resource, e.g. v2-alpha-tpuv5")
    p.add_argument("--bootstrap", metavar="REPO_URL", help="clone/update the repo and set it up on every worker")
    p.add_argument("--remote-dir", default="jit_tune", help="the repo's directory on the workers")
    args, overrides = common.parse(p, argv)
    if args.queued_resource and not (args.accelerator and args.runtime_version):
        p.error("--queued-resource needs --accelerator and --runtime-version")
    common.check_config(args.config, overrides)
    return common.run(commands(args, overrides), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
