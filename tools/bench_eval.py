"""Evaluation throughput: greedy generation, and rank classification packed against one
option per padded row, on the same model and the same examples, in one process.

    .venv/bin/python tools/bench_eval.py [--config configs/tiny.py] [--examples 128] [--config.x=y ...]

The model is the config's shape with random weights; the examples are built-in task
prompts rendered by the built-in tokenizer. Rank classification scores 4 options per
example (the task's answer and other tasks' answers for the same words). Each
measurement is compiled first, then timed as the best of --repeats runs; examples/s
counts host-side work (rendering excluded, packing included).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jit_tune import mesh as mesh_lib
from jit_tune.config import load_config
from jit_tune.data.builtin_tasks import TASKS, sample_words
from jit_tune.data.render import prompt_ids, tokenize_conversation
from jit_tune.data.tokenizer import train_builtin_tokenizer
from jit_tune.distributed import choose_platform
from jit_tune.eval.decode import generate
from jit_tune.eval.scoring import pack_sequences, sequence_logliks
from jit_tune.models.decoder import Decoder
from jit_tune.train.state import decoder_config

OPTIONS = 4


def examples(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """(prompt, options) pairs, the right answer first, cycling through the tasks."""
    out = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        words = sample_words(np.random.default_rng([seed, i]))
        prompt = task.templates[i // len(TASKS) % len(task.templates)].format(words=" ".join(words))
        answers = dict.fromkeys([task.answer(words)] + [t.answer(words) for t in TASKS if t is not task])
        out.append((prompt, list(answers)[:OPTIONS]))
    return out


def cpu_name() -> str:
    """platform.processor(), or on Linux (where that is often empty) /proc/cpuinfo's model name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return platform.processor() or (names[0] if names else platform.machine())


def best_time(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    choose_platform()  # no libtpu probing on a machine without TPUs
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="generation prompts per call")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rows", type=int, default=32, help="scoring rows per call")
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args()
    config = load_config(args.config, overrides)
    tokenizer = train_builtin_tokenizer(config.data.tokenizer_vocab_size, config.data.builtin_seed)
    data = examples(args.examples, config.data.builtin_seed)
    user = [[{"role": "user", "content": prompt}] for prompt, _ in data]
    prompts = [prompt_ids(tokenizer, messages) for messages in user]
    sequences = [tokenize_conversation(tokenizer, messages + [{"role": "assistant", "content": option}],
                                       "last_assistant")
                 for messages, (_, options) in zip(user, data) for option in options]
    seq_len = config.data.seq_len

    mesh = mesh_lib.make_mesh(config)
    with mesh_lib.use_mesh(config, mesh):
        model = nnx.jit(lambda: Decoder(decoder_config(config), rngs=nnx.Rngs(config.seed)))()
        # eos -1: every prompt gets all new tokens, so the work does not depend on the weights.
        seconds = {"generation": best_time(lambda: generate(model, prompts, args.new_tokens, -1,
                                                             tokenizer.pad_token_id, args.batch), args.repeats)}
        for name, packed in (("packed", True), ("unpacked", False)):
            seconds[name] = best_time(lambda p=packed: sequence_logliks(model, sequences, seq_len, args.rows, p),
                                      args.repeats)
        packed_scores = sequence_logliks(model, sequences, seq_len, args.rows)[0]
        unpacked_scores = sequence_logliks(model, sequences, seq_len, args.rows, packed=False)[0]

    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    lengths = [len(ids) - 1 for ids, _ in sequences]
    rows = {"packed": len(pack_sequences(lengths, seq_len)), "unpacked": len(sequences)}
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}: {jax.devices()}")
    print(f"model: {' '.join([args.config, *overrides])}, {n_params / 1e6:.2f}M params, random weights; "
          f"{args.examples} examples, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    print(f"{'measurement':<58} {'examples/s':>10} {'seconds':>8}")
    print(f"{f'generation (greedy, {args.new_tokens} new tokens, batch {args.batch})':<58} "
          f"{args.examples / seconds['generation']:>10.1f} {seconds['generation']:>8.3f}")
    for name in ("packed", "unpacked"):
        label = f"rank classification, {OPTIONS} options, {name} ({rows[name]} rows)"
        print(f"{label:<58} {args.examples / seconds[name]:>10.1f} {seconds[name]:>8.3f}")
    print(f"packed / unpacked: {seconds['unpacked'] / seconds['packed']:.2f}x examples/s "
          f"(rows of {seq_len}, {args.rows} per call; "
          f"max |score difference| {np.abs(packed_scores - unpacked_scores).max():.1e})")


if __name__ == "__main__":
    main()
