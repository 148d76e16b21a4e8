"""models/dense.py: the product of activations and weights equals the einsum it replaces,
values and gradients, in float32 and in bfloat16, by every CPU path (float32's weight
gradient from a transposed copy; in bfloat16, the hand-written backward of CPUs with
bfloat16 dots, and float32's path on upcast operands elsewhere), whatever CPU runs the
tests; row_major is the transpose it stands for; the CPU's bfloat16 dots are read from
its cpuinfo."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jit_tune.models import dense as dense_module
from jit_tune.models.dense import dense, host_bf16_dots, row_major

CASES = [  # (einsum, x shape, w shape, n_in): the decoder's projections
    ("bld,df->blf", (2, 6, 8), (8, 12), 1),
    ("bld,dnh->blnh", (2, 6, 8), (8, 3, 4), 1),
    ("blnh,nhd->bld", (2, 6, 3, 4), (3, 4, 8), 2),
]


@pytest.fixture(params=[True, False], ids=["bf16-dots", "no-bf16-dots"])
def cpu_path(request, monkeypatch):
    """Both CPU paths, as a CPU with bfloat16 dots and one without would take them."""
    monkeypatch.setattr(dense_module, "host_bf16_dots", lambda: request.param)
    return request.param


def _inputs(x_shape, w_shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    return jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape), kg


@pytest.mark.parametrize("spec,x_shape,w_shape,n_in", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)], ids=["float32", "bfloat16"])
def test_values_and_gradients_equal_the_einsum(spec, x_shape, w_shape, n_in, dtype, tol, cpu_path):
    x, w, key = _inputs(x_shape, w_shape)
    cotangent = jax.random.normal(key, jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape)

    def ours(x, w):
        return dense(x.astype(dtype), w.astype(dtype), n_in).astype(jnp.float32)

    def reference(x, w):  # float32 throughout, from the same rounded inputs
        return jnp.einsum(spec, x.astype(dtype).astype(jnp.float32), w.astype(dtype).astype(jnp.float32))

    got, got_vjp = jax.jit(lambda x, w: jax.vjp(ours, x, w))(x, w)
    jaxpr = str(jax.make_jaxpr(lambda x, w: jax.vjp(ours, x, w)[1](cotangent))(x, w))
    # Its row-major copies (row_major: [T, I] split to [T/t, t, I], moved as (2, 0, 1)): the path named.
    assert ("transpose[permutation=(2, 0, 1)]" in jaxpr) == (cpu_path and dtype == jnp.bfloat16)
    # Float32's weight gradient (bfloat16's too, upcast, without bfloat16 dots) copies x^T;
    # bfloat16's hand-written one copies the narrower of x and g, and with g, (g^T x)^T
    # keeps the product from being folded back.
    narrower_g = np.prod(want_shape(spec, x, w)[-(len(w_shape) - n_in):]) < np.prod(x_shape[-n_in:])
    hand_written = cpu_path and dtype == jnp.bfloat16
    assert ("optimization_barrier" in jaxpr) == (not hand_written or narrower_g)
    # Every product, forward and backward, in bfloat16 where the CPU has bfloat16 dots,
    # else in float32 (bfloat16 operands upcast).
    products = dot_operand_dtypes(lambda x, w: jax.vjp(ours, x, w)[1](cotangent), x, w)
    want_dtype = "bfloat16" if hand_written else "float32"
    assert products == [(want_dtype, want_dtype)] * 3, products
    want, want_vjp = jax.vjp(reference, x, w)
    assert got.shape == want.shape
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=tol * scale)
    for g, r in zip(got_vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(g, r, atol=tol * float(jnp.abs(r).max()))


def want_shape(spec, x, w):
    return jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape


def dot_operand_dtypes(fn, *args) -> list[tuple[str, ...]]:
    """The operand dtypes of every matrix product `fn` traces to, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
    walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)  # a new function: JAX caches traces by function
    return found


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_a_widening_product_on_an_accelerator_takes_its_gradient_in_the_operands_dtype(platform, monkeypatch):
    """The unembedding on a GPU or TPU: bfloat16 operands, float32 logits. Its backward's
    two products take bfloat16 operands (JAX's own gradient takes the float32 cotangent
    into both: on an H200, TF32 products), and equal float32's gradient within
    bfloat16's rounding of the cotangent."""
    x, w, key = _inputs((2, 6, 8), (8, 12))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    cotangent = jax.random.normal(key, (2, 6, 12))

    def pullback(x, w):
        return jax.vjp(lambda x, w: dense(x, w, dtype=jnp.float32), x, w)[1](cotangent)

    monkeypatch.setattr(dense_module, "host_bf16_dots", lambda: False)  # a CPU upcasting every product
    assert any("float32" in p for p in dot_operand_dtypes(pullback, xb, wb))
    monkeypatch.setattr(dense_module, "platform", lambda: platform)
    products = dot_operand_dtypes(pullback, xb, wb)  # the forward's and the backward's two
    assert products == [("bfloat16", "bfloat16")] * 3, products
    logits, vjp = jax.vjp(lambda x, w: dense(x, w, dtype=jnp.float32), xb, wb)
    assert logits.dtype == jnp.float32
    exact = jax.vjp(lambda x, w: jnp.einsum("bld,dv->blv", x, w), xb.astype(jnp.float32), wb.astype(jnp.float32))
    np.testing.assert_allclose(logits, exact[0], rtol=1e-6, atol=1e-5)
    for got, want in zip(vjp(cotangent), exact[1](cotangent)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * float(jnp.abs(want).max()))


def test_the_result_dtype_and_float32_logits_from_bfloat16():
    x, w, _ = _inputs((2, 6, 8), (8, 12))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert dense(xb, wb).dtype == jnp.bfloat16
    assert dense(xb, w).dtype == jnp.bfloat16  # the weight follows the activations
    logits = dense(xb, wb, dtype=jnp.float32)
    assert logits.dtype == jnp.float32
    # Accumulated in float32: no bfloat16 rounding of the sums.
    exact = jnp.einsum("bld,dv->blv", xb.astype(jnp.float32), wb.astype(jnp.float32))
    np.testing.assert_allclose(logits, exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", ["bld,fd->blf", "bdl,df->blf", "bld,df->bfl"])
def test_project_refuses_a_spec_dense_cannot_compute(spec):
    from flax import nnx

    from jit_tune.models.lora import LoraConfig, project

    class Layer(nnx.Module):
        def __init__(self):
            self.up_DxF = nnx.Param(jnp.ones((8, 8)))

    with pytest.raises(ValueError, match=f"project up_DxF: '{spec}' must contract the trailing axes"):
        project(Layer(), "up_DxF", spec, jnp.ones((2, 8, 8)), LoraConfig())


@pytest.mark.parametrize("axes", [(1, 0), (0, 2, 3, 1), (0, 2, 1, 3), (0, 2, 3, 1, 4), (0, 1, 3, 2), (2, 0, 1)])
@pytest.mark.parametrize("shape", [(12, 8, 64, 6, 10), (2, 3, 5, 7, 9)], ids=["tiles", "no-tile"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_row_major_is_the_transpose(axes, shape, dtype, cpu_path):
    # The bfloat16 form splits an axis into tiles (no tile divides 2, 3, 5, 7 or 9: then
    # it reverses the last axis around the transpose): a wrong index gives a wrong array.
    x = jax.random.normal(jax.random.key(0), shape[: len(axes)]).astype(dtype)
    got = jax.jit(lambda x: row_major(x, axes))(x)
    np.testing.assert_array_equal(got, x.transpose(axes))
    jaxpr = str(jax.make_jaxpr(lambda x: row_major(x, axes))(x))
    hand_written = cpu_path and dtype == jnp.bfloat16
    assert (" rev[" in jaxpr) == (hand_written and shape[0] == 2)
    assert ("reshape[" in jaxpr) == (hand_written and shape[0] == 12)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU paths")
def test_the_bfloat16_backward_compiles_to_the_products_this_cpu_runs_fast():
    """This XLA, on this CPU, runs every product of dense's bfloat16 forward and backward
    in bfloat16 where the CPU has bfloat16 dots (none of row_major's copies was folded
    back into its dot, and upcast), else in float32 (no upcast folded away either)."""
    x = jax.random.normal(jax.random.key(0), (256, 96)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (96, 160)).astype(jnp.bfloat16)
    grads = jax.jit(jax.grad(lambda x, w: jnp.square(dense(x, w, dtype=jnp.float32)).sum(), argnums=(0, 1)))
    operands = []
    for computation in grads.lower(x, w).compile().as_text().split("\n\n"):  # names are per computation
        types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", computation))
        operands += [(types[a], types[b]) for a, b in re.findall(r"\bdot\((%[\w.\-]+), (%[\w.\-]+)\)", computation)]
    want = "bf16" if host_bf16_dots() else "f32"
    assert operands == [(want, want)] * 3, operands  # forward, dx, dW


@pytest.mark.parametrize("lines,expected", [
    (["processor\t: 0", "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile", "processor\t: 1", "flags\t\t: fpu"], True),
    (["flags\t\t: fpu sse4_2 avx2 fma"], False),  # Zen 3: AVX2 only
    (["flags\t\t: avx512f avx512bw avx512_vnni"], False),  # AVX-512 without its BF16 extension
    (["Features\t: fp asimd sve i8mm bf16"], True),  # an Arm core (Graviton 3)
    (["Features\t: fp asimd"], False),
    ([], False),
], ids=["x86-bf16", "avx2", "avx512-no-bf16", "arm-bf16", "arm-no-bf16", "empty"])
def test_host_bf16_dots_reads_the_cpu_flags(tmp_path, lines, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(lines) + "\n")
    assert host_bf16_dots(cpuinfo) is expected
    assert host_bf16_dots(tmp_path / "missing") is False  # no cpuinfo (macOS, Windows): the plain path
