"""One process of a multi-process training run (run through tests/multihost.py).

Usage: python tests/train_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR STOP_AT [--config.x=y ...]
Runs the real training loop on configs/tiny.py:smoke with the overrides, across every
process's devices, up to step STOP_AT, and prints the losses logged so far.
"""

import json
import sys
from pathlib import Path

import jax


def main() -> None:
    process_id, processes, port, workdir, stop_at, *overrides = sys.argv[1:]
    if int(processes) > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(processes), process_id=int(process_id))
    from jit_tune.config import load_config
    from jit_tune.train.loop import train

    train(load_config("configs/tiny.py:smoke", overrides), workdir, stop_at_step=int(stop_at))
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    losses = {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "losses": losses}))


if __name__ == "__main__":
    main()
