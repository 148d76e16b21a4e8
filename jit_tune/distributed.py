"""Joining a multi-process run: one JAX process per host (or per GPU node).

`initialize` needs no flags where a cluster manager says who is who:
- TPU VMs and GKE TPU node pools, SLURM (srun), Open MPI: JAX's own cluster detection
  (`jax.distributed.initialize()` with no arguments) reads their environment;
- elsewhere, an explicit coordinator: `--coordinator HOST:PORT --num-processes N
  --process-id I`, or the same in JIT_TUNE_COORDINATOR, JIT_TUNE_NUM_PROCESSES and
  JIT_TUNE_PROCESS_ID (what launch/local.py and the GKE GPU manifest set).
A process that finds neither runs alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

class DistributedError(ValueError):
    pass


ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JIT_TUNE_COORDINATOR", "JIT_TUNE_NUM_PROCESSES", "JIT_TUNE_PROCESS_ID"


def tpu_chips() -> int:
    """TPU chips attached to this host (PCI devices, read without starting a backend)."""
    try:
        from jax._src import hardware_utils  # what JAX itself checks before TPU init

        return hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except (ImportError, AttributeError, OSError):
        return 0


def choose_platform(environ: dict = os.environ) -> str | None:
    """On a machine with no accelerator attached, tell JAX to use the CPU before its
    backends start: with libtpu installed (the tpu and test extras) JAX would otherwise
    load and probe it, and print its errors, in every command. An explicit JAX_PLATFORMS
    always wins. Where JAX will run on the CPU, glibc is told to keep freed memory
    (below). Returns the platform set, if any."""
    chosen = None
    if "JAX_PLATFORMS" not in environ:
        from jax._src import hardware_utils

        if tpu_chips() or hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd"):  # kfd: AMD GPUs
            return None
        environ["JAX_PLATFORMS"] = chosen = "cpu"  # for Grain worker processes
        jax.config.update("jax_platforms", "cpu")
    if environ["JAX_PLATFORMS"] == "cpu":
        keep_freed_host_memory()
    return chosen


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep the memory the process frees, before the XLA CPU backend's
    threads start. Each step XLA allocates its scratch in one block (1.5 GB for the CPU
    benchmark's model); glibc serves a block that large with a fresh mmap and unmaps it on
    free, so every step faulted and zeroed 1.5 GB anew: some 400k page faults, a fifth of
    the step spent in the kernel. One arena that grows by brk and is never trimmed reuses
    the pages (what MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 and a huge
    MALLOC_TRIM_THRESHOLD_ do). The price: resident memory stays at the process's peak.
    Returns whether glibc took the settings."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # malloc.h
    return all([mallopt(m_arena_max, 1), mallopt(m_mmap_max, 0), mallopt(m_trim_threshold, -1)])


def cluster(environ: Mapping[str, str], chips: int | None = None) -> str | None:
    """The cluster manager whose environment this process runs in, when it has peers.
    On a TPU VM (chips attached) JAX asks the metadata server for the other workers."""
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in environ:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in environ:
        return "tpu"  # GKE TPU pods and multi-slice jobs set these
    if (tpu_chips() if chips is None else chips) > 0:
        return "tpu"
    return None


def explicit(coordinator: str | None, num_processes: int | None, process_id: int | None,
             environ: Mapping[str, str]) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the flags, else the environment."""
    coordinator = coordinator or environ.get(ENV_COORDINATOR)
    if not coordinator:
        return None
    num = num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else environ.get(ENV_PROCESS_ID)
    if num is None or index is None:
        raise DistributedError(f"coordinator {coordinator}: also give the number of processes and this process's id "
                         f"(--num-processes and --process-id, or {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})")
    if not 0 <= int(index) < int(num):
        raise DistributedError(f"process id {index}: expected 0 to {int(num) - 1} for {num} processes")
    return coordinator, int(num), int(index)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               environ: Mapping[str, str] | None = None) -> str:
    """Join the run's processes before any JAX computation; returns how."""
    environ = os.environ if environ is None else environ
    given = explicit(coordinator, num_processes, process_id, environ)
    if given:
        jax.distributed.initialize(*given)
        return f"coordinator {given[0]}, process {given[2]} of {given[1]}"
    kind = cluster(environ)
    if kind:
        jax.distributed.initialize()
        return f"{kind}: process {jax.process_index()} of {jax.process_count()}"
    return "single process"
