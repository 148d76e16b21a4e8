"""Packing efficiency on the T0 sample: jit_tune's packer against Grain's own packers and
naive one-example-per-row padding, same data and tokenizer.

    .venv/bin/python tools/bench_packing.py [--seq-len 2048] [--vocab 32000] [--data ../shared/data/t0_train]

Tokenizes every T0 example once (a byte-level BPE trained on the same data, the chat
template's loss mask, responses kept by left-cut truncation), shuffles them once, then
packs the same stream with each packer and prints the share of real (non-padding) tokens, rows, and
examples per second; the lower bound is total tokens / row length.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import grain
import numpy as np
from grain.experimental import BestFitPackIterDataset, FirstFitPackIterDataset

from jit_tune.config import default_config
from jit_tune.data.formats import to_conversation
from jit_tune.data.pipeline import FEATURES, encode, pack, truncate
from jit_tune.data.sources import open_source, task_directory
from jit_tune.data.tokenizer import train_bpe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/t0_train"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    records = [
        to_conversation(source[i], "t0")
        for templates in task_directory(args.data).values()
        for path in templates.values()
        for source in [open_source(str(path))]
        for i in range(len(source))
    ]
    start = time.perf_counter()
    tokenizer = train_bpe((m["content"] for r in records for m in r["messages"]), args.vocab)
    print(f"{len(records):,} examples; BPE {len(tokenizer):,} tokens trained in {time.perf_counter() - start:.0f} s")
    features = [encode(r, tokenizer, "all_assistant") for r in records]
    longer = sum(len(f["inputs"]) > args.seq_len for f in features)
    features = [f for f in (truncate(f, args.seq_len, "left") for f in features) if f is not None]
    # Shuffled, as the training mixture is: files come grouped by task, lengths with them.
    features = [features[i] for i in np.random.default_rng(0).permutation(len(features))]
    tokens = sum(len(f["inputs"]) for f in features)
    bound = math.ceil(tokens / args.seq_len)
    print(f"{longer / len(records):.1%} longer than {args.seq_len}; {len(features):,} kept; {tokens:,} tokens; "
          f"lower bound {bound:,} rows")
    print(f"{'packer':<30} {'real tokens':>11} {'rows':>7} {'examples/s':>11}")
    print(f"{'naive (1 per row)':<30} {tokens / (len(features) * args.seq_len):>11.2%} {len(features):>7,} {'-':>11}")

    lengths = {k: args.seq_len for k in FEATURES}
    default = default_config()
    default.data.seq_len = args.seq_len

    def grain_packer(packer, bins):
        return lambda ds: packer(ds, length_struct=lengths, num_packing_bins=bins, shuffle_bins=False)

    packers = [(f"grain first-fit {bins}", grain_packer(FirstFitPackIterDataset, bins)) for bins in (8, 64, 256, 1024)]
    packers += [(f"grain best-fit {bins}", grain_packer(BestFitPackIterDataset, bins)) for bins in (64, 256, 1024)]
    packers += [(f"jit_tune default ({default.data.packing} {default.data.packing_bins})",
                 lambda ds: pack(ds, default))]
    for name, packer in packers:
        stream = packer(grain.MapDataset.source(features).to_iter_dataset())
        start = time.perf_counter()
        rows = real = 0
        for row in stream:
            rows += 1
            real += int((row["inputs_segment_ids"] > 0).sum())
        seconds = time.perf_counter() - start
        assert real == tokens
        print(f"{name:<30} {real / (rows * args.seq_len):>11.2%} {rows:>7,} {len(features) / seconds:>11,.0f}")
    print(f"{'lower bound':<30} {tokens / (bound * args.seq_len):>11.2%} {bound:>7,}")


if __name__ == "__main__":
    main()
