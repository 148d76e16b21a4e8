"""Throughput of the jitted train step and of the data pipeline, for a config.

    .venv/bin/python tools/bench_train_step.py --config configs/tiny.py [--steps 20] [--config.x=y ...]
        [--attention xla_tiled,xla_chunked] [--variant "x.y=z ..."]... [--profile DIR] [--json FILE]

Prints compile time, steady-state step time, tokens/s (non-padding tokens), TFLOP/s per
device and MFU (model FLOPs of every token slot, jit_tune/flops.py; MFU on accelerators
with a known peak), and the pipeline's own tokens/s, measured in the same process on the
same batches. `--attention` measures several implementations one after another on the
same batches (one model at a time) and ends with a table of them; each `--variant`, a
set of config overrides written as --config's without the prefix
("model.attention_blocks.q_dkv=64 ..."; the batches' config.data must not change), is
measured after them the same way. One that fails (say, out of device memory) is
reported with its error and the others still run, and the exit code is then 1. With
`--profile DIR`, one more step of each runs under the JAX profiler: its trace goes to
DIR/<case> (its label in the table, "_" for spaces and signs; DIR itself for a single
plain run; open it in Perfetto or XProf) and the ops that took the most time are
printed, summed by name (on an accelerator, its kernels). `--json FILE` writes the
figures, after each case.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import gzip
import json
import re
import sys
import time
import traceback
from pathlib import Path

import jax
from flax import nnx

from jit_tune import mesh as mesh_lib
from jit_tune.config import load_config
from jit_tune.data.pipeline import train_dataset
from jit_tune.data.registry import build_registry
from jit_tune.data.tokenizer import train_builtin_tokenizer
from jit_tune.distributed import choose_platform
from jit_tune.flops import peak_flops_per_device, training_flops_per_token
from jit_tune.models.attention import resolve
from jit_tune.train.state import create_model_and_optimizer, decoder_config
from jit_tune.train.step import train_step


def main() -> None:
    choose_platform()  # no libtpu probing on a machine without TPUs
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attention", help="comma-separated model.attention values to measure in turn")
    parser.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                        help="space-separated config overrides, x.y=z, measured as one more case (repeatable)")
    parser.add_argument("--profile", metavar="DIR", help="trace one more step into DIR and print its top ops")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    args, overrides = parser.parse_known_args()
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: expected 1 or more timed steps")
    names = [n.strip() for n in args.attention.split(",") if n.strip()] if args.attention else []
    cases = [[f"--config.model.attention={n}"] for n in names] + [
        [f"--config.{o.removeprefix('--config.')}" for o in v.split()] for v in args.variant]
    # Every config is loaded (and validated) before any data is read.
    configs = [(load_config(args.config, overrides + case), variant_name(case)) for case in cases or [[]]]
    config = configs[0][0]
    for other, variant in configs[1:]:
        if other.data != config.data:
            parser.error(f"--variant {variant!r} changes config.data: every case trains on the same batches "
                         "(measure other data settings in a run of their own)")
    tokenizer = train_builtin_tokenizer(config.data.tokenizer_vocab_size, config.data.builtin_seed)
    batches = iter(train_dataset(config, tokenizer, build_registry(config)))

    start = time.perf_counter()
    local = [next(batches) for _ in range(args.steps + 1 + bool(args.profile))]
    pipeline_s = time.perf_counter() - start
    real = [int((b["segment_ids"] > 0).sum()) for b in local]
    tokens = sum(real[1:args.steps + 1]) / args.steps  # of a timed step

    d = config.data
    report = {"config": args.config, "overrides": overrides, "device": jax.devices()[0].device_kind,
              "devices": jax.device_count(), "jax": jax.__version__, "batch": [d.batch_size, d.seq_len],
              "steps": args.steps, "real_tokens_per_step": tokens,
              # Start-up included: the packer fills data.packing_bins rows before the first
              # leaves (tools/bench_pipeline.py measures the steady state).
              "pipeline_tokens_per_sec": sum(real) / pipeline_s, "results": []}
    print(f"devices: {report['devices']} x {report['device']}; jax {jax.__version__}")
    print(f"batch: {d.batch_size} x {d.seq_len}, real tokens/step: {tokens:,.0f}")
    print(f"pipeline (read, render, tokenize, pack, batch; with start-up): "
          f"{report['pipeline_tokens_per_sec']:,.0f} tokens/s")

    def write_json() -> None:  # after each figure, so a crash keeps what was measured
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    for config, variant in configs:
        name = config.model.attention
        result = {"attention": name, "implementation": resolve(name, config.model), "variant": variant}
        case = re.sub(r"[^\w.-]+", "_", label(result)).strip("_")  # a folder's name
        profile = args.profile and (Path(args.profile) / case if cases else Path(args.profile))
        print(f"\n== attention: {label(result)}", flush=True)
        report["results"].append(result)
        try:
            measured, profiled_step = measure(config, local, args.steps)
            result.update(measured, tokens_per_sec=tokens / measured["step_s"])
            # Out before the profile, which can take minutes: a run killed then keeps them.
            print_figures(result)
            write_json()
            if profile:
                result.update(profiled_step(profile))
                print_profile(result, profile)
        except Exception as e:  # noqa: BLE001: one implementation's failure must not cost the others' figures
            traceback.print_exc()
            line = first_line(e)
            oom = "RESOURCE_EXHAUSTED" in line
            result["error"] = f"out of device memory ({line})" if oom else f"{type(e).__name__}: {line}"
            print(f"failed: {result['error']}")
        finally:
            profiled_step = None  # holds the model
            gc.collect()  # the last model's buffers, before the next one's
        write_json()
    if cases:
        print_table(report["results"])
    sys.exit(1 if any("error" in r for r in report["results"]) else 0)


def first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0][:300]


def variant_name(overrides: list[str]) -> str:
    """A case's overrides but the attention's: "model.attention_blocks.q_dkv=64 ..."."""
    return " ".join(o.removeprefix("--config.") for o in overrides if not o.startswith("--config.model.attention="))


def label(result: dict) -> str:
    """The attention as asked for, what "auto" resolved to, and the variant's overrides by
    their last names ("q_dkv=64,kv_dkv=128")."""
    name = result["attention"]
    short = ",".join(f"{key.rsplit('.', 1)[-1]}={value}"
                     for key, _, value in (o.partition("=") for o in result.get("variant", "").split()))
    return name + (f" ({result['implementation']})" if name == "auto" else "") + (f" {short}" if short else "")


def print_figures(result: dict) -> None:
    print(f"params: {result['params'] / 1e6:.2f}M")
    print(f"compile + first step: {result['compile_s']:.1f} s")
    print(f"train step: {result['step_s'] * 1e3:.0f} ms, {result['tokens_per_sec']:,.0f} tokens/s")
    print(f"model FLOPs: {result['tflops_per_device']:.2f} TFLOP/s per device"
          + (f", MFU {result['mfu']:.1%}" if "mfu" in result else ""), flush=True)


def print_profile(result: dict, profile: Path) -> None:
    if "profile_error" in result:
        print(f"profile: failed: {result['profile_error']}")
    else:
        try:
            print_top_ops(profile)
        except Exception as e:  # noqa: BLE001: a trace that cannot be read costs only its summary
            print(f"profile: {profile} could not be summarized: {type(e).__name__}: {e}")


def print_table(results: list[dict]) -> None:
    width = max(24, *(len(label(r)) for r in results))
    print(f"\n{'attention':{width}s} {'step ms':>9s} {'tokens/s':>11s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for r in results:
        name = label(r)
        if "error" in r:
            print(f"{name:{width}s} failed: {r['error'][:120]}")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(f"{name:{width}s} {r['step_s'] * 1e3:9.0f} {r['tokens_per_sec']:11,.0f} {r['tflops_per_device']:8.2f} "
              f"{mfu:>6s}")


def measure(config, local: list[dict], steps: int):
    """Compile time, steady-state step time, TFLOP/s per device and MFU (where the peak is
    known) of one model with `config` on the batches `local` (the first compiles); and a
    function that traces one more step into a folder (its result: {} or the profiler's
    error)."""
    mesh = mesh_lib.make_mesh(config)
    model, optimizer = create_model_and_optimizer(config, mesh)
    result = {"params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))}
    step = functools.partial(train_step, microbatches=config.train.microbatches, loss_chunk=config.train.loss_chunk)
    with mesh_lib.use_mesh(config, mesh):
        start = time.perf_counter()
        jax.block_until_ready(step(model, optimizer, mesh_lib.global_batch(local[0], mesh)))
        result["compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for batch in local[1:steps + 1]:
            metrics = step(model, optimizer, mesh_lib.global_batch(batch, mesh))
        jax.block_until_ready(metrics)
        result["step_s"] = (time.perf_counter() - start) / steps
    d = config.data
    flops = training_flops_per_token(decoder_config(config), d.seq_len) * d.batch_size * d.seq_len
    result["tflops_per_device"] = flops / result["step_s"] / jax.device_count() / 1e12
    peak = peak_flops_per_device(jax.devices()[0].device_kind)
    if peak:
        result["mfu"] = result["tflops_per_device"] * 1e12 / peak

    def profiled_step(directory: Path) -> dict:
        try:  # the figures stand whether or not the profiler works here
            with mesh_lib.use_mesh(config, mesh), jax.profiler.trace(str(directory), create_perfetto_trace=True):
                jax.block_until_ready(step(model, optimizer, mesh_lib.global_batch(local[-1], mesh)))
            return {}
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            return {"profile_error": f"{type(e).__name__}: {first_line(e)}"}

    return result, profiled_step


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
