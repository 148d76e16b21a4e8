"""The host set-up `choose_platform` does before JAX's CPU backend starts."""

import platform
import subprocess
import sys

import pytest

# A 512 MiB block allocated, written and freed three times; prints the page faults of the
# last two rounds. glibc's default serves a block this large with a fresh mmap each time.
ROUNDS = """
import ctypes, resource, sys
from jit_tune.distributed import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def block():
    a = libc.malloc(512 << 20)
    ctypes.memset(a, 1, 512 << 20)
    libc.free(a)
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block(); block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_host_memory_is_reused_without_faulting_it_in_again():
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True,
                                  check=True).stdout)

    pages = 2 * (512 << 20) // 4096
    assert faults("default") > pages // 2  # the control: the default allocator faults the block in again
    assert faults("keep") < pages // 20
