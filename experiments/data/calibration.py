"""Calibration samples: `nsamples` random windows of `seqlen` tokens, drawn as GPTQ does.

The windows come from the "train" split of a dataset (for the local C4 sample: the half of it
that evaluation never sees). Python's `random`, seeded once before the loop, decides every
draw, exactly as in GPTQ `datautils.py` (methods.md §9.1).

`sampling="awq"` draws as the AWQ reference instead (awq_sampling.py, methods.md §4.2):
`nsamples` lines of at most 512 tokens, shuffled with `seed`, concatenated and cut into
`seqlen`-token blocks. `pile` (the AWQ reference's pile-val, its validation split) is read from
the hub only.

Any other text (`calib=custom`: a file; `calib=hf`: a hub dataset; custom.py reads both) is drawn
from by the same rules: with `join=None` (the default) per document, as GPTQ draws from C4;
with a `join` string from the documents joined by it and tokenized once, as GPTQ draws from
WikiText-2 ("\n\n"). `chat_template=True` first renders each document with the tokenizer's chat
template (a string as one user turn; chat messages as they are) and tokenizes the result without
adding special tokens, since the template writes its own.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import torch

from .awq_sampling import draw_awq_blocks
from .custom import CalibrationTextError, TextSource, is_messages, resolve_documents
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


# calib.join by name (a command line cannot spell "\n"); any other string is the separator itself
JOINS = {"paragraph": "\n\n", "newline": "\n", "space": " "}


def join_separator(join: str | None) -> str | None:
    """calib.join -> the separator: None (per document), a name of JOINS, or a literal string."""
    return JOINS.get(join, join) if join is not None else None


@dataclass(frozen=True)
class CalibrationSpec:
    dataset: str  # a built-in name; "custom" for a file; the dataset id for a hub dataset
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sampling: str = "gptq"  # gptq: random windows; awq: nsamples lines -> seqlen-token blocks
    source: TextSource | None = None  # calib=custom / calib=hf: where the documents are
    join: str | None = None  # custom / hf, gptq sampling: None per document, else the separator
    chat_template: bool = False  # render each document with the tokenizer's chat template first

    def __post_init__(self) -> None:
        if self.source is None and self.dataset not in CALIBRATION_SOURCES:
            raise ValueError(
                f"unknown calibration dataset {self.dataset!r}; known: {', '.join(CALIBRATION_DATASETS)}"
            )
        if self.source is None and self.join is not None:
            raise ValueError(f"calibration dataset {self.dataset!r} has its reference's own join; join is for "
                             "custom and hub texts")
        if self.source is not None and self.join is not None and self.sampling == "awq":
            raise ValueError("awq sampling takes whole documents (lines); join applies to gptq sampling only")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown calibration sampling {self.sampling!r}; known: {', '.join(SAMPLINGS)}")
        if self.nsamples < 1 or self.seqlen < 1:
            raise ValueError(f"nsamples and seqlen must be >= 1, got {self.nsamples} and {self.seqlen}")


def _join(spec: CalibrationSpec) -> str | None:
    return spec.join if spec.source is not None else CALIBRATION_SOURCES[spec.dataset][1]


def _split(spec: CalibrationSpec) -> str | None:
    if spec.source is None:
        return calibration_split(spec.dataset)
    return spec.source.split if spec.source.kind == "hf" else None  # a file has no splits


def _sampling_rule(spec: CalibrationSpec) -> str:
    if spec.sampling == "awq":
        return (
            f"awq: rows shuffled by numpy default_rng(seed).permutation (datasets.shuffle), stripped, "
            f"lines of 1..{AWQ_MAX_LINE_TOKENS} tokens, first nsamples lines concatenated, cut into seqlen blocks"
        )
    if _join(spec) is None:
        return "gptq-c4: random document with > seqlen tokens, window start randint(0, n-seqlen-1)"
    return "gptq-stream: joined text tokenized once, window start randint(0, n-seqlen-1)"


def calibration_samples(spec: CalibrationSpec, tokenizer) -> torch.Tensor:
    """[nsamples, seqlen] int64 token windows for calibration, reproducible from `spec`."""
    return _draw(spec, tokenizer, resolve_calibration_rows(spec).rows)


def calibration_set(spec: CalibrationSpec, tokenizer) -> tuple[torch.Tensor, dict]:
    """The samples and their fingerprint (with the source, for custom and hub texts), reading
    the calibration text once for both."""
    resolved = resolve_calibration_rows(spec)
    samples = _draw(spec, tokenizer, resolved.rows)
    return samples, {**calibration_fingerprint(spec, resolved.variant, tokenizer), **calibration_source(spec)}


def calibration_source(spec: CalibrationSpec) -> dict[str, Any]:
    """Where a custom or hub text was read ({"source": {...}}; {} for the built-ins): recorded with
    the run, never part of a cache key (a file's path is not its content)."""
    return {"source": spec.source.describe()} if spec.source is not None else {}


def resolve_calibration_rows(spec: CalibrationSpec) -> ResolvedRows:
    """The documents `spec` draws from and their variant; custom and hub texts are checked here
    (chat messages need chat_template), so the preflight refuses what the draw would."""
    if spec.source is not None:
        resolved = resolve_documents(spec.source)
        if not spec.chat_template and any(is_messages(row) for row in resolved.rows):
            raise CalibrationTextError(
                f"calib.field={spec.source.field!r} holds chat messages, which are text only through a chat "
                "template: add calib.chat_template=true (or name a field holding plain text)"
            )
        return resolved
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


def check_chat_template(tokenizer) -> None:
    """calib.chat_template=true needs a tokenizer that has one (base models' tokenizers rarely do)."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        raise CalibrationTextError(
            f"calib.chat_template=true, but the tokenizer {tokenizer_name(tokenizer)!r} has no chat template "
            "(a base model?); use calib.chat_template=false, or a model whose tokenizer has one"
        )


def chat_text(tokenizer, document: Any) -> str:
    """A document as the tokenizer's chat template writes it: a string as one user turn, chat
    messages as they are; no generation prompt is added."""
    messages = document if is_messages(document) else [{"role": "user", "content": document}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


class _TemplatedTokenizer:
    """Tokenizes rendered chat text adding no special tokens: the template wrote them (BOS included)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str, return_tensors: str | None = None):
        return self.tokenizer(text, return_tensors=return_tensors, add_special_tokens=False)


def _draw(spec: CalibrationSpec, tokenizer, rows: list[Any]) -> torch.Tensor:
    if spec.chat_template:
        check_chat_template(tokenizer)
        rows = [chat_text(tokenizer, row) for row in rows]
        tokenizer = _TemplatedTokenizer(tokenizer)
    if spec.sampling == "awq":
        return draw_awq_blocks(
            rows, tokenizer, spec.nsamples, spec.seqlen, spec.seed, AWQ_MAX_LINE_TOKENS, dataset=spec.dataset
        ).blocks
    join = _join(spec)
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
    (which reads the text). Pass `tokenizer` to record it too: the tokens depend on it. A custom
    file's path is not in it (its variant holds the documents' content hash): see calibration_source.
    """
    if variant is None:
        if spec.source is not None:
            variant = resolve_calibration_rows(spec).variant
        else:
            variant = dataset_variant(CALIBRATION_SOURCES[spec.dataset][0], calibration_split(spec.dataset))
    fingerprint: dict[str, Any] = {
        "dataset": spec.dataset,
        "nsamples": spec.nsamples,
        "seqlen": spec.seqlen,
        "seed": spec.seed,
        "split": _split(spec),
        "variant": variant,
        "join": _join(spec),
        "sampling": _sampling_rule(spec),
        "rng": "numpy default_rng(seed), one permutation"
        if spec.sampling == "awq"
        else "python random.Random(seed), seeded once before the loop",
    }
    if spec.chat_template:  # only when on, so the built-ins' keys stay what they were
        fingerprint["chat_template"] = "string: one user turn; messages as given; no special tokens added"
        if tokenizer is not None:  # the template's text decides the tokens, beside the vocabulary
            template = str(getattr(tokenizer, "chat_template", None))
            fingerprint["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()[:16]
    if tokenizer is not None:
        fingerprint["tokenizer"] = tokenizer_name(tokenizer)
    return fingerprint
