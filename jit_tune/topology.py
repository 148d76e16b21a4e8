"""TPU topologies by name, `v5p:4x4x8` (generation:chip grid), for AOT compilation and
the GKE launcher: how many chips and hosts, and each chip's HBM."""

from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str
    chips_per_host: int  # of a multi-host slice
    single_host_chips: int  # the most chips a one-host slice has
    cores_per_chip: int  # accelerator types count cores: v5p-256 is 128 chips
    hbm_bytes: int  # per chip
    gke_accelerator: str  # GKE node label cloud.google.com/gke-tpu-accelerator


GENERATIONS = {g.name: g for g in (
    Generation("v4", 4, 4, 2, 32 * 2**30, "tpu-v4-podslice"),
    Generation("v5e", 4, 8, 1, 16 * 2**30, "tpu-v5-lite-podslice"),
    Generation("v5p", 4, 4, 2, 95 * 2**30, "tpu-v5p-slice"),
    Generation("v6e", 4, 8, 1, 32 * 2**30, "tpu-v6e-slice"),
)}


class TopologyError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: Generation
    grid: tuple[int, ...]
    slices: int = 1

    @property
    def chips(self) -> int:  # per slice
        return math.prod(self.grid)

    @property
    def hosts(self) -> int:  # per slice
        g = self.generation
        return 1 if self.chips <= g.single_host_chips else self.chips // g.chips_per_host

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def accelerator_type(self) -> str:  # as gcloud and xpk name it, e.g. v5p-256
        return f"{self.generation.name}-{self.chips * self.generation.cores_per_chip}"

    @property
    def grid_name(self) -> str:
        return "x".join(map(str, self.grid))

    def __str__(self) -> str:
        return f"{self.generation.name}:{self.grid_name}" + (f" x {self.slices} slices" if self.slices > 1 else "")


def parse(text: str, slices: int = 1) -> Topology:
    match = re.fullmatch(r"(v\w+):(\d+(?:x\d+){1,2})", text)
    if not match or match.group(1) not in GENERATIONS:
        raise TopologyError(f"topology {text!r}: expected GENERATION:GRID such as v5p:4x4x8 or v6e:8x8, with "
                            f"GENERATION one of {', '.join(GENERATIONS)}")
    if slices < 1:
        raise TopologyError(f"{slices} slices: expected at least 1")
    return Topology(GENERATIONS[match.group(1)], tuple(int(d) for d in match.group(2).split("x")), slices)
