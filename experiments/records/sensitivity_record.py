"""The sensitivity record's format, shared by the run that writes it (experiments/run/sensitivity.py),
the allocation that reads it (experiments/run/allocation.py) and the report (reporting/sensitivity.py).

    {"version", "model": {"spec", "fingerprint"}, "method", "method_config", "group_size", "unit",
     "bits": [widths], "config", "protocol", "reference": {"ppl", "window_nll"}, "seconds",
     "units": [{"name", "block", "role", "linears", "numel",
                "widths": {"<bits>": {"storage_bits", "ppl", "nll_delta": {mean_nll_delta, ci_low, ci_high,
                                      ppl_ratio}, "kl": {mean_kl, ...}, "proxies": {...}, "seconds",
                                      "window_nll"}}}]}
"""

from __future__ import annotations

from typing import Any

SENSITIVITY_FILE = "sensitivity.json"  # beside result.json in an experiment=sensitivity run
RECORD_VERSION = 1
DAMAGES = {"nll_delta": "ΔNLL", "kl": "KL"}  # the measured damages, by their short labels


def damage_of(entry: dict[str, Any], damage: str) -> float:
    """A unit × width entry's measured damage: the mean paired NLL increase, or the mean KL."""
    return float(entry["nll_delta"]["mean_nll_delta"] if damage == "nll_delta" else entry["kl"]["mean_kl"])
