"""Run a job as several JAX processes on this machine: a rehearsal of a pod on a
workstation or CI (CPU devices), or one process per GPU.

    python launch/local.py --processes 2 --devices-per-process 2 --config configs/tiny.py --workdir runs/local

Each process gets JIT_TUNE_COORDINATOR/NUM_PROCESSES/PROCESS_ID (jit_tune/distributed.py).
SIGTERM and Ctrl-C are passed on to every process, so they checkpoint together; the
exit code is the first non-zero one (75: preempted, rerun to resume).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import common


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_envs(processes: int, port: int, devices_per_process: int | None, gpus: bool) -> list[dict[str, str]]:
    envs = []
    for i in range(processes):
        env = {"JIT_TUNE_COORDINATOR": f"127.0.0.1:{port}", "JIT_TUNE_NUM_PROCESSES": str(processes),
               "JIT_TUNE_PROCESS_ID": str(i)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        elif devices_per_process:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
        envs.append(env)
    return envs


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=None, help="CPU: virtual devices per process")
    p.add_argument("--gpus", action="store_true", help="one process per GPU (CUDA_VISIBLE_DEVICES=i)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--program", default=f"{sys.executable} -m jit_tune.cli", help="how to run jit-tune")
    args, overrides = common.parse(p, argv)
    common.check_config(args.config, overrides)
    command = common.train_command(args, overrides, args.program)
    envs = process_envs(args.processes, args.port or free_port(), args.devices_per_process, args.gpus)
    for env in envs:
        print(" ".join(f"{k}={v}" for k, v in env.items()), common.shell(command), flush=True)
    if args.dry_run:
        return 0
    children = [subprocess.Popen(command, env={**os.environ, **env}) for env in envs]

    def forward(signum, frame):
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
