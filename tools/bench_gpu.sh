#!/usr/bin/env bash
# The GPU measurement of README "Speed", in one command from the repository root of a
# machine with an NVIDIA GPU and JAX for CUDA: the attention kernels' parity tests on the
# GPU itself, then tokens/s, TFLOP/s and MFU of configs/llama3_1b.py with each attention
# implementation on the same batches, and a profile of one step of each. Logs, figures
# (bench.json) and traces go to $OUT (default /tmp/bench_gpu); the table comes last.
#
#   bash tools/bench_gpu.sh [--steps 10] [--config.x=y ...]    # on the GPU machine
#   bash tools/bench_gpu.sh wheels [3.12 [x86_64|aarch64]]     # here: .whl/ for an offline one
#
# An offline machine whose Python has JAX, Flax, Optax, Orbax and transformers but not
# the rest of what the benchmark imports takes those from .whl/ (the second form, at the
# versions this checkout's .venv runs), installed into a folder of their own, not over its
# packages; a Python that has them all ignores .whl/. CONFIG, ATTENTION, VARIANTS (sets of
# config overrides, "model.x=y ...", ";" between sets, each measured after ATTENTION's),
# TESTS (pytest -k) and JAX_PLATFORMS (default cuda) change what runs; the tests run it on
# CPU with the smoke model.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/bench_gpu}
CONFIG=${CONFIG:-configs/llama3_1b.py}
# Not the reference xla: at 4k tokens it holds 8.6 GB of scores a layer, and it did not
# finish within a call's time on an H200 (ATTENTION=xla VARIANTS= measures it alone).
ATTENTION=${ATTENTION:-pallas_gpu,xla_chunked}
# pallas_gpu's backward tiles against JAX's 32 (its backward ran at 6x its forward on an
# H200): 64 everywhere, FlashAttention-2's shape (the pass's outer blocks 128, inner 64),
# 128 everywhere. q_dq must equal kv_dkv (models/attention.py).
B=model.attention_blocks
VARIANTS=${VARIANTS-"model.attention=pallas_gpu $B.q_dkv=64 $B.kv_dkv=64 $B.q_dq=64 $B.kv_dq=64;\
model.attention=pallas_gpu $B.q_dkv=64 $B.kv_dkv=128 $B.q_dq=128 $B.kv_dq=64;\
model.attention=pallas_gpu $B.q_dkv=128 $B.kv_dkv=128 $B.q_dq=128 $B.kv_dq=128"}
TESTS=${TESTS:-match_the_reference or attends_across or fully_padded or equal_xla}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
NEEDED="grain array-record portpicker ml-collections tensorboardX cloudpickle"  # what a JAX image may lack
MODULES=$(echo ${NEEDED//-/_} | tr " " ",")  # their import names

if [ "${1:-}" = wheels ]; then
  pins=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(*(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $NEEDED) || exit 1
  arch=${3:-x86_64}
  platforms=$(printf -- "--platform manylinux_2_%s_$arch " 17 24 27 28 31 34)
  rm -rf .whl  # one version of each: pip refuses two
  exec .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version "${2:-3.12}" \
    --implementation cp $platforms --platform "manylinux2014_$arch" -d .whl $pins
fi

mkdir -p "$OUT"
if ! $PY -c "import $MODULES" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv 2>&1 | tee "$OUT/machine.txt"
# flax.nnx and jit_tune's modules too: a Flax older than its JAX fails at `import flax.nnx`
# (flax 0.12.8 under jax 0.11.1 or later), where `import flax` still works.
if ! $PY -c "import jax, flax, optax, flax.nnx, $MODULES, jit_tune.train.step, jit_tune.models.attention
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
    >> "$OUT/machine.txt" 2>&1; then
  tail -n 5 "$OUT/machine.txt"
  echo "JAX cannot run on '$JAX_PLATFORMS' with $PY, or a package is missing or does not import under this JAX" \
    "(above; all of it in $OUT/machine.txt)"
  exit 2
fi
tail -n 1 "$OUT/machine.txt"

echo "== attention parity on $JAX_PLATFORMS (tests/test_attention.py -k '$TESTS')"
# Float32 products exact in the reference (XLA would use TF32 on a GPU) and in the Triton
# kernel (whose default precision is TF32 too).
JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest tests/test_attention.py -q -p no:cacheprovider -k "$TESTS" \
  > "$OUT/attention_tests.log" 2>&1
tests_rc=$?
echo "exit $tests_rc: $(tail -n 1 "$OUT/attention_tests.log")"

echo "== $CONFIG, attention $ATTENTION${VARIANTS:+, and variants: $VARIANTS}"
variants=()
IFS=";" read -r -a sets <<< "$VARIANTS"
for set in "${sets[@]}"; do [ -n "${set// }" ] && variants+=(--variant "$set"); done
# The batches are read before the first step, so worker processes would only add start-up.
$PY tools/bench_train_step.py --config "$CONFIG" --steps 10 --config.data.workers=0 --attention "$ATTENTION" \
  "${variants[@]}" --profile "$OUT/trace" --json "$OUT/bench.json" "$@" > "$OUT/bench.log" 2>&1
bench_rc=$?
# The figures and any error; each profile's top ops stay in bench.log.
grep -v -E -e "^ +[0-9.,]+ ms +[0-9.]+% " -e "^profile: " "$OUT/bench.log" | tail -n 80
echo "tests exit $tests_rc, benchmark exit $bench_rc; logs in $OUT"
exit $(( tests_rc || bench_rc ))
