"""Calibration samples: `nsamples` random windows of `seqlen` tokens, drawn as GPTQ does.

The windows come from the "train" split of a dataset (for the local C4 sample: the half of it
that evaluation never sees). Python's `random`, seeded once before the loop, decides every
draw, exactly as in GPTQ `datautils.py` (methods.md §9.1).

`sampling="awq"` draws as the AWQ reference instead (awq_sampling.py, methods.md §4.2):
`nsamples` lines of at most 512 tokens, shuffled with `seed`, concatenated and cut into
`seqlen`-token blocks. `pile` (the AWQ reference's pile-val, its validation split) is read from
the hub only.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from .awq_sampling import draw_awq_blocks
from .gptq_sampling import draw_document_windows, draw_stream_windows
from .sources import DatasetNotFound, ResolvedRows, dataset_variant, resolve_rows
from .tokenization import encode, tokenizer_name

# dataset -> (source dataset, text join or None for per-document sampling)
CALIBRATION_SOURCES: dict[str, tuple[str, str | None]] = {
    "c4": ("c4", None),  # GPTQ get_c4: random documents, each tokenized alone
    "wikitext2": ("wikitext2", "\n\n"),  # GPTQ get_wikitext2 (SliM-LLM joins with " " instead)
    "ptb": ("ptb", "\n\n"),  # GPTQ get_ptb
    "ptb-new": ("ptb", " "),  # GPTQ get_ptb_new
    "pydocs": ("pydocs", "\n\n"),
    "pile": ("pile", None),  # mit-han-lab/pile-val-backup (AWQ); gptq sampling draws per document, as c4
}
CALIBRATION_DATASETS = tuple(CALIBRATION_SOURCES)
CALIBRATION_SPLIT = "train"
# Datasets calibrated on another split: pile-val has only a validation split (llm-awq uses it).
CALIBRATION_SPLITS = {"pile": "validation"}
SAMPLINGS = ("gptq", "awq")
AWQ_MAX_LINE_TOKENS = 512  # llm-awq calib_data.py skips longer lines whatever the block size


class CalibrationDataUnavailable(FileNotFoundError):
    """The calibration text cannot be read (offline pile); the message names the alternatives."""


def calibration_split(dataset: str) -> str:
    return CALIBRATION_SPLITS.get(dataset, CALIBRATION_SPLIT)


@dataclass(frozen=True)
class CalibrationSpec:
    dataset: str
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sampling: str = "gptq"  # gptq: random windows; awq: nsamples lines -> seqlen-token blocks

    def __post_init__(self) -> None:
        if self.dataset not in CALIBRATION_SOURCES:
            raise ValueError(
                f"unknown calibration dataset {self.dataset!r}; known: {', '.join(CALIBRATION_DATASETS)}"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown calibration sampling {self.sampling!r}; known: {', '.join(SAMPLINGS)}")
        if self.nsamples < 1 or self.seqlen < 1:
            raise ValueError(f"nsamples and seqlen must be >= 1, got {self.nsamples} and {self.seqlen}")


def _sampling_rule(spec: CalibrationSpec) -> str:
    if spec.sampling == "awq":
        return (
            f"awq: rows shuffled by numpy default_rng(seed).permutation (datasets.shuffle), stripped, "
            f"lines of 1..{AWQ_MAX_LINE_TOKENS} tokens, first nsamples lines concatenated, cut into seqlen blocks"
        )
    if CALIBRATION_SOURCES[spec.dataset][1] is None:
        return "gptq-c4: random document with > seqlen tokens, window start randint(0, n-seqlen-1)"
    return "gptq-stream: joined text tokenized once, window start randint(0, n-seqlen-1)"


def calibration_samples(spec: CalibrationSpec, tokenizer) -> torch.Tensor:
    """[nsamples, seqlen] int64 token windows for calibration, reproducible from `spec`."""
    return _draw(spec, tokenizer, _resolve(spec).rows)


def calibration_set(spec: CalibrationSpec, tokenizer) -> tuple[torch.Tensor, dict]:
    """The samples and their fingerprint, reading the calibration text once for both."""
    resolved = _resolve(spec)
    samples = _draw(spec, tokenizer, resolved.rows)
    return samples, calibration_fingerprint(spec, resolved.variant, tokenizer)


def _resolve(spec: CalibrationSpec) -> ResolvedRows:
    source, _ = CALIBRATION_SOURCES[spec.dataset]
    try:
        return resolve_rows(source, calibration_split(spec.dataset))
    except DatasetNotFound as exc:
        if spec.dataset != "pile":
            raise
        raise CalibrationDataUnavailable(
            f"{exc}\nThe AWQ reference's pile-val is only on the hub; offline, calibrate on c4 or pydocs "
            "instead (calib=c4 or calib=pydocs; add calib.sampling=awq calib.seqlen=512 for AWQ's sampling)."
        ) from exc


def _draw(spec: CalibrationSpec, tokenizer, rows: list[str]) -> torch.Tensor:
    if spec.sampling == "awq":
        return draw_awq_blocks(
            rows, tokenizer, spec.nsamples, spec.seqlen, spec.seed, AWQ_MAX_LINE_TOKENS, dataset=spec.dataset
        ).blocks
    join = CALIBRATION_SOURCES[spec.dataset][1]
    # Same sequence as random.seed(seed) followed by the module-level functions, without
    # touching the global generator other code may rely on.
    rng = random.Random(spec.seed)
    if join is None:
        # GPTQ's C4 train loop accepts a document only when it has *more* than seqlen tokens
        # (its validation loop uses >=; see protocols.py).
        windows = draw_document_windows(
            rows, tokenizer, rng, spec.nsamples, spec.seqlen, accept_equal=False, dataset=spec.dataset
        ).windows
    else:
        ids = encode(tokenizer, join.join(rows))
        windows = draw_stream_windows(ids, rng, spec.nsamples, spec.seqlen, dataset=spec.dataset)
    return torch.stack(windows)


def calibration_fingerprint(spec: CalibrationSpec, variant: str | None = None, tokenizer=None) -> dict:
    """Everything that determines `calibration_samples(spec, tokenizer)`.

    `variant` is the dataset variant of the calibration text; when omitted it is looked up
    (which reads the text). Pass `tokenizer` to record it too: the tokens depend on it.
    """
    source, join = CALIBRATION_SOURCES[spec.dataset]
    fingerprint = {
        **asdict(spec),
        "split": calibration_split(spec.dataset),
        "variant": variant if variant is not None else dataset_variant(source, calibration_split(spec.dataset)),
        "join": join,
        "sampling": _sampling_rule(spec),
        "rng": "numpy default_rng(seed), one permutation"
        if spec.sampling == "awq"
        else "python random.Random(seed), seeded once before the loop",
    }
    if tokenizer is not None:
        fingerprint["tokenizer"] = tokenizer_name(tokenizer)
    return fingerprint
