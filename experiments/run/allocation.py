"""Allocation to a bit budget: per-unit widths chosen from a sensitivity record, run as module rules.

    quantlab method=gptq allocation.target_bits=3.0 allocation.choices=[2,3,4,8] \\
        allocation.sensitivity=outputs/runs/<sensitivity run>/sensitivity.json

The sensitivity record (experiments/run/sensitivity.py) holds, per unit (a linear or a block) and
width, the measured damage (the mean paired NLL increase over the windows, `allocation.damage=
nll_delta`, or the mean KL to full precision, `kl`) and the unit's exact storage bits (the
formats' own `storage_bits()`: codes, scales and zeros at the record's group size, as `avg_bits`
counts them). The allocation minimises the summed damage subject to

    Σ_units storage_bits(unit, width) <= target_bits × Σ_units weights(unit)

(the exact average, weighted by weight count) with a GREEDY, not an exact knapsack: every unit
starts at the lowest choice; then, repeatedly, among the upgrades (unit -> any higher choice) that
still fit the budget and lower the damage, the one with the largest damage reduction per added bit
is taken, until none is left. The result is at or below the budget, never above, and not
necessarily optimal (a knapsack could trade two cheap upgrades for one dear one).

`allocation.solver=dp` solves the same problem exactly over a discretised budget instead (a
multiple-choice knapsack by dynamic programming): the bits above the all-lowest allocation are
counted in `allocation.dp_buckets` equal quanta, each upgrade's cost rounded UP to whole quanta, so
its answer also never exceeds the budget; it is optimal for the rounded costs (exactly optimal
when the costs are multiples of the quantum), and costs units × buckets × choices operations.

The widths become per-module rules, one exact regex per linear (`^model\\.layers\\.3\\.mlp\\.down_proj$`)
or per block (`^model\\.layers\\.3\\.`), which the run then applies as if given as `modules=` (so any
method runs under them; AWQ refuses widths that split a group it scales together). The record's
`allocation` holds the widths, the upgrade order, the rules and the predicted `avg_bits` beside
the measured one; the rules are also written to `allocation_rules.yaml` in the run directory.
Predicted and measured agree exactly when the run's method stores what the sensitivity method
stored at each width (same group size; GPTQ's act_order adds a permutation, OWQ its fp16 columns).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from quantlab.experiments.records.sensitivity_record import DAMAGES, damage_of
from quantlab.methods.base import ConfigError

SOLVERS = ("greedy", "dp")
RULES_FILE = "allocation_rules.yaml"


@dataclass
class AllocationConfig:
    """`allocation.*` (conf/config.yaml): off while target_bits is null."""

    target_bits: float | None = None
    choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    sensitivity: str | None = None  # a sensitivity.json (or the run directory holding one)
    damage: str = "nll_delta"  # nll_delta | kl
    solver: str = "greedy"  # greedy | dp (exact over a discretised budget)
    dp_buckets: int = 10000  # solver=dp: quanta the budget above all-lowest is cut into


@dataclass(frozen=True)
class UnitCosts:
    """One unit's storage bits and measured damage at each width."""

    name: str
    numel: int
    bits: dict[int, int]
    damage: dict[int, float]


def greedy_allocation(units: list[UnitCosts], choices: list[int], target_bits: float
                      ) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """(width per unit, the upgrades in the order taken) under the budget (module docstring).
    Ties in damage per bit go to the cheaper upgrade, then to the earlier unit."""
    widths = sorted(set(choices))
    budget = Fraction(str(target_bits)) * sum(u.numel for u in units)  # exact: no float rounding at the edge
    choice = {u.name: widths[0] for u in units}
    spent = sum(u.bits[widths[0]] for u in units)
    if spent > budget:
        raise ConfigError(f"allocation.target_bits={target_bits} is below the lowest choice: every unit at "
                          f"{widths[0]} bits already averages {spent / sum(u.numel for u in units):.4f}")
    steps: list[dict[str, Any]] = []
    while True:
        best = None
        for order, unit in enumerate(units):
            current = choice[unit.name]
            for width in (w for w in widths if w > current):
                cost = unit.bits[width] - unit.bits[current]
                gain = unit.damage[current] - unit.damage[width]
                if gain <= 0 or spent + cost > budget:
                    continue
                key = (gain / cost, -cost, -order)
                if best is None or key > best[0]:
                    best = (key, unit, width, cost, gain)
        if best is None:
            return choice, steps
        _, unit, width, cost, gain = best
        steps.append({"unit": unit.name, "from": choice[unit.name], "to": width, "bits": cost,
                      "damage_reduction": gain, "per_bit": gain / cost})
        choice[unit.name] = width
        spent += cost


def dp_allocation(units: list[UnitCosts], choices: list[int], target_bits: float, buckets: int = 10000
                  ) -> dict[str, int]:
    """The multiple-choice knapsack over a discretised budget (module docstring): minimum summed
    damage with every unit at one width and the rounded-up costs within the budget."""
    import math

    import numpy as np

    widths = sorted(set(choices))
    budget = Fraction(str(target_bits)) * sum(u.numel for u in units)
    floor = sum(u.bits[widths[0]] for u in units)
    if floor > budget:
        raise ConfigError(f"allocation.target_bits={target_bits} is below the lowest choice: every unit at "
                          f"{widths[0]} bits already averages {floor / sum(u.numel for u in units):.4f}")
    spare = budget - floor
    quantum = max(spare / buckets, Fraction(1))  # bits per bucket (never finer than one bit)
    n = int(spare // quantum)
    best = np.zeros(n + 1)  # best[b]: least damage of the units so far within b buckets
    picks = np.zeros((len(units), n + 1), dtype=np.int8)
    for i, unit in enumerate(units):
        candidates = np.full((len(widths), n + 1), np.inf)
        for k, width in enumerate(widths):
            cost = math.ceil(Fraction(unit.bits[width] - unit.bits[widths[0]]) / quantum)
            if cost <= n:
                candidates[k, cost:] = best[: n + 1 - cost] + unit.damage[width]
        picks[i] = candidates.argmin(axis=0)
        best = candidates.min(axis=0)
    choice, b = {}, n
    for i in range(len(units) - 1, -1, -1):  # walk back from the full budget
        width = widths[picks[i, b]]
        choice[units[i].name] = width
        b -= math.ceil(Fraction(units[i].bits[width] - units[i].bits[widths[0]]) / quantum)
    return choice


def unit_rules(record: dict[str, Any], widths: dict[str, int]) -> list[dict[str, Any]]:
    """The widths as `modules` rules: an exact regex per linear, or per block (its path and a dot)."""
    rules = []
    for unit in record["units"]:
        if record["unit"] == "block":
            pattern = "^" + re.escape(unit["name"] + ".")
        else:
            pattern = "^" + re.escape(unit["name"]) + "$"
        rules.append({"match": pattern, "bits": widths[unit["name"]]})
    return rules


@dataclass
class AllocationPlan:
    target_bits: float
    choices: list[int]
    damage: str
    solver: str
    source: str
    unit: str
    widths: dict[str, int]
    steps: list[dict[str, Any]]
    rules: list[dict[str, Any]]
    predicted_avg_bits: float
    predicted_damage: float
    model_fingerprint: str | None  # checked once the model loads

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _costs(record: dict[str, Any], choices: list[int], damage: str) -> list[UnitCosts]:
    units = []
    for unit in record["units"]:
        results = unit["widths"]
        bits = {w: int(results[str(w)]["storage_bits"]) for w in choices}
        values = {w: damage_of(results[str(w)], damage) for w in choices}
        units.append(UnitCosts(unit["name"], int(unit["numel"]), bits, values))
    return units


def check_config(config: AllocationConfig) -> None:
    """The allocation group's own values (before any file is read)."""
    if config.target_bits is None:
        if config.sensitivity is not None:
            raise ConfigError("allocation.sensitivity is set but allocation.target_bits is not: give the budget, "
                              "e.g. allocation.target_bits=3.0")
        return
    if config.sensitivity is None:
        raise ConfigError("allocation.target_bits needs allocation.sensitivity=PATH: the sensitivity.json of an "
                          "experiment=sensitivity run of this model")
    if config.solver not in SOLVERS:
        raise ConfigError(f"allocation.solver={config.solver!r} is not valid; choose one of: {', '.join(SOLVERS)}")
    if config.dp_buckets < 1:
        raise ConfigError(f"allocation.dp_buckets={config.dp_buckets} must be a positive integer")
    if config.damage not in DAMAGES:
        raise ConfigError(f"allocation.damage={config.damage!r} is not valid; choose one of: {', '.join(DAMAGES)}")
    if not config.choices or any(isinstance(c, bool) or not isinstance(c, int) for c in config.choices):
        raise ConfigError(f"allocation.choices={config.choices} must be a list of bit widths, e.g. [2,3,4,8]")
    if len(set(config.choices)) != len(config.choices):
        raise ConfigError(f"allocation.choices={config.choices} names a width twice")
    if config.target_bits < min(config.choices):
        raise ConfigError(f"allocation.target_bits={config.target_bits} is below the lowest choice "
                          f"({min(config.choices)} bits in allocation.choices={config.choices}): no allocation fits")


def plan(config: AllocationConfig, model: Any, group_size: int) -> AllocationPlan:
    """Read and check the sensitivity record against the run (model, group size, widths), then
    allocate. Everything here happens before the model loads; errors say what to change."""
    from quantlab.experiments.run.sensitivity import read_record

    check_config(config)
    record, path = read_record(config.sensitivity)
    theirs, ours = record["model"], asdict(model)
    identity = ("name", "source", "path", "revision", "random_config", "seed")
    differs = [key for key in identity if theirs["spec"].get(key) != ours.get(key)]
    if differs:
        raise ConfigError(f"allocation.sensitivity={path} was measured on model {theirs['spec'].get('name')!r}, "
                          f"not on this run's {model.name!r} (differs in {', '.join(differs)}): measure this model "
                          "with experiment=sensitivity first")
    if record["group_size"] != group_size:
        raise ConfigError(f"allocation.sensitivity={path} measured group_size={record['group_size']}, the run has "
                          f"group_size={group_size}: the bit counts would not hold; set group_size={record['group_size']}")
    missing = sorted(set(config.choices) - set(record["bits"]))
    if missing:
        raise ConfigError(f"allocation.choices={config.choices}: width(s) {missing} were not measured in {path} "
                          f"(it has {record['bits']}); choose among those")
    costs = _costs(record, config.choices, config.damage)
    if config.solver == "dp":
        widths, steps = dp_allocation(costs, config.choices, config.target_bits, config.dp_buckets), []
    else:
        widths, steps = greedy_allocation(costs, config.choices, config.target_bits)
    numel = sum(u.numel for u in costs)
    predicted = sum(u.bits[widths[u.name]] for u in costs) / numel
    return AllocationPlan(
        target_bits=config.target_bits, choices=sorted(config.choices), damage=config.damage, solver=config.solver,
        source=str(path),
        unit=record["unit"], widths=widths, steps=steps, rules=unit_rules(record, widths),
        predicted_avg_bits=predicted, predicted_damage=sum(u.damage[widths[u.name]] for u in costs),
        model_fingerprint=theirs.get("fingerprint"),
    )


def write_rules(plan_: AllocationPlan, run_dir: Path) -> Path:
    """`allocation_rules.yaml`: the rules in the form `modules=` and the `rules` group take."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / RULES_FILE
    header = (f"# allocation to {plan_.target_bits} bits from {plan_.source} ({plan_.solver} on {plan_.damage}); "
              f"predicted avg_bits {plan_.predicted_avg_bits:.6f}\n")
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create({"modules": plan_.rules})))
    return path
