"""Datasets, evaluation windows and calibration samples for quantlab (GPTQ protocol).

- `sources`: named dataset splits as raw rows, local data directory first, then the HF hub.
- `protocols`: perplexity evaluation windows (`eval_windows`).
- `calibration`: GPTQ-style calibration samples (`calibration_samples`).
- `custom`: calibration documents from any file (`calib=custom`) or hub dataset (`calib=hf`).
"""

from .calibration import (
    CALIBRATION_DATASETS,
    CalibrationSpec,
    calibration_fingerprint,
    calibration_samples,
    calibration_set,
)
from .custom import CalibrationTextError, TextSource
from .protocols import EVAL_DATASETS, EvalWindows, eval_windows
from .sources import KNOWN_DATASETS, DatasetNotFound, data_dir, dataset_variant, load_rows

__all__ = [
    "CALIBRATION_DATASETS",
    "EVAL_DATASETS",
    "KNOWN_DATASETS",
    "CalibrationSpec",
    "CalibrationTextError",
    "DatasetNotFound",
    "EvalWindows",
    "TextSource",
    "calibration_fingerprint",
    "calibration_samples",
    "calibration_set",
    "data_dir",
    "dataset_variant",
    "eval_windows",
    "load_rows",
]
