"""Device mesh from the config, logical-axis rules, and global batch assembly.

The mesh has the named axes data, fsdp and tensor. Parameters name logical axes
(`embed`, `mlp`, ...); `config.mesh.rules` maps those to mesh axes, the one place
sharding is declared. Batches are sharded over ("data", "fsdp") on their first axis.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from jit_tune.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_SPEC = PartitionSpec(("data", "fsdp"))


def platform() -> str:
    """The platform a computation being traced is for: the mesh's (`jit-tune compile`
    traces for a TPU topology on a CPU host), else this process's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def mesh_shape(config: ConfigDict, n_devices: int) -> tuple[int, ...]:
    """Axis sizes within a slice with the -1 axis filled; an error if they do not tile
    the slice's devices."""
    sizes = [config.mesh.shape[axis] for axis in AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"config.mesh.shape {dict(zip(AXES, sizes))}: {n_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"config.mesh.shape {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, but {n_devices} are present"
            " (per slice)"
        )
    return tuple(sizes)


def make_mesh(config: ConfigDict, devices: list | None = None) -> Mesh:
    """The devices laid out as config.mesh.shape within a slice (ICI) times
    config.mesh.dcn_shape across slices (DCN): each axis is as long as the product, and
    an axis split over DCN crosses slices only in its outer part. Auto axis types: the
    compiler propagates shardings from the annotated params."""
    devices = jax.devices() if devices is None else devices
    dcn = tuple(config.mesh.dcn_shape[axis] for axis in AXES)
    slices = math.prod(dcn)
    if len(devices) % slices:
        raise ConfigError(f"config.mesh.dcn_shape {dict(zip(AXES, dcn))} spans {slices} slices, but "
                          f"{len(devices)} devices do not split into {slices} equal slices")
    ici = mesh_shape(config, len(devices) // slices)
    if slices == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        found = len({getattr(d, "slice_index", 0) for d in devices})
        if found != slices:
            raise ConfigError(f"config.mesh.dcn_shape {dict(zip(AXES, dcn))} spans {slices} slices, but the "
                              f"devices come from {found}")
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


@contextlib.contextmanager
def use_mesh(config: ConfigDict, mesh: Mesh):
    """The mesh and the logical-axis rules, for creating state and tracing steps: the
    rules place parameters at creation and pin activations while tracing."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules(config)):
        yield mesh


def logical_rules(config: ConfigDict) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    return tuple((logical, tuple(mesh) if isinstance(mesh, list) else mesh) for logical, mesh in config.mesh.rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def check_batch_divides(global_batch: int, mesh: Mesh, microbatches: int = 1) -> None:
    """Every batch shard splits evenly into the microbatches (gradient accumulation)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % (shards * microbatches):
        raise ConfigError(
            f"config.data.batch_size = {global_batch}: expected a multiple of the data x fsdp mesh size ({shards})"
            + (f" times train.microbatches ({microbatches})" if microbatches > 1 else "")
        )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into arrays sharded over the whole mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array on this host: evaluation results are
    sharded over the batch, so in a multi-process run each host holds only its rows."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
