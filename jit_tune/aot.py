"""Ahead-of-time compilation of the real train step for a TPU topology, on any machine.

`jit-tune compile --config X --topology v5p:4x4x8` builds the mesh from the topology's
devices as described by libtpu (`pip install 'jit_tune[tpu]'`; no TPU needed), creates
the model and optimizer state abstractly with the run's shardings, lowers and compiles
the same `train_step` training runs, and reports per-chip memory against the chip's HBM
and the FLOPs of one step: XLA's count beside the model FLOPs (jit_tune/flops.py, what
the training loop's MFU divides). What does not fit fails here, in a minute on a
laptop, and not an hour into a pod reservation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from jit_tune import mesh as mesh_lib
from jit_tune.config import ConfigError
from jit_tune.data.pipeline import FEATURES
from jit_tune.flops import training_flops_per_token
from jit_tune.models.lora import parameter_counts
from jit_tune.models.attention import resolve
from jit_tune.topology import Topology
from jit_tune.train.state import create_model_and_optimizer, decoder_config
from jit_tune.train.step import train_step

BATCH_FEATURES = FEATURES + ("segment_ids", "positions", "task_ids")


def topology_devices(topology: Topology) -> list:
    """The slice's devices as libtpu describes them, without any TPU attached."""
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"compiling for {topology} needs libtpu: pip install 'jit_tune[tpu]'")
    from jax.experimental import topologies

    # Compiling attaches no TPU, so another process holding libtpu's lockfile (a test, a
    # second compile) must not make this one fail.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{topology.generation.name}:{topology.grid_name}",
            chip_config_name="megacore" if topology.generation.cores_per_chip == 2 else "default",
            chips_per_host_bounds=_host_bounds(topology), num_slices=topology.slices)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"topology {topology}: libtpu cannot describe it: {e}") from None
    return list(description.devices)


def _host_bounds(topology: Topology) -> tuple[int, int, int]:
    """The chip grid of one host (three numbers, also for 2-D slices): 2x2x1 for four
    chips, 2x4x1 for eight, or the whole slice when it is smaller."""
    per_host = topology.chips_per_host
    if per_host >= 4:
        return 2, per_host // 2, 1
    grid = (*topology.grid, 1)[:3]
    return tuple(min(d, 2) for d in grid)


class DoesNotFit(Exception):
    """The TPU compiler could not fit the step in the chip's HBM."""


@dataclasses.dataclass
class Report:
    topology: Topology
    mesh: dict[str, int]
    parameters: int
    tokens_per_step: int
    param_bytes: int  # per chip
    optimizer_bytes: int
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    flops_per_chip: float  # XLA's count
    model_flops_per_step: float = 0.0  # flops.training_flops_per_token x tokens per step
    scanned_layers: bool = False  # the compiler's FLOPs then count the layer loop's body once
    attention: str = ""  # the implementation compiled ("auto" resolved for the TPU)
    loss_chunk: int = 0
    seq_len: int = 0
    # LoRA: what is trained (the optimizer's state follows it) against the frozen base.
    lora: str = ""  # "" without LoRA; else e.g. "rank 16 on q|k|v, base nf4"
    trained_parameters: int = 0
    adapter_bytes: int = 0  # per chip, within param_bytes

    def xla_undercounts(self) -> list[str]:
        """What XLA's cost analysis leaves out of this step: it counts a loop's body once,
        and nothing inside a Pallas kernel."""
        return ((["the scanned layers' body once"] if self.scanned_layers else [])
                + (["the loss-chunk loop's body once"] if 0 < self.loss_chunk < self.seq_len else [])
                + (["the attention's key-block loop body once"] if self.attention == "xla_chunked" else [])
                + ([f"nothing inside the {self.attention} kernel"] if self.attention in ("splash", "pallas_gpu")
                   else []))

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def table(self) -> str:
        gib = 2.0**30
        hbm = self.topology.generation.hbm_bytes
        chips = self.topology.chips * self.topology.slices
        weights = [("parameters", self.param_bytes)] if not self.lora else [
            ("frozen base weights", self.param_bytes - self.adapter_bytes),
            ("trained parameters (LoRA adapters)", self.adapter_bytes)]
        rows = [
            *weights,
            ("optimizer state", self.optimizer_bytes),
            ("temporaries (activations, gradients, workspace)", self.temp_bytes),
            ("total: arguments + outputs not aliased + temporaries", self.peak_bytes),
        ]
        lines = [f"topology {self.topology}: {chips} chips, {self.topology.hosts * self.topology.slices} hosts; "
                 f"mesh {' x '.join(f'{k}={v}' for k, v in self.mesh.items())}",
                 f"model {_count(self.parameters)} parameters; {self.tokens_per_step:,} tokens per step; "
                 f"attention {self.attention}; loss chunk {self.loss_chunk or 'none (full logits)'}",
                 *([f"LoRA {self.lora}: {_count(self.trained_parameters)} trained parameters "
                    f"({100 * self.trained_parameters / self.parameters:.2f}%); the optimizer holds their moments "
                    "only"] if self.lora else []),
                 f"{'per chip':<56}{'GiB':>9}"]
        lines += [f"  {name:<54}{value / gib:>9.2f}" for name, value in rows]
        fit = "fits" if self.peak_bytes <= hbm else "DOES NOT FIT"
        lines.append(f"  {'HBM of a ' + self.topology.generation.name + ' chip':<54}{hbm / gib:>9.2f}"
                     f"   ({100 * self.peak_bytes / hbm:.0f}% used: {fit})")
        total = self.flops_per_chip * chips
        six_nt = 6 * self.parameters * self.tokens_per_step
        model = (f"model FLOPs (jit_tune/flops.py: 6 x matmul weights + causal attention, what MFU divides) "
                 f"{self.model_flops_per_step:.3e}; 6 x parameters x tokens {six_nt:.3e}")
        if self.xla_undercounts():
            lines.append(f"FLOPs per step: XLA's cost analysis {total:.3e}, an undercount: it counts "
                         + "; ".join(self.xla_undercounts()) + " (the model FLOPs below are the step's)")
        else:
            lines.append(f"FLOPs per step: XLA {total:.3e} ({self.flops_per_chip:.3e} per chip; with remat's "
                         "recomputation and the attention as compiled)")
        lines.append(f"  {model}")
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _per_device_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def compile_train_step(config: ConfigDict, topology: Topology) -> Report:
    # "auto" means the kernel of the machine the plan is for, not of this one.
    config = ConfigDict(config.to_dict())
    config.model.attention = resolve(config.model.attention, config.model, "tpu")
    devices = topology_devices(topology)
    mesh = mesh_lib.make_mesh(config, devices)
    d = config.data
    mesh_lib.check_batch_divides(d.batch_size, mesh, config.train.microbatches)
    model, optimizer = create_model_and_optimizer(config, mesh, abstract=True)
    sharding = mesh_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((d.batch_size, d.seq_len), jnp.int32, sharding=sharding) for k in BATCH_FEATURES}
    with mesh_lib.use_mesh(config, mesh):
        # The per-task sums' size only: the mixture's entries (groups included) stand in for
        # its tasks, which are known once the task files are read.
        lowered = train_step.lower(model, optimizer, batch, config.train.microbatches, config.train.loss_chunk,
                                   len(config.data.mixture))
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise DoesNotFit(f"the train step does not fit a {topology.generation.name} chip: {e}") from None
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    base_parameters, trained_parameters = parameter_counts(model)  # a quantized weight counts its weights
    lora = config.lora
    return Report(
        topology=topology,
        mesh=dict(mesh.shape),
        parameters=base_parameters,
        tokens_per_step=d.batch_size * d.seq_len,
        param_bytes=_per_device_bytes(nnx.state(model)),  # with LoRA: the (quantized) base and the adapters
        optimizer_bytes=_per_device_bytes(nnx.state(optimizer)),
        temp_bytes=memory.temp_size_in_bytes,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        flops_per_chip=float(cost.get("flops", 0.0)),
        model_flops_per_step=training_flops_per_token(decoder_config(config), d.seq_len) * d.batch_size * d.seq_len,
        scanned_layers=config.model.scan_layers,
        attention=config.model.attention,
        loss_chunk=config.train.loss_chunk,
        seq_len=d.seq_len,
        lora=f"rank {lora.rank} on {lora.targets}, base {lora.base_quantization}" if lora.rank else "",
        trained_parameters=trained_parameters,
        adapter_bytes=_per_device_bytes(nnx.state(model, nnx.LoRAParam)),
    )
