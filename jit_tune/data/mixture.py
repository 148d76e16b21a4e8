"""Mixture rates: from the config's nested mixture to one sampling rate per task.

`config.data.mixture` maps task or group names to rates. A group spreads its rate over
its members by its own rule, as FLAN 2022 mixed its flan/t0/niv2/cot/dialog groups:

  equal        every member the same share
  examples     examples-proportional with a cap (SeqIO/FLAN): share ~ min(n, cap)
  temperature  share ~ min(n, cap) ** (1 / temperature): T = 1 is examples-proportional,
               larger T flattens towards equal

Members may be groups themselves (their size is the sum of their members'). The result
is normalized to sum to 1, so rates are relative: only their ratios matter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

RULES = ("equal", "examples", "temperature")
GROUP_FIELDS = ("tasks", "rule", "cap", "temperature")


class MixtureError(ValueError):
    pass


def _size(name: str, groups: Mapping, sizes: Mapping[str, int]) -> float:
    if name in groups:
        return sum(_size(member, groups, sizes) for member in groups[name]["tasks"])
    return sizes[name]


def _check_group(name: str, group: Mapping, groups: Mapping, sizes: Mapping) -> None:
    where = f"config.data.groups.{name}"
    if name in sizes:
        raise MixtureError(f"{where}: a group may not take a task's name (the mixture's entry {name!r} would mean "
                           "either)")
    unknown = sorted(set(group) - set(GROUP_FIELDS))
    if unknown:
        raise MixtureError(f"{where}: unknown fields {unknown}: expected some of {GROUP_FIELDS}")
    if group["rule"] not in RULES:
        raise MixtureError(f"{where}.rule = {group['rule']!r}: expected one of {RULES}")
    members = group["tasks"]
    if not isinstance(members, (list, tuple)) or not members or not all(isinstance(m, str) for m in members):
        raise MixtureError(f"{where}.tasks = {members!r}: expected a non-empty tuple of task or group names")
    unknown = [m for m in members if m not in groups and m not in sizes]
    if unknown:
        raise MixtureError(f"{where}.tasks: {unknown} are neither tasks nor groups; known tasks: "
                           f"{', '.join(sorted(sizes))}")
    cap, temperature = group["cap"], group["temperature"]
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        raise MixtureError(f"{where}.cap = {cap!r}: expected an integer >= 0 (0: no cap)")
    if group["rule"] == "temperature" and not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise MixtureError(f"{where}.temperature = {temperature!r}: expected a finite number > 0")


def _check_acyclic(name: str, groups: Mapping, path: tuple = ()) -> None:
    if name in path:
        raise MixtureError(f"config.data.groups: group {name!r} contains itself ({' -> '.join(path + (name,))})")
    for member in groups[name]["tasks"] if name in groups else ():
        _check_acyclic(member, groups, path + (name,))


def _spread(name: str, rate: float, groups: Mapping, sizes: Mapping[str, int], out: dict) -> None:
    if name not in groups:
        if name not in sizes:
            raise MixtureError(f"config.data.mixture: {name!r} is neither a task nor a group; known tasks: "
                               f"{', '.join(sorted(sizes))}")
        out[name] = out.get(name, 0.0) + rate
        return
    group = groups[name]
    members = list(group["tasks"])
    if group["rule"] == "equal":
        weights = [1.0] * len(members)
    else:
        cap = group["cap"] if group["cap"] > 0 else float("inf")
        capped = [min(_size(m, groups, sizes), cap) for m in members]
        if float("inf") in capped:
            raise MixtureError(f"config.data.groups.{name}: rule {group['rule']!r} holds generated tasks of "
                               "unbounded size: expected a cap > 0")
        power = 1.0 if group["rule"] == "examples" else 1.0 / group["temperature"]
        weights = [c**power for c in capped]
    total = sum(weights)
    for member, weight in zip(members, weights):
        _spread(member, rate * weight / total, groups, sizes, out)


def task_rates(mixture: Mapping[str, float], groups: Mapping, sizes: Mapping[str, float]) -> dict[str, float]:
    """{task: share of sampled examples}, summing to 1, for tasks with a positive share.

    `sizes` gives each task's number of training examples (inf for generated tasks).
    Every group is checked, used or not: a typo in one is found before a sweep uses it.
    """
    for name, group in groups.items():
        _check_group(name, group, groups, sizes)
    for name in groups:
        _check_acyclic(name, groups)
    out: dict[str, float] = {}
    for name, rate in mixture.items():
        if rate < 0:
            raise MixtureError(f"config.data.mixture.{name} = {rate}: expected a rate >= 0")
        if rate > 0:
            _spread(name, float(rate), groups, sizes, out)
    total = sum(out.values())
    if total <= 0:
        raise MixtureError("config.data.mixture: expected at least one task or group with a rate > 0")
    return {task: rate / total for task, rate in out.items() if rate > 0}
