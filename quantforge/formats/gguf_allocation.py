"""The budgeted search's choice: which type each tensor group takes, from the sensitivity step's measurements
(gguf_search.py), to lose the least within a size budget.

The mean KL divergence of a mix is modelled as the baseline's plus each group's increase at its type: measured for
the two cheapest types of its ladder; beyond them, each further bit divides the increase by the rate those two
show (bounded to 2-16x a bit; quantization error falls about 4x a bit), and Q8_0 adds nothing. Each group's
bytes are exact (ggml's block sizes). A dynamic program over the groups then picks the mix with the least
modelled KLD whose bytes fit the budget: the multiple-choice knapsack, solved on a grid of 8192 steps of the budget
(costs rounded up, so the mix never exceeds it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..figures import format_size
from .gguf_recipes import Recipe
from .gguf_search import Group, bits, layer_patterns, type_bytes

RATE_BOUNDS = (2.0, 16.0)  # per bit
GRID = 8192
ALIGNMENT = 32  # GGUF pads each tensor's data to 32 bytes: the budget keeps that much per tensor in reserve


class BudgetTooSmall(BadInputError):
    """A budget below the smallest mix the search can make."""


@dataclass(frozen=True)
class Allocation:
    types: dict[str, str]  # group name -> type
    predicted_kld: float
    tensor_bytes: int  # of the groups' tensors
    limit_bytes: int  # the whole file may take

    def to_json(self) -> dict[str, Any]:
        return {"types": self.types, "predicted_kld": self.predicted_kld, "tensor_bytes": self.tensor_bytes,
                "limit_bytes": self.limit_bytes}


def increases(group: Mapping[str, Any], baseline: float) -> list[float]:
    """The modelled KLD increase over the baseline of each type of the group's ladder."""
    rungs = group["ladder"]
    measured = [max(group["kld"][t] - baseline, 0.0) for t in rungs if t in group["kld"]]
    for i in range(1, len(measured)):  # more bits never lose more: a probe's noise is no signal
        measured[i] = min(measured[i], measured[i - 1])
    out = list(measured)
    (t0, d0), (t1, d1) = (rungs[0], measured[0]), (rungs[len(measured) - 1], measured[-1])
    rate = 4.0
    if len(measured) > 1 and d0 > 0 and d1 > 0 and bits(t1) > bits(t0):
        rate = min(max((d0 / d1) ** (1 / (bits(t1) - bits(t0))), RATE_BOUNDS[0]), RATE_BOUNDS[1])
    for t in rungs[len(measured):]:
        out.append(0.0 if t == rungs[-1] else min(out[-1], d1 / rate ** (bits(t) - bits(t1))))
    return out


def budget_bytes(budget: Mapping[str, Any], n_params: int) -> int:
    """A budget's file size: {"size": bytes} or {"bpw": bits per weight of the whole file}."""
    return int(budget["size"]) if "size" in budget else int(budget["bpw"] * n_params / 8)


def allocate(profile: Mapping[str, Any], budget: Mapping[str, Any]) -> Allocation:
    """The mix with the least modelled KLD whose file fits `budget` (BudgetTooSmall when none does)."""
    groups = [Group.from_json(g) for g in profile["groups"]]
    baseline = profile["baseline"]
    limit = budget_bytes(budget, profile["n_params"])
    room = limit - baseline["fixed_bytes"] - ALIGNMENT * profile["tensors"]
    cost = [[type_bytes(t, g.elements) for t in g.ladder] for g in groups]
    loss = [increases(data, baseline["kld"]) for data in profile["groups"]]
    cheapest = sum(min(c) for c in cost)
    if room < cheapest:
        smallest = limit - room + cheapest
        raise BudgetTooSmall(f"a budget of {format_size(limit)} is below the smallest file this search makes for the "
                             f"model, {format_size(smallest)} (every group at its cheapest type): raise it")
    choice = knapsack(cost, loss, room)
    types = {g.name: g.ladder[i] for g, i in zip(groups, choice, strict=True)}
    return Allocation(types, baseline["kld"] + sum(loss[k][i] for k, i in enumerate(choice)),
                      sum(cost[k][i] for k, i in enumerate(choice)), limit)


def knapsack(cost: Sequence[Sequence[int]], loss: Sequence[Sequence[float]], room: int) -> list[int]:
    """One option per group, least total loss, total cost at most `room` (costs on a grid, rounded up)."""
    unit = max(1, math.ceil(room / GRID))
    cap = room // unit
    best = np.zeros(cap + 1)  # best[c]: least loss of the groups so far within c units
    picks = []
    for options, losses in zip(cost, loss, strict=True):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for i, (c, d) in enumerate(zip(options, losses, strict=True)):
            units = math.ceil(c / unit)
            if units > cap:
                continue
            candidate = np.full(cap + 1, np.inf)
            candidate[units:] = best[:cap + 1 - units] + d
            better = candidate < new
            new[better], pick[better] = candidate[better], i
        best = new
        picks.append(pick)
    choice = []
    c = cap
    for options, pick in zip(reversed(cost), reversed(picks), strict=True):
        i = int(pick[c])
        choice.append(i)
        c -= math.ceil(options[i] / unit)
    return choice[::-1]


def searched_recipe(name: str, base: str, allocation: Allocation, groups: Sequence[Group]) -> Recipe:
    """The rules that make the allocation's file: the output and embedding types, then a pattern per kind of tensor
    and type, naming its layers."""
    output = embeddings = None
    layers: dict[tuple[str, str], list[int]] = {}
    for group in groups:
        qtype = allocation.types[group.name]
        if group.role == "output":
            output = qtype
        elif group.role == "embeddings":
            embeddings = qtype
        else:
            layers.setdefault((group.role, qtype), []).extend(group.layers)
    rules = tuple((pattern, qtype) for (role, qtype), numbers in sorted(layers.items())
                  for pattern in layer_patterns(role, sorted(numbers)))
    return Recipe(name, base, output, embeddings, rules)


def search(name: str, base: str, profile: Mapping[str, Any], budget: Mapping[str, Any]) -> tuple[Recipe, dict]:
    """A searched variant's recipe, and what the card and report say of the search."""
    allocation = allocate(profile, budget)
    recipe = searched_recipe(name, base, allocation, [Group.from_json(g) for g in profile["groups"]])
    return recipe, {"budget": dict(budget), **allocation.to_json(), "groups": len(profile["groups"]),
                    "runs": profile["runs"], "search_seconds": profile["seconds"]}
