"""Data pipeline throughput (read, render, tokenize, pack, batch) against what the
train step consumes, and its scaling with Grain worker processes.

    .venv/bin/python tools/bench_pipeline.py --config configs/tiny.py [--batches 40] [--workers 0 1 2]

Tokens are real (non-padding) tokens of packed rows, the same count the trainer's
tokens/s reports. Worker counts set config.data.workers (Grain's multiprocess prefetch).
"""

from __future__ import annotations

import argparse
import time

from jit_tune.config import load_config
from jit_tune.data.pipeline import run_tokenizer, train_dataset
from jit_tune.data.registry import build_registry
from jit_tune.distributed import choose_platform


def main() -> None:
    choose_platform()  # no libtpu probing on a machine without TPUs
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args, overrides = parser.parse_known_args()
    config = load_config(args.config, overrides)
    d = config.data
    registry = build_registry(config)
    tokenizer = run_tokenizer(config, registry)
    print(f"config {args.config}: batches of {d.batch_size} x {d.seq_len}")
    for workers in args.workers:
        config.unlock()
        config.data.workers = workers  # as training runs it: in-process, or Grain's mp_prefetch
        iterator = iter(train_dataset(config, tokenizer, registry))
        next(iterator)  # start-up (workers, packer fill) is not throughput
        start, tokens = time.perf_counter(), 0
        for _ in range(args.batches):
            tokens += int((next(iterator)["segment_ids"] > 0).sum())
        seconds = time.perf_counter() - start
        print(f"workers {workers}: {tokens / seconds:10,.0f} tokens/s ({args.batches / seconds:.1f} batches/s)")


if __name__ == "__main__":
    main()
