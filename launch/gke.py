"""Run a job on GKE: a JobSet manifest for TPU slices (or GPU nodes), or the equivalent
xpk command.

    python launch/gke.py --image IMAGE --topology v5p:4x4x8 --config configs/x.py --workdir /gcs/runs/x
    python launch/gke.py --image IMAGE --gpu nvidia-h100-80gb --nodes 4 --config ... --workdir ...
    python launch/gke.py --xpk --cluster my-cluster --image IMAGE --topology v5p:4x4x8 --config ... --workdir ...

TPU pods need no coordinator flags (JAX reads GKE's TPU environment); for GPUs the
manifest points every pod at pod 0 through the JobSet's headless service. Pods get
SIGTERM on preemption or maintenance: jit-tune saves and exits 75, and the JobSet's
restart policy starts the job again, which resumes from that checkpoint.
"""

from __future__ import annotations

import sys

import common
import yaml

from jit_tune.topology import parse

PORT = 8476


def manifest(args, overrides: list[str]) -> dict:
    command = common.train_command(args, overrides)
    container = {"name": "jit-tune", "image": args.image, "command": command, "env": [],
                 "resources": {"limits": {}}}
    pod = {"restartPolicy": "Never", "terminationGracePeriodSeconds": args.grace_seconds, "containers": [container]}
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
    job = {"parallelism": hosts, "completions": hosts, "completionMode": "Indexed", "backoffLimit": 0,
           "template": {"spec": pod}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": args.name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {"failurePolicy": {"maxRestarts": args.max_restarts},
                 "replicatedJobs": [{"name": "workers", "replicas": replicas, "template": {"spec": job}}]},
    }


def xpk_command(args, overrides: list[str]) -> list[str]:
    topology = parse(args.topology, args.slices)
    return ["xpk", "workload", "create", "--cluster", args.cluster, "--workload", args.name,
            "--tpu-type", topology.accelerator_type,
            "--num-slices", str(topology.slices), "--docker-image", args.image,
            "--max-restarts", str(args.max_restarts), "--command", common.shell(common.train_command(args, overrides))]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--image", required=True, help="container image with jit_tune installed")
    p.add_argument("--name", default="jit-tune", help="JobSet / workload name")
    p.add_argument("--topology", help="TPU slice, e.g. v5p:4x4x8")
    p.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over DCN)")
    p.add_argument("--gpu", help="GPU node accelerator label, e.g. nvidia-h100-80gb")
    p.add_argument("--nodes", type=int, default=1, help="GPU nodes")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--max-restarts", type=int, default=100, help="restarts after preemption or failure")
    p.add_argument("--grace-seconds", type=int, default=300, help="time between SIGTERM and kill")
    p.add_argument("--xpk", action="store_true", help="print/run an xpk command instead of a manifest")
    p.add_argument("--cluster", help="GKE cluster, for --xpk")
    args, overrides = common.parse(p, argv)
    if bool(args.topology) == bool(args.gpu):
        p.error("give exactly one of --topology (TPU) and --gpu (GPU)")
    if args.xpk and not (args.topology and args.cluster):
        p.error("--xpk needs --topology and --cluster")
    common.check_config(args.config, overrides)
    if args.xpk:
        return common.run([xpk_command(args, overrides)], args.dry_run)
    text = yaml.safe_dump(manifest(args, overrides), sort_keys=False)
    if args.dry_run:
        print(text)
        print(common.shell(["kubectl", "apply", "-f", "-"]))
        return 0
    import subprocess

    return subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True).returncode


if __name__ == "__main__":
    sys.exit(main())
