"""Random-access read speed of ParquetSource: in order against shuffled order.

    .venv/bin/python tools/bench_sources.py [--rows 100000] [--group 10000] [--reads 2000]

Writes a Parquet file of `rows` rows (instruction/input/output text, like an Alpaca
dump) in row groups of `group` rows to a temp dir, opens it (timed on its own: the
first open may convert the file), then reads `reads` records in order and at shuffled
positions and prints records/s for each. Training reads shuffled, so that is the number
that matters.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jit_tune.data.sources import ParquetSource


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=10_000)
    parser.add_argument("--reads", type=int, default=2_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        k = np.arange(args.rows)
        table = pa.table({"instruction": [f"Instruction {i}: rewrite the sentence below." for i in k],
                          "input": [f"Some input text for row {i}, " * 4 for i in k],
                          "output": [f"The answer for row {i}." for i in k]})
        pq.write_table(table, path, row_group_size=args.group)
        print(f"{path.stat().st_size / 2**20:.1f} MiB, {args.rows} rows in groups of {args.group}")

        start = time.perf_counter()
        source = ParquetSource(path)
        print(f"open: {time.perf_counter() - start:.2f} s")
        orders = {"in order": np.arange(args.reads),
                  "shuffled": np.random.default_rng(0).permutation(args.rows)[:args.reads]}
        for name, indices in orders.items():
            start = time.perf_counter()
            for i in indices:
                source[int(i)]
            seconds = time.perf_counter() - start
            print(f"{name:>9}: {args.reads / seconds:10,.0f} records/s ({seconds / args.reads * 1e6:,.0f} us/record)")


if __name__ == "__main__":
    main()
