"""Throughput of the jitted train step and of the data pipeline, for a config.

    .venv/bin/python tools/bench_train_step.py --config configs/tiny.py [--steps 20] [--config.x=y ...]

Prints compile time, steady-state step time, tokens/s (non-padding tokens), TFLOP/s per
device and MFU (model FLOPs of every token slot, jit_tune/flops.py; MFU on accelerators
with a known peak), and the pipeline's own tokens/s, measured in the same process on the
same batches. With `--profile DIR`, one more step runs under the JAX profiler: its trace
goes to DIR (open it in Perfetto or XProf) and the ops that took the most time are
printed, summed by name (on an accelerator, its kernels).
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import time
from pathlib import Path

import jax

from jit_tune import mesh as mesh_lib
from jit_tune.config import load_config
from jit_tune.data.pipeline import train_dataset
from jit_tune.data.registry import build_registry
from jit_tune.data.tokenizer import train_builtin_tokenizer
from jit_tune.distributed import choose_platform
from jit_tune.flops import peak_flops_per_device, training_flops_per_token
from jit_tune.train.state import create_model_and_optimizer, decoder_config
from jit_tune.train.step import train_step


def main() -> None:
    choose_platform()  # no libtpu probing on a machine without TPUs
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", metavar="DIR", help="trace one more step into DIR and print its top ops")
    args, overrides = parser.parse_known_args()
    config = load_config(args.config, overrides)
    tokenizer = train_builtin_tokenizer(config.data.tokenizer_vocab_size, config.data.builtin_seed)
    batches = iter(train_dataset(config, tokenizer, build_registry(config)))

    start = time.perf_counter()
    local = [next(batches) for _ in range(args.steps + 1 + bool(args.profile))]
    pipeline_s = time.perf_counter() - start
    tokens = [int((b["segment_ids"] > 0).sum()) for b in local[:args.steps + 1]]

    mesh = mesh_lib.make_mesh(config)
    model, optimizer = create_model_and_optimizer(config, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(model))
    with mesh_lib.use_mesh(config, mesh):
        start = time.perf_counter()
        step = functools.partial(train_step, microbatches=config.train.microbatches,
                                 loss_chunk=config.train.loss_chunk)
        jax.block_until_ready(step(model, optimizer, mesh_lib.global_batch(local[0], mesh)))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for batch in local[1:args.steps + 1]:
            metrics = step(model, optimizer, mesh_lib.global_batch(batch, mesh))
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - start) / args.steps
        if args.profile:
            with jax.profiler.trace(args.profile, create_perfetto_trace=True):
                jax.block_until_ready(step(model, optimizer, mesh_lib.global_batch(local[-1], mesh)))

    d = config.data
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; params: {n_params / 1e6:.2f}M")
    print(f"batch: {d.batch_size} x {d.seq_len}, real tokens/step: {sum(tokens[1:]) / args.steps:,.0f}")
    print(f"compile + first step: {compile_s:.1f} s")
    print(f"train step: {step_s * 1e3:.0f} ms, {sum(tokens[1:]) / args.steps / step_s:,.0f} tokens/s")
    flops = training_flops_per_token(decoder_config(config), d.seq_len) * d.batch_size * d.seq_len / step_s
    flops /= jax.device_count()
    peak = peak_flops_per_device(jax.devices()[0].device_kind)
    print(f"model FLOPs: {flops / 1e12:.2f} TFLOP/s per device" + (f", MFU {flops / peak:.1%}" if peak else ""))
    print(f"pipeline (read, render, tokenize, pack, batch): {sum(tokens) / pipeline_s:,.0f} tokens/s")
    if args.profile:
        print_top_ops(Path(args.profile))


def print_top_ops(directory: Path, top: int = 15) -> None:
    """The traced step's ops with the most time, summed by name: the device's (its
    kernels) where the trace has a device, else the host's XLA ops (not the Python
    frames, nor the runtime's spans that enclose the ops, "Class::Method")."""
    trace = json.loads(gzip.open(max(directory.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)).read())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name.upper()}
    totals = collections.Counter()
    for e in (e for e in events if e.get("ph") == "X" and "name" in e):
        host_op = not devices and not e["name"].startswith("$") and "::" not in e["name"] and "(" not in e["name"]
        if e["pid"] in devices or host_op:
            totals[e["name"]] += e.get("dur", 0)
    whole = sum(totals.values()) or 1
    print(f"profile: {directory} ({'device' if devices else 'host'} ops, {whole / 1e3:,.1f} ms in all)")
    for name, micros in totals.most_common(top):
        print(f"  {micros / 1e3:9.2f} ms  {micros / whole:6.1%}  {name[:100]}")


if __name__ == "__main__":
    main()
