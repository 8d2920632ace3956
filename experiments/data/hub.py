"""The Hugging Face hub datasets the GPTQ reference loads, used when no local file exists.

`datasets` is imported lazily: offline runs with local files never need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HubSource:
    path: str
    config: str | None
    column: str
    # Per split, the single shard the reference reads (C4 only; the full C4 is terabytes).
    data_files: dict[str, str] = field(default_factory=dict)

    def describe(self, split: str) -> str:
        """The id recorded in variants and error messages, e.g. "wikitext/wikitext-2-raw-v1"."""
        where = self.path + (f"/{self.config}" if self.config else "")
        if split in self.data_files:
            where += f":{self.data_files[split]}"
        return where


HUB_SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": HubSource("ptb_text_only", "penn_treebank", "sentence"),
    # llm-awq / AutoAWQ calibration text (the original the-eye.eu pile val.jsonl.zst is gone).
    "pile": HubSource("mit-han-lab/pile-val-backup", None, "text"),
    "c4": HubSource(
        "allenai/c4",
        None,
        "text",
        {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
}

_OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def hub_offline_reason() -> str | None:
    """Which environment variable forbids the hub ("HF_DATASETS_OFFLINE=1"), or None."""
    for variable in _OFFLINE_VARIABLES:
        value = os.environ.get(variable, "")
        if value.strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{variable}={value}"
    return None


def load_hub_rows(name: str, split: str) -> list[str]:
    """Rows of one split from the hub (network or the local HF cache); raises on any failure."""
    from datasets import load_dataset  # lazy: heavy import, and only needed without local files

    source = HUB_SOURCES[name]
    if source.data_files:
        data = load_dataset(source.path, data_files={split: source.data_files[split]}, split=split)
    else:
        data = load_dataset(source.path, source.config, split=split)
    return list(data[source.column])


def load_calibration_dataset(dataset: str, config: str | None, split: str, revision: str | None):
    """`calib=hf`: one split of any hub dataset (or a local folder `datasets` can read), as a
    `datasets.Dataset`; raises on any failure. With HF_DATASETS_OFFLINE=1, `datasets` itself
    serves it from its local cache or fails."""
    from datasets import load_dataset  # lazy, as above

    return load_dataset(dataset, config, split=split, revision=revision)
