"""One process of the multi-host data test (run through tests/multihost.py).

Usage: python tests/data_worker.py PROCESS_ID NUM_PROCESSES PORT RECORDS_JSONL BATCHES
Builds this process's pipeline from jax.process_index()/process_count(), as training
does, and prints the record ids its first BATCHES batches hold, one per packed example.
"""

import json
import re
import sys

import jax


def main() -> None:
    process_id, processes, port, records, batches = sys.argv[1:6]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(processes), process_id=int(process_id))
    from ml_collections import ConfigDict

    from jit_tune.config import load_config
    from jit_tune.data.pipeline import train_dataset
    from jit_tune.data.registry import build_registry
    from jit_tune.data.tokenizer import train_builtin_tokenizer

    config = load_config("configs/tiny.py:smoke")
    config.unlock()
    config.data.tasks = ConfigDict({"records": {"path": records}})
    config.data.mixture = ConfigDict({"records": 1.0})
    tokenizer = train_builtin_tokenizer(512, seed=0)
    ids = []
    iterator = iter(train_dataset(config, tokenizer, build_registry(config), jax.process_index(), jax.process_count()))
    for _ in range(int(batches)):
        batch = next(iterator)
        for row in range(len(batch["inputs"])):
            segments = batch["segment_ids"][row]
            for segment in set(segments[segments > 0].tolist()):
                text = tokenizer.decode(batch["inputs"][row][segments == segment])
                ids.append(int(re.search(r"record (\d+)", text).group(1)))
    print(json.dumps({"process": jax.process_index(), "ids": ids}))


if __name__ == "__main__":
    main()
