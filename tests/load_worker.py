"""One process of the memory-bounded loading test (run by test_memory_bounded_load.py).

Usage (through tests/multihost.py): python tests/load_worker.py PROCESS_ID NUM_PROCESSES PORT HF_DIR
Loads the checkpoint onto a mesh spanning every process's devices (fsdp, 2 per process),
and prints JSON with the bytes this process holds and how far its resident memory rose
above where it stood before loading (sampled every millisecond while loading).
"""

import json
import os
import sys
import threading
import time

import jax
import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def main() -> None:
    process_id, num_processes, port, hf_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
    from jit_tune.mesh import AXES
    from jit_tune.models.hf import SafetensorsCheckpoint
    from jit_tune.models.loading import load_hf_decoder

    rules = (("vocab", None), ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv_heads", None),
             ("head_dim", None), ("norm", None))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, -1, 1), AXES)
    with PeakRSS() as memory:
        model = load_hf_decoder(hf_dir, mesh, rules)
    local_bytes = sum(
        shard.data.nbytes for leaf in jax.tree.leaves(model) for shard in leaf.addressable_shards
    )
    # The blocks this process holds are the right ones.
    embed = model.embed_VxD[...]
    reference = np.asarray(SafetensorsCheckpoint(hf_dir).slice("model.embed_tokens.weight")[:, :])
    for shard in embed.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), reference[shard.index])
    print(json.dumps({"growth": memory.peak - memory.start, "local_bytes": local_bytes}), flush=True)


if __name__ == "__main__":
    main()
