"""One training step of the same Llama-style model in jit_tune and in PyTorch/transformers,
measured side by side in one run, their steps alternated, in float32 and in bf16 (jit_tune:
bf16 compute over f32 master weights; PyTorch: bf16 autocast over f32 weights), on this
machine's CPU.

    .venv/bin/python tools/bench_cpu_vs_torch.py [--steps 5] [--precisions float32 bfloat16] [--config.x=y ...]

The model is the one the performance issue names: 18.9M parameters, 8 layers, d 384, 6
query and 2 key-value heads of 64, SwiGLU 1024, vocab 8192, untied; batch 8 x 512 tokens
(one full segment per row, so both sides compute the same thing), AdamW. Both sides use
the same number of threads, one step of each in turn, so a VM whose speed drifts (10% and
more between runs here) slows both alike, and one process: PyTorch's side too runs with
the glibc settings jit_tune makes on a CPU (`distributed.keep_freed_host_memory`).
Prints the CPU and whether it has bfloat16 dot instructions (without them both sides
emulate bf16, PyTorch's autocast far more slowly), the median step time of each and the
ratio (PyTorch's time over jit_tune's: above 1 means jit_tune is faster). Needs the test
extra (torch).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from jit_tune.distributed import choose_platform
from jit_tune.models.dense import host_bf16_dots

MODEL = ["--config.model.vocab_size=8192", "--config.model.d_model=384", "--config.model.n_layers=8",
         "--config.model.n_heads=6", "--config.model.n_kv_heads=2", "--config.model.head_dim=64",
         "--config.model.mlp_dim=1024", "--config.data.seq_len=512", "--config.data.batch_size=8",
         "--config.optimizer.grad_clip=0.0", "--config.optimizer.warmup_steps=0"]


def jit_tune_step(precision: str, overrides: list[str]) -> tuple[Callable[[], None], int]:
    """A function that runs one jit_tune training step to completion, and the parameter count."""
    import jax
    import numpy as np

    from jit_tune import mesh as mesh_lib
    from jit_tune.config import load_config
    from jit_tune.train.state import create_model_and_optimizer
    from jit_tune.train.step import train_step

    config = load_config("configs/tiny.py", MODEL + [f"--config.model.dtype={precision}"] + overrides)
    mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
    model, optimizer = create_model_and_optimizer(config, mesh)
    params = sum(x.size for x in jax.tree.leaves(nnx_params(model)))
    rng = np.random.default_rng(0)
    b, length = config.data.batch_size, config.data.seq_len
    batch = {"inputs": rng.integers(0, 8192, (b, length)), "targets": rng.integers(0, 8192, (b, length)),
             "loss_mask": np.ones((b, length)), "segment_ids": np.ones((b, length)),
             "positions": np.broadcast_to(np.arange(length), (b, length))}
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}

    def step() -> None:
        with mesh_lib.use_mesh(config, mesh):
            float(train_step(model, optimizer, mesh_lib.global_batch(batch, mesh), 1, config.train.loss_chunk)["loss"])
    return step, params


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def torch_step(precision: str, threads: int) -> tuple[Callable[[], None], int]:
    """A function that runs one PyTorch training step, and the parameter count."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=8, num_attention_heads=6,
                                      num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                                      tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = torch.randint(0, 8192, (8, 512))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in model.parameters())


def alternated_times(steps: list[Callable[[], None]], n: int) -> list[list[float]]:
    """Each step's times over n rounds, one of each per round (after one untimed round:
    compilation, warm-up), so a machine whose speed drifts slows both sides alike."""
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(n + 1):
        for step, kept in zip(steps, times):
            start = time.perf_counter()
            step()
            if round_:
                kept.append(time.perf_counter() - start)
    return times


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` says: bf16 results depend on it."""
    try:
        names = re.findall(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
    choose_platform()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--jit-tune-only", action="store_true", help="skip PyTorch (to compare XLA flags)")
    args, overrides = parser.parse_known_args()
    threads = os.cpu_count() or 1
    print(f"machine: {cpu_model()}, {threads} cores, bfloat16 dot instructions: {host_bf16_dots()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    print(f"{'precision':<10} {'jit_tune s/step':>16} {'PyTorch s/step':>15} {'PyTorch / jit_tune':>19}")
    for precision in args.precisions:
        ours, n_ours = jit_tune_step(precision, overrides)
        if args.jit_tune_only:
            (times,) = alternated_times([ours], args.steps)
            print(f"{precision:<10} {statistics.median(times):>16.3f}", flush=True)
            continue
        theirs, n_theirs = torch_step(precision, threads)
        ours_s, theirs_s = alternated_times([ours, theirs], args.steps)
        a, b = statistics.median(ours_s), statistics.median(theirs_s)
        print(f"{precision:<10} {a:>16.3f} {b:>15.3f} {b / a:>18.2f}x   ({n_ours / 1e6:.1f}M / {n_theirs / 1e6:.1f}M "
              f"params; {8 * 512 / a:,.0f} vs {8 * 512 / b:,.0f} tokens/s)", flush=True)
        del ours, theirs  # both models, before the next precision builds its own


if __name__ == "__main__":
    main()
