"""AOT compilation of the real train step for TPU topologies on this CPU machine (libtpu
describes the chips; no TPU is used), remat's effect on activation memory, and the
multi-slice (ICI x DCN) mesh."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jit_tune.config import ConfigError, load_config
from jit_tune.models.decoder import Decoder
from jit_tune.topology import TopologyError, parse

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jit_tune[tpu]'; the test extra has it)")

from jit_tune.aot import compile_train_step, topology_devices  # noqa: E402
from jit_tune.train.state import decoder_config  # noqa: E402


def test_compile_reports_memory_and_flops_on_a_small_v5p_slice(capsys):
    from jit_tune.cli import main

    assert main(["compile", "--config", "configs/tiny.py", "--topology", "v5p:2x2x1"]) == 0
    out = capsys.readouterr().out
    assert "topology v5p:2x2x1: 4 chips, 1 hosts; mesh data=4 x fsdp=1 x tensor=1" in out
    assert "HBM of a v5p chip" in out and "fits" in out

    config = load_config("configs/tiny.py")
    report = compile_train_step(config, parse("v5p:2x2x1"))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Decoder(decoder_config(config), nnx.Rngs(0)))
    assert report.parameters == sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert report.param_bytes == 4 * report.parameters  # float32, replicated over the data axis
    assert report.optimizer_bytes >= 2 * report.param_bytes  # Adam's two moments
    assert report.temp_bytes > 0 and report.peak_bytes < report.topology.generation.hbm_bytes
    assert report.attention == "splash"  # "auto" compiles the TPU's kernel, whatever machine compiles
    # XLA counts no FLOPs inside the splash kernel; with XLA's attention it counts them all.
    reference = compile_train_step(load_config("configs/tiny.py", ["--config.model.attention=xla"]),
                                   parse("v5p:2x2x1"))
    six_nt = 6 * report.parameters * report.tokens_per_step
    assert six_nt < reference.flops_per_chip * 4 < 3 * six_nt  # attention and the loss on top of 6NT
    assert report.flops_per_chip < reference.flops_per_chip
    # The report says so where XLA's count falls short: not for the reference (one loss chunk, unrolled layers).
    assert report.xla_undercounts() == ["nothing inside the splash kernel"] and reference.xla_undercounts() == []
    assert "an undercount: it counts nothing inside the splash kernel" in report.table()
    chunked = compile_train_step(load_config("configs/tiny.py", ["--config.model.attention=xla_chunked",
                                                                "--config.train.loss_chunk=32"]), parse("v5p:2x2x1"))
    assert chunked.xla_undercounts() == ["the loss-chunk loop's body once", "the attention's key-block loop body once"]
    assert chunked.flops_per_chip < reference.flops_per_chip
    assert reference.model_flops_per_step < reference.flops_per_chip * 4 < 1.5 * reference.model_flops_per_step


def test_fsdp_shards_parameters_and_moments_over_the_chips():
    config = load_config("configs/tiny.py", ["--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=-1"])
    sharded = compile_train_step(config, parse("v5p:2x2x1"))
    assert sharded.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert sharded.param_bytes < 0.3 * 4 * sharded.parameters  # about a quarter each (norms stay whole)


def test_a_step_that_does_not_fit_exits_4(capsys):
    from jit_tune.cli import main

    code = main(["compile", "--config", "configs/tiny.py", "--topology", "v5e:2x2", "--config.model.vocab_size=2000000",
                 "--config.model.d_model=2048", "--config.model.n_heads=16", "--config.model.n_kv_heads=16",
                 "--config.model.head_dim=128"])
    out, err = capsys.readouterr()
    assert code == 4 and "DOES NOT FIT" in out + err


@pytest.mark.slow
def test_remat_cuts_activation_memory_and_dots_sits_between():
    temps = {}
    for policy in ("none", "dots", "full"):
        config = load_config("configs/tiny.py", [f"--config.model.remat={policy}", "--config.data.seq_len=512",
                                                 "--config.data.batch_size=32"])
        temps[policy] = compile_train_step(config, parse("v5p:2x2x1")).temp_bytes
    assert temps["full"] < temps["dots"] < temps["none"], temps


def test_multi_slice_mesh_keeps_dcn_on_the_outer_part_of_an_axis():
    from jit_tune import mesh as mesh_lib

    config = load_config("configs/tiny.py", ["--config.mesh.dcn_shape.data=2"])
    devices = topology_devices(parse("v5p:2x2x1", slices=2))
    mesh = mesh_lib.make_mesh(config, devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices).reshape(-1)
    assert slices.tolist() == [0] * 4 + [1] * 4  # the data axis crosses DCN once, in the middle
    report = compile_train_step(config, parse("v5p:2x2x1", slices=2))
    assert report.mesh["data"] == 8 and math.isclose(report.param_bytes, 4 * report.parameters)
    with pytest.raises(ConfigError, match="spans 2 slices, but the devices come from 1"):
        mesh_lib.make_mesh(config, topology_devices(parse("v5p:2x2x2")))


@pytest.mark.parametrize("name", ["v5p", "v9:2x2", "v5p:2x", "v5p:4x4x8:1"])
def test_bad_topology_names_are_explained(name, capsys):
    from jit_tune.cli import main

    with pytest.raises(TopologyError, match="expected GENERATION:GRID"):
        parse(name)
    assert main(["compile", "--config", "configs/tiny.py", "--topology", name]) == 2
    assert "expected GENERATION:GRID" in capsys.readouterr().err


def test_topology_hosts_and_accelerator_types():
    assert (parse("v5p:4x4x8").chips, parse("v5p:4x4x8").hosts, parse("v5p:4x4x8").accelerator_type) == (128, 32, "v5p-256")
    assert (parse("v5e:2x4").hosts, parse("v5e:4x4").hosts, parse("v6e:16x16").accelerator_type) == (1, 4, "v6e-256")
    assert len(jax.devices()) == 8  # compiling for TPU left the CPU devices alone


def test_compile_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
    from importlib.util import find_spec

    from jit_tune.cli import main

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    assert main(["compile", "--config", "configs/tiny.py", "--topology", "v5p:2x2x1"]) == 2
    assert "needs libtpu: pip install 'jit_tune[tpu]'" in capsys.readouterr().err
