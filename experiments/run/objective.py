"""What a run returns to Hydra's sweepers: the objective(s) named by `optimized_metric`.

Hydra hands a job's return value to its sweeper; the Optuna sweeper (`hparams_search=`, the
`search` extra) minimises it: one float for one direction, a tuple for several (NSGA-II).

    optimized_metric: null                        the first perplexity (default)
    optimized_metric: ppl:wikitext2               a float
    optimized_metric: [ppl:wikitext2, avg_bits]   a tuple, one value per direction

Names are quantlab-report's `--metric` names, read from the main method's entry of the record:
`ppl:<dataset>`, `ppl_ratio:<dataset>` (paired ratio to fp16), or one of OBJECTIVE_COLUMNS.

`bits_budget`: Optuna's Hydra plugin has no constraints, so a run whose exact bits per weight
(`avg_bits`) exceed the budget returns +inf for every objective: the sampler ranks it below every
run within budget, and the best trial is never over budget (unless every trial is). A penalty
added to the perplexity would need a scale that means the same at perplexity 6 and 6000.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantlab.methods.base import ConfigError

log = logging.getLogger("quantlab")
OBJECTIVE_COLUMNS = ("avg_bits", "model_bytes", "quantize_s", "eval_s")
RATIO_KINDS = ("ppl", "ppl_ratio")
EXAMPLES = "optimized_metric=ppl:wikitext2 or '[ppl:wikitext2,avg_bits]'"


def objective_names(value: Any) -> list[str]:
    """`optimized_metric` as a list of names (a single name is a list of one); [] for null."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    # a list from the command line or a config file is an omegaconf ListConfig: a Sequence too
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"optimized_metric={value!r} must be a name or a list of names: {EXAMPLES}")
    return list(names)


def check_objectives(resolved: dict[str, Any]) -> None:
    """Refuse, before anything loads, objectives the run will not measure and a bad budget."""
    datasets = list((((resolved.get("eval") or {}).get("ppl") or {}).get("datasets")) or [])
    for name in objective_names(resolved.get("optimized_metric")):
        kind, sep, dataset = name.partition(":")
        if sep and kind in RATIO_KINDS and dataset in datasets:
            continue
        if not sep and name in OBJECTIVE_COLUMNS:
            continue
        valid = [f"{k}:{d}" for k in RATIO_KINDS for d in datasets] + list(OBJECTIVE_COLUMNS)
        raise ConfigError(f"optimized_metric names {name!r}, which this run does not measure; "
                          f"valid: {', '.join(valid)} (a perplexity needs its dataset in eval.ppl.datasets)")
    budget = resolved.get("bits_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise ConfigError(f"bits_budget={budget!r} must be a positive number of bits per weight (e.g. 3.25) or null")


def over_budget(avg_bits: Any, budget: float | None) -> bool:
    """Whether a run's exact bits per weight exceed the budget (a run that has none is not judged)."""
    return budget is not None and avg_bits is not None and float(avg_bits) > float(budget) + 1e-9


def objective(record: dict[str, Any], names: Any = None, budget: float | None = None) -> float | tuple | None:
    """The value(s) of `names` in `record` for the sweeper: a float for one name (null: the first
    perplexity, as before), a tuple for several; +inf for each when over `budget`; None (a failed
    trial) when a value is missing."""
    import pandas as pd

    from quantlab.experiments.records.reporting.metrics import parse_metric
    from quantlab.experiments.records.reporting.records import ReportError, entry_row, method_entries

    names = objective_names(names) or [f"ppl:{ds}" for ds in ((record.get("metrics") or {}).get("ppl") or {})][:1]
    if not names:
        return None
    if over_budget(record.get("avg_bits"), budget):
        log.info("avg_bits %.4f is over bits_budget %s: objective +inf", record["avg_bits"], budget)
        return math.inf if len(names) == 1 else tuple(math.inf for _ in names)
    row = pd.DataFrame([entry_row(Path("result.json"), record, 0, method_entries(record)[0])])
    values = []
    for name in names:
        try:
            value = row[parse_metric(name, row).column].iloc[0]
        except (ReportError, KeyError):
            value = None
        if value is None or pd.isna(value):
            log.warning("optimized_metric %s: the run has no value of it; the sweeper counts a failed trial", name)
            return None
        values.append(float(value))
    return values[0] if len(values) == 1 else tuple(values)


def missing_search_plugin(argv: list[str]) -> str | None:
    """Why `hparams_search=...` cannot run here (the Optuna sweeper is not installed), or None:
    without the plugin Hydra's own error is a composition traceback."""
    import importlib.util

    if not any(arg.lstrip("+").startswith("hparams_search=") for arg in argv):
        return None
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        return ("hparams_search needs the Optuna sweeper for Hydra, which is not installed: "
                "pip install -e '.[search]' (make setup installs it)")
    return None
