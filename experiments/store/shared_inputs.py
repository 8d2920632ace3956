"""What runs share through the cache (experiments/store/cache.py): tokenized evaluation windows,
calibration tensors and the inputs of block 0, each computed once per key on a machine.

Keys hold everything that determines the entry: the text's variant (origin and content hash),
the tokenizer (its name and a hash of its full serialization), the sizes and seeds, the model's
fingerprint, dtype and device, and the versions of the code that computes it. Bump a
`*_VERSION` below when that code changes what it computes.
"""

from __future__ import annotations

import hashlib
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from quantlab.experiments.data.calibration import (
    CalibrationSpec,
    calibration_fingerprint,
    calibration_set,
    calibration_source,
)
from quantlab.experiments.data.protocols import STREAM_TEXTS, EvalWindows, eval_windows
from quantlab.experiments.data.sources import dataset_variant
from quantlab.experiments.data.tokenization import tokenizer_name
from quantlab.experiments.models.loading import LoadedModel
from quantlab.experiments.run.pipeline import BlockInputs, capture_block_inputs
from quantlab.experiments.store.cache import Cache

EVAL_WINDOWS_VERSION = 1
CALIBRATION_VERSION = 1
BLOCK_INPUTS_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, str]:
    """Name and content hash of a tokenizer: two tokenizers with the same vocabulary, merges,
    normalizer and post-processor (which adds the BOS) tokenize alike. (Not memoized by id():
    a sweep process loads one tokenizer per job, and ids are reused.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:  # a slow or fake tokenizer: its vocabulary is what we can see
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        content = repr(sorted(vocab.items())) + type(tokenizer).__name__
    specials = repr(sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items()))
    return {
        "name": tokenizer_name(tokenizer),
        "sha256": hashlib.sha256((content + specials).encode()).hexdigest()[:16],
    }


def _eval_text(dataset: str) -> tuple[str, str]:
    """(source dataset, split) an evaluation set is cut from."""
    if dataset == "c4":
        return "c4", "validation"
    text = STREAM_TEXTS[dataset]
    return text.source, text.split


def cached_eval_windows(
    dataset: str, tokenizer: Any, seqlen: int, max_windows: int | None, root: Path
) -> EvalWindows:
    if dataset != "c4" and dataset not in STREAM_TEXTS:
        return eval_windows(dataset, tokenizer, seqlen, max_windows)  # raises its own clear error
    key = {
        "dataset": dataset,
        "seqlen": seqlen,
        "max_windows": max_windows,
        "text": dataset_variant(*_eval_text(dataset)),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": EVAL_WINDOWS_VERSION,
    }

    def compute() -> dict[str, Any]:
        windows = eval_windows(dataset, tokenizer, seqlen, max_windows)
        return {"input_ids": windows.input_ids, "protocol": windows.protocol}

    entry = Cache("eval_windows", root).get_or_compute_tensors(key, compute)
    return EvalWindows(entry["input_ids"], entry["protocol"])


def calibration_key(spec: CalibrationSpec, tokenizer: Any) -> dict[str, Any]:
    """The fingerprint (which looks up the text's variant: origin and content hash), the tokenizer
    and the code version."""
    return {
        "calib": calibration_fingerprint(spec, None, tokenizer),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": CALIBRATION_VERSION,
    }


def cached_calibration_set(
    spec: CalibrationSpec, tokenizer: Any, root: Path
) -> tuple[torch.Tensor, dict, dict[str, Any] | None]:
    """`calibration_set(spec, tokenizer)` through the cache: the samples, their fingerprint, and
    the cache key (None when the text cannot be found: then the uncached call raises its error)."""
    try:
        key = calibration_key(spec, tokenizer)
    except FileNotFoundError:
        ids, fingerprint = calibration_set(spec, tokenizer)  # raises the data layer's own message
        return ids, fingerprint, None

    def compute() -> dict[str, Any]:
        ids, fingerprint = calibration_set(spec, tokenizer)
        return {"ids": ids, "fingerprint": fingerprint}

    entry = Cache("calibration", root).get_or_compute_tensors(key, compute)
    # the entry may come from the same text at another path: this run's source is recorded
    return entry["ids"], {**entry["fingerprint"], **calibration_source(spec)}, key


def block_inputs_key(loaded: LoadedModel, calib_key: dict[str, Any], batch_size: int) -> dict[str, Any]:
    return {
        "model": loaded.fingerprint,
        "family": loaded.architecture.family,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "device": loaded.device.type,
        "calib": calib_key,
        "batch_size": batch_size,
        "code": BLOCK_INPUTS_VERSION,
        # the kwargs a block receives (masks, rotary embeddings) are transformers' business
        "transformers": metadata.version("transformers"),
        "torch": str(torch.__version__),
    }


def cached_block_inputs(
    loaded: LoadedModel, calib_ids: torch.Tensor, calib_key: dict[str, Any], batch_size: int, root: Path
) -> tuple[BlockInputs, float]:
    """Block 0's inputs for `calib_ids` on the unquantized `loaded.model`, and the seconds it took
    to get them (captured, or read from the cache)."""
    start = time.perf_counter()

    def compute() -> dict[str, Any]:
        captured = capture_block_inputs(
            loaded.model, loaded.architecture, calib_ids, loaded.device, batch_size
        )
        return {"hidden": captured.hidden, "kwargs": captured.kwargs}

    key = block_inputs_key(loaded, calib_key, batch_size)
    entry = Cache("block_inputs", root).get_or_compute_tensors(key, compute, map_location=loaded.device)
    return BlockInputs(list(entry["hidden"]), list(entry["kwargs"])), time.perf_counter() - start
