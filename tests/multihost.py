"""Run a worker script as several real JAX processes on 127.0.0.1 (CPU), the way a pod
runs one process per host: `jax.distributed` with a local coordinator, each process with
its own virtual devices. Each worker prints one JSON line last; `spawn` returns them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(script: str, processes: int, *args: str, devices_per_process: int = 2, timeout: int = 600) -> list[dict]:
    """Run `python tests/<script> PROCESS_ID PROCESSES PORT *args` in `processes`
    processes; the last stdout line of each, parsed as JSON, in process order."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    workers = [
        subprocess.Popen([sys.executable, str(REPO / "tests" / script), str(i), str(processes), str(port), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for i in range(processes)
    ]
    reports = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=timeout)
            assert worker.returncode == 0, f"{script} exited {worker.returncode}:\n{err[-3000:]}"
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            worker.kill()
    return reports
