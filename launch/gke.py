"""Run a job on GKE: a JobSet manifest for TPU slices (or GPU nodes), or the equivalent
xpk command.

    python launch/gke.py --image IMAGE --topology v5p:4x4x8 --gcs-bucket BUCKET \\
        --config configs/x.py --workdir /gcs/runs/x
    python launch/gke.py --image IMAGE --gpu nvidia-h100-80gb --nodes 4 --pvc CLAIM --mount-path /fs \\
        --config ... --workdir /fs/runs/x
    python launch/gke.py --xpk --cluster my-cluster --image IMAGE --topology v5p:4x4x8 --config ... --workdir ...

The image is launch/Dockerfile's: jit_tune installed in --image-workdir (/app), where the
container starts, so --config is read from the image. The workdir lies on storage every
pod mounts at --mount-path: a GCS bucket (--gcs-bucket, through the GCS FUSE CSI driver)
or a PersistentVolumeClaim (--pvc, e.g. Filestore).

TPU pods need no coordinator flags (JAX reads GKE's TPU environment); for GPUs the
manifest points every pod at pod 0 through the JobSet's headless service. Pods get
SIGTERM on preemption or maintenance: jit-tune saves and exits 75, and the JobSet starts
the job again (up to --max-restarts times), which resumes from that checkpoint. Any other
exit, such as a config error (2) or a crash (1), fails the JobSet at once: the Job's pod
failure policy fails the Job, and the JobSet's failure policy does not restart a Job
failed that way.

With --xpk, xpk writes the JobSet. xpk (0.7.1 or later) restarts on exit codes 42 and
127-255 and on those of --restart-on-exit-codes, given 75 here. It cannot restart on 75
alone: a crash by a signal (e.g. 137, 139) is restarted too, up to --max-restarts.
Storage comes from xpk's own setup (`xpk storage attach`), not from --gcs-bucket / --pvc.

With --sweep SWEEP_DIR (instead of --config/--workdir), every pending run of the sweep
gets the JobSet a single job gets, named <name>-<run id>, all applied by one
`kubectl apply`; with --xpk, one `xpk workload create --workload <name>-<run id>` each.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import common
import yaml
from common import EXIT_PREEMPTED

from jit_tune.topology import parse

PORT = 8476
CONTAINER = "jit-tune"
# xpk's limit on workload names. A JobSet's pod names (<name>-workers-<slice>-<host>-<5
# random characters>) must be DNS-1035 labels of at most 63 characters: 40 leaves room.
NAME_LIMIT = 40
NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # a DNS-1035 label


def run_name(name: str, run_id: str) -> str:
    """`<name>-<run id>` as a DNS-1035 label of at most NAME_LIMIT characters: lowercase,
    other characters made '-', the name cut short to keep the run id whole."""
    def clean(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

    run_id = clean(run_id)
    return f"{clean(name)[:max(NAME_LIMIT - len(run_id) - 1, 0)].rstrip('-')}-{run_id}".strip("-")


def named(jobs: list[common.Job]) -> list[common.Job]:
    """A sweep's runs, each with --name made its own `<name>-<run id>`."""
    jobs = [job._replace(args=argparse.Namespace(**{**vars(job.args), "name": run_name(job.args.name, job.run)}))
            for job in jobs]
    names = [job.args.name for job in jobs]
    bad = sorted({n for n in names if not NAME.fullmatch(n) or len(n) > NAME_LIMIT or names.count(n) > 1})
    if bad:
        common.fail(f"the runs' names must be distinct DNS-1035 labels of at most {NAME_LIMIT} characters (a letter "
                    f"first): {', '.join(bad)}; choose another --name")
    return jobs


def storage(args) -> tuple[dict, dict]:
    """The pod volume that holds the workdir, and the pod annotations it needs."""
    if args.pvc:
        return {"name": "workdir", "persistentVolumeClaim": {"claimName": args.pvc}}, {}
    # implicit-dirs: folders created outside the mount (gcloud storage cp) show up in it.
    attributes = {"bucketName": args.gcs_bucket, "mountOptions": "implicit-dirs"}
    if args.topology:  # TPU pods use the host network; the driver then needs this to act as the pod's account
        attributes["hostNetworkPodKSA"] = "true"
    volume = {"name": "workdir", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "volumeAttributes": attributes}}
    return volume, {"gke-gcsfuse/volumes": "true"}  # asks GKE to add the FUSE sidecar


def manifest(args, overrides: list[str]) -> dict:
    command = common.train_command(args, overrides)
    volume, annotations = storage(args)
    container = {"name": CONTAINER, "image": args.image, "workingDir": args.image_workdir, "command": command,
                 "env": [], "resources": {"limits": {}},
                 "volumeMounts": [{"name": volume["name"], "mountPath": args.mount_path}]}
    pod = {"restartPolicy": "Never", "terminationGracePeriodSeconds": args.grace_seconds, "containers": [container],
           "volumes": [volume]}
    if args.gpu:
        hosts, replicas = args.nodes, 1
        pod["nodeSelector"] = {"cloud.google.com/gke-accelerator": args.gpu}
        container["resources"]["limits"]["nvidia.com/gpu"] = args.gpus_per_node
        index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        container["env"] = [
            {"name": "JIT_TUNE_COORDINATOR", "value": f"{args.name}-workers-0-0.{args.name}:{PORT}"},
            {"name": "JIT_TUNE_NUM_PROCESSES", "value": str(hosts)},
            {"name": "JIT_TUNE_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": index}}},
        ]
    else:
        topology = parse(args.topology, args.slices)
        hosts, replicas = topology.hosts, topology.slices
        pod["nodeSelector"] = {"cloud.google.com/gke-tpu-accelerator": topology.generation.gke_accelerator,
                               "cloud.google.com/gke-tpu-topology": topology.grid_name}
        container["resources"]["limits"]["google.com/tpu"] = topology.chips_per_host
        pod.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
    # Rules apply in order, the first match wins. A pod that Kubernetes evicted or
    # preempted counts as a plain failure (the Job fails, the JobSet restarts) whatever
    # its exit code, e.g. 137 when the save outlasted the grace period; it is not ignored,
    # since a lone replacement pod could not rejoin the others' run. Otherwise any exit
    # but 75 fails the Job through the policy, which the JobSet rules below do not restart.
    failure_policy = {"rules": [
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {"action": "FailJob",
         "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [EXIT_PREEMPTED]}},
    ]}
    template = {"metadata": {"annotations": annotations}, "spec": pod} if annotations else {"spec": pod}
    job = {"parallelism": hosts, "completions": hosts, "completionMode": "Indexed", "backoffLimit": 0,
           "podFailurePolicy": failure_policy, "template": template}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": args.name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {"failurePolicy": {
                     "maxRestarts": args.max_restarts,
                     # Tried in order against every failed Job. A preempted Job (75, or
                     # evicted) restarts the JobSet even when other hosts crashed for lack
                     # of it; otherwise a Job failed by its pod failure policy (any other
                     # exit) fails the JobSet instead of restarting it.
                     "rules": [{"name": "restartOnPreemption", "action": "RestartJobSet",
                                "onJobFailureReasons": ["BackoffLimitExceeded"]},
                               {"name": "failOnErrorExit", "action": "FailJobSet",
                                "onJobFailureReasons": ["PodFailurePolicy"]}]},
                 "replicatedJobs": [{"name": "workers", "replicas": replicas, "template": {"spec": job}}]},
    }


def xpk_command(args, overrides: list[str]) -> list[str]:
    topology = parse(args.topology, args.slices)
    return ["xpk", "workload", "create", "--cluster", args.cluster, "--workload", args.name,
            "--tpu-type", topology.accelerator_type,
            "--num-slices", str(topology.slices), "--docker-image", args.image,
            "--max-restarts", str(args.max_restarts), "--restart-on-exit-codes", str(EXIT_PREEMPTED),
            "--termination-grace-period-seconds", str(args.grace_seconds),
            "--command", common.shell(common.train_command(args, overrides))]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0], sweeps=True)
    p.add_argument("--image", required=True, help="container image with jit_tune installed (launch/Dockerfile)")
    p.add_argument("--image-workdir", default="/app", help="where jit_tune lies in the image; the container starts there")
    p.add_argument("--name", default="jit-tune", help="JobSet / workload name (with --sweep: its prefix)")
    p.add_argument("--topology", help="TPU slice, e.g. v5p:4x4x8")
    p.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over DCN)")
    p.add_argument("--gpu", help="GPU node accelerator label, e.g. nvidia-h100-80gb")
    p.add_argument("--nodes", type=int, default=1, help="GPU nodes")
    p.add_argument("--gpus-per-node", type=int, default=8)
    mount = p.add_mutually_exclusive_group()
    mount.add_argument("--gcs-bucket", metavar="BUCKET", help="mount this GCS bucket (GCS FUSE) at --mount-path")
    mount.add_argument("--pvc", metavar="CLAIM", help="mount this PersistentVolumeClaim (e.g. Filestore) at --mount-path")
    p.add_argument("--mount-path", default="/gcs", help="where the pods mount the storage; the workdir lies under it")
    p.add_argument("--max-restarts", type=int, default=100, help="restarts after preemption (exit 75)")
    p.add_argument("--grace-seconds", type=int, default=300, help="time between SIGTERM and kill")
    p.add_argument("--xpk", action="store_true", help="print/run an xpk command instead of a manifest")
    p.add_argument("--cluster", help="GKE cluster, for --xpk")
    args, overrides = common.parse(p, argv)
    if bool(args.topology) == bool(args.gpu):
        p.error("give exactly one of --topology (TPU) and --gpu (GPU)")
    if args.xpk and not (args.topology and args.cluster):
        p.error("--xpk needs --topology and --cluster")
    if args.xpk and (args.gcs_bucket or args.pvc):
        p.error("--gcs-bucket and --pvc are for the manifest; with --xpk, attach storage with `xpk storage attach`")
    where = f"--sweep {args.sweep}" if args.sweep else f"--workdir {args.workdir}"
    if not args.xpk and not (args.gcs_bucket or args.pvc):
        common.fail(f"{where} must lie on storage every pod mounts: give --gcs-bucket BUCKET "
                    f"or --pvc CLAIM (mounted at --mount-path, now {args.mount_path})")
    jobs = common.jobs(args, overrides)
    for job in jobs:
        if not args.xpk and not common.under(job.args.workdir, args.mount_path):
            common.fail(f"{f'run {job.run}: workdir' if job.run else '--workdir'} {job.args.workdir} is not under "
                        f"--mount-path {args.mount_path}, where the pods mount "
                        f"{'the bucket' if args.gcs_bucket else 'the claim'}")
    if args.sweep:
        jobs = named(jobs)
    if args.xpk and args.sweep:  # an xpk batch: one workload per run
        return common.run_queue([(job.run, xpk_command(job.args, job.overrides)) for job in jobs], args.dry_run)
    if args.xpk:
        return common.run([xpk_command(args, overrides)], args.dry_run)
    if not jobs:
        return 0
    text = yaml.safe_dump_all([manifest(job.args, job.overrides) for job in jobs], sort_keys=False)
    if args.dry_run:
        print(text)
        print(common.shell(["kubectl", "apply", "-f", "-"]))
        return 0
    return subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True).returncode


if __name__ == "__main__":
    sys.exit(main())
