"""Model FLOPs (what MFU divides) agree with XLA's count of the same train step, and the
loop logs throughput, TFLOP/s per device and per-task losses."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jit_tune.flops import peak_flops_per_device, training_flops_per_token
from jit_tune.models.decoder import Decoder, DecoderConfig
from jit_tune.train.metrics import Throughput
from jit_tune.train.step import summed_loss_and_grads

from tests.test_loss import one_device, packed_batch

REPO = Path(__file__).resolve().parents[1]

# Matmul-heavy: norms, softmax and the rest are a few percent of the FLOPs.
BIG_MATMULS = DecoderConfig(vocab_size=2048, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                            mlp_dim=1024)


def xla_flops(config: DecoderConfig, rows: int, length: int) -> float:
    with nnx.use_eager_sharding(False):
        model = Decoder(config, nnx.Rngs(0))
    batch = packed_batch(rows, length, config.vocab_size)
    step = nnx.jit(summed_loss_and_grads, static_argnames=("microbatches", "loss_chunk", "num_tasks"))
    with one_device():
        return step.lower(model, batch, 1, 0, 0).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("length", [64, 512])
def test_model_flops_agree_with_xla_within_its_uncounted_work(length):
    """XLA computes the whole causal score matrix where the model count halves it; the
    elementwise work is the rest. Both lengths: attention a small and a large share."""
    rows = 4
    model = training_flops_per_token(BIG_MATMULS, length) * rows * length
    full_attention = 6.0 * BIG_MATMULS.n_layers * BIG_MATMULS.n_heads * BIG_MATMULS.head_dim * length * rows * length
    xla = xla_flops(BIG_MATMULS, rows, length)
    assert 1.0 <= xla / (model + full_attention) < 1.08, (xla, model, full_attention)


def test_sliding_layers_count_their_window_only():
    full = training_flops_per_token(BIG_MATMULS, 1024)
    sliding = dataclasses.replace(BIG_MATMULS, sliding_window=128, layer_types=("sliding", "full"))
    attention_per_key = 6.0 * BIG_MATMULS.n_heads * BIG_MATMULS.head_dim
    assert full - training_flops_per_token(sliding, 1024) == pytest.approx(attention_per_key * (1024 - 128))


@pytest.mark.parametrize("kind, tflops", [("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459), ("TPU v5p", 459),
                                          ("TPU v6 lite", 918), ("NVIDIA H100 80GB HBM3", 989),
                                          ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("cpu", None), ("TPU v7x", None)])
def test_peak_flops_by_device_kind(kind, tflops):
    assert peak_flops_per_device(kind) == (tflops and tflops * 1e12)


def test_throughput_reports_padded_tokens_tflops_and_mfu():
    now = [0.0]
    throughput = Throughput(clock=lambda: now[0], flops_per_token=1e9, devices=4, peak_flops=1e12)
    for _ in range(2):  # two steps of 2,000 slots, 1,500 of them real, 1 s each
        now[0] += 1.0
        throughput.add(1500, 2000)
    values = throughput.take_values()
    assert values == pytest.approx({"tokens_per_sec": 1500, "tokens_per_sec_padded": 2000,
                                    "tflops_per_device": 0.5, "mfu": 0.5})
    assert "mfu" not in Throughput(flops_per_token=1e9).take_values()  # no known peak (a CPU): no MFU


def test_a_run_logs_speed_and_each_tasks_loss(tmp_path):
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.train.steps=3",
                 "--config.train.log_every=1"]) == 0
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [1, 2, 3]
    for line in logged[1:]:  # the first step's time is compilation: no speed
        assert line["tokens_per_sec_padded"] >= line["tokens_per_sec"] > 0 and line["tflops_per_device"] > 0
        assert "mfu" not in line  # a CPU has no peak to divide by
    for line in logged:
        tasks = [k.removeprefix("train/tokens/") for k in line if k.startswith("train/tokens/")]
        tokens = np.array([line[f"train/tokens/{t}"] for t in tasks])
        assert len(tasks) > 1 and tokens.sum() == line["trained_tokens"]
        losses = np.array([line.get(f"train/loss/{t}", 0.0) for t in tasks])
        assert all(np.isfinite(losses)) and all((losses > 0) == (tokens > 0))
        # Each task's mean loss, weighted by its tokens, is the step's loss.
        assert (losses * tokens).sum() / tokens.sum() == pytest.approx(line["loss"], rel=1e-5)


def _bench_train_step(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "tools/bench_train_step.py", "--config", "configs/tiny.py:smoke", *args],
                          cwd=REPO, env={**env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=600)


def _refuses_a_448_gib_allocation() -> bool:
    """Whether this host's kernel refuses one 448 GiB allocation outright: heuristic or
    strict overcommit and less memory plus swap than that."""
    try:
        overcommit = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
        meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        return False
    kib = sum(int(meminfo[k].split()[0]) for k in ("MemTotal", "SwapTotal"))
    return overcommit in ("0", "2") and kib < 400 * 2**20


@pytest.mark.slow
@pytest.mark.skipif(not _refuses_a_448_gib_allocation(), reason="this host may grant 448 GiB (overcommit or memory)")
def test_an_attention_that_runs_out_of_memory_is_reported_with_its_error(tmp_path):
    """The reference attention's [B, K, G, L, S] scores at 65,536 tokens (448 GiB): a real
    allocation failure, reported by name with its error in the output, the table and the
    JSON, and the exit code is 1. (Every implementation is quadratic in L on a CPU, so no
    second one is measured after it here: that would take minutes.)"""
    out = _bench_train_step("--steps", "1", "--attention", "xla", "--config.data.seq_len=65536",
                            "--config.data.batch_size=1", "--config.data.packing_bins=1",
                            "--json", str(tmp_path / "bench.json"))
    assert out.returncode == 1, out.stderr[-3000:]
    assert "== attention: xla\nfailed: out of device memory (RESOURCE_EXHAUSTED: Out of memory" in out.stdout
    assert "Traceback" in out.stderr  # where it failed, for whoever reads the log
    (failed,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert failed["attention"] == "xla" and failed["error"].startswith("out of device memory (RESOURCE_EXHAUSTED")
    assert out.stdout.split("attention ")[-1].splitlines()[1].split()[:2] == ["xla", "failed:"]


@pytest.mark.parametrize("args, message", [
    (["--attention", "xla_tiled,flash"], "config.model.attention = 'flash': expected auto, xla,"),
    (["--steps", "0"], "--steps 0: expected 1 or more timed steps"),
    (["--variant", "model.attention_blocks.q=48"], "config.model.attention_blocks.q = 48: expected 0"),
    (["--attention", "xla_tiled", "--variant", "model.remat=full --config.data.batch_size=2"],
     "--variant 'model.remat=full data.batch_size=2' changes config.data: every case trains on the same batches"),
])
def test_the_step_benchmark_refuses_bad_arguments_before_reading_data(args, message):
    out = _bench_train_step(*args)
    assert out.returncode != 0 and message in out.stderr
    assert "pipeline" not in out.stdout


@pytest.mark.skipif(any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)),
                    reason="JAX for CUDA is installed here")
def test_the_gpu_measurement_stops_first_where_jax_has_no_such_device(tmp_path):
    """JAX_PLATFORMS=cuda on a machine without one: a clear stop before any test or
    benchmark runs, exit code 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(OUT=str(tmp_path), JAX_PLATFORMS="cuda", PYTHON=sys.executable)
    out = subprocess.run(["bash", "tools/bench_gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"JAX cannot run on 'cuda' with {sys.executable}" in out.stdout
    assert not (tmp_path / "attention_tests.log").exists() and not (tmp_path / "bench.log").exists()


def test_the_gpu_measurement_runs_the_parity_tests_then_each_attention_with_a_profile(tmp_path):
    """tools/bench_gpu.sh as on a GPU machine, on CPU with the smoke model: the parity
    tests it selects, then tools/bench_train_step.py on each implementation and each
    variant (the same batches), with a trace of one more step of each and its top ops.
    Logs, figures and traces land in $OUT; the table of implementations ends the output."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(OUT=str(tmp_path), CONFIG="configs/tiny.py:smoke", ATTENTION="xla_tiled",
               VARIANTS="model.attention=xla_chunked; model.remat=full train.loss_chunk=16",
               TESTS="catches_a_leak", JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    out = subprocess.run(["bash", "tools/bench_gpu.sh", "--steps", "2"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed" in (tmp_path / "attention_tests.log").read_text()
    assert f"jax {jax_version()}" in (tmp_path / "machine.txt").read_text()
    report = json.loads((tmp_path / "bench.json").read_text())
    cases = [(r["attention"], r["variant"]) for r in report["results"]]
    assert cases == [("xla_tiled", ""), ("xla_chunked", ""), ("auto", "model.remat=full train.loss_chunk=16")]
    for r in report["results"]:
        assert r["step_s"] > 0 and r["tokens_per_sec"] == pytest.approx(report["real_tokens_per_step"] / r["step_s"])
        assert "mfu" not in r  # no peak for a CPU
    rows = out.stdout.split("attention ")[-1].splitlines()
    assert [row.rsplit(None, 4)[0] for row in rows[1:4]] == [  # each label, then four figures
        "xla_tiled", "xla_chunked", "auto (xla_tiled) remat=full,loss_chunk=16"]
    assert [float(row.split()[-3].replace(",", "")) for row in rows[1:4]] == pytest.approx(
        [r["tokens_per_sec"] for r in report["results"]], abs=1)
    assert rows[4].startswith("tests exit 0, benchmark exit 0")
    log = (tmp_path / "bench.log").read_text()
    for name in ("xla_tiled", "xla_chunked", "auto_xla_tiled_remat_full_loss_chunk_16"):
        trace = tmp_path / "trace" / name
        assert list(trace.rglob("*.trace.json.gz")) and list(trace.rglob("*.xplane.pb"))
        ops = log.split(f"profile: {trace} (host ops, ")[1].split("\n\n")[0].splitlines()[1:]
        assert len(ops) >= 5 and all(line.split()[1] == "ms" and "::" not in line for line in ops)
        shares = [float(line.split()[2].rstrip("%")) for line in ops]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01


@pytest.mark.slow
def test_a_profiler_that_fails_costs_the_step_figures_nothing(tmp_path, capsys):
    """The benchmark's figures stand when the profiler cannot trace (here another trace
    is running) or its trace cannot be read; each says so in one line."""
    import jax

    from jit_tune.config import load_config

    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "tools" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = load_config("configs/tiny.py:smoke")
    local = [packed_batch(rows=config.data.batch_size, length=config.data.seq_len, vocab=97, seed=i)
             for i in range(3)]
    result, profiled_step = bench.measure(config, local, 1)
    assert result["step_s"] > 0
    jax.profiler.start_trace(str(tmp_path / "another"))
    try:
        failed = profiled_step(tmp_path / "trace")
    finally:
        jax.profiler.stop_trace()
    assert failed["profile_error"].startswith("RuntimeError: ")
    bench.print_profile(failed, tmp_path / "trace")
    assert f"profile: failed: {failed['profile_error']}" in capsys.readouterr().out
    bench.print_profile({}, tmp_path / "no_trace_here")
    assert f"profile: {tmp_path / 'no_trace_here'} could not be summarized: ValueError" in capsys.readouterr().out


def test_the_step_figures_are_written_before_the_profile_runs(tmp_path, monkeypatch):
    """A run killed while it profiles (a GPU call at its time limit) keeps each
    implementation's figures: bench.json has them before the profiled step starts."""
    import jax

    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "tools" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = []

    def killed(directory, **_):
        seen.append(json.loads((tmp_path / "bench.json").read_text()))
        raise KeyboardInterrupt  # as a kill at this moment would end the run

    monkeypatch.setattr(jax.profiler, "trace", killed)
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--config", "configs/tiny.py:smoke", "--steps", "1",
                                      "--json", str(tmp_path / "bench.json"), "--profile", str(tmp_path / "trace")])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    [result] = seen[0]["results"]
    assert result["step_s"] > 0 and result["tokens_per_sec"] > 0 and result["compile_s"] > 0


def jax_version() -> str:
    import jax

    return jax.__version__


def test_the_gpu_benchmark_config_is_llama_3_2_1b_shaped():
    from jit_tune.config import load_config
    from jit_tune.flops import training_flops_per_token
    from jit_tune.train.state import decoder_config

    config = load_config("configs/llama3_1b.py")
    model = decoder_config(config)
    n = (model.vocab_size * model.d_model  # tied embeddings
         + model.n_layers * (model.d_model * model.head_dim * (model.n_heads * 2 + model.n_kv_heads * 2)
                             + 3 * model.d_model * model.mlp_dim + 2 * model.d_model) + model.d_model)
    assert round(n / 1e6) == 1236  # Llama-3.2-1B: 1.24B parameters
    assert (config.data.seq_len, config.model.dtype) == (4096, "bfloat16")
    assert training_flops_per_token(model, 4096) > 6 * n  # attention counted on top


def test_a_window_of_the_first_step_alone_reports_no_speed_rather_than_zero(tmp_path):
    """log_every=1: the first step's window holds only its compilation (restarted), so its
    line and metrics.jsonl say nothing of speed; the next steps' do."""
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir),
                 "--config.train.log_every=1", "--config.eval.examples_per_task=1"]) == 0
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in logged if "loss" in line]
    assert steps[0]["step"] == 1 and "tokens_per_sec" not in steps[0] and "tflops_per_device" not in steps[0]
    assert all(line["tokens_per_sec"] > 0 and line["tflops_per_device"] > 0 for line in steps[1:])
    # Each window times its one step, whatever ran beside it: when logging was left out of
    # the windows, the step computing meanwhile was too, and one run's windows ranged
    # from 6k to 8M tokens/s.
    speeds = [line["tokens_per_sec_padded"] for line in steps[1:]]
    assert max(speeds) < 20 * min(speeds), speeds


@pytest.mark.parametrize("tool, args, message", [
    ("bench_generate.py", ["--hidden", "64"], "--hidden 64: expected a positive multiple of 256"),
])
def test_benchmark_tools_refuse_shapes_they_cannot_build(tool, args, message):
    out = subprocess.run([sys.executable, f"tools/{tool}", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 2 and message in out.stderr


@pytest.mark.parametrize("tool", ["bench_cpu_vs_torch.py", "bench_smollm2.py"])
def test_benchmark_tools_describe_themselves_in_whole_sentences(tool):
    out = subprocess.run([sys.executable, f"tools/{tool}", "--help"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}, timeout=300)
    description = out.stdout.split("\n\n")[1]
    assert out.returncode == 0 and description.rstrip().endswith(".")  # not cut at the docstring's first line
