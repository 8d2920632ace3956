"""Fixtures for the data tests: a decodable character tokenizer and data directories.

Real-data tests use $QUANTLAB_DATA_DIR (CI points it at the offline data folder) and are
skipped when it is not there; all others write tiny files into a temporary folder.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

REAL_DATA_DIR = Path(os.environ.get("QUANTLAB_DATA_DIR", "/nonexistent"))


class CharTokenizer:
    """Token id = Unicode code point + 3 (ids 0-2 reserved, BOS = 1).

    Deterministic, instant on megabytes of text, and decodable, so a test can check which text
    a window came from.
    """

    bos_token_id = 1

    def __init__(self, add_bos: bool = False, name_or_path: str = "char-tokenizer"):
        self.add_bos = add_bos
        self.name_or_path = name_or_path

    def __call__(self, text: str, return_tensors: str | None = None):
        ids = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).to(torch.long) + 3
        if self.add_bos:
            ids = torch.cat([torch.tensor([self.bos_token_id]), ids])
        return {"input_ids": ids[None]}

    def decode(self, ids) -> str:
        ids = torch.as_tensor(ids).flatten()
        ids = ids[ids != self.bos_token_id] - 3
        return ids.to(torch.int32).numpy().tobytes().decode("utf-32-le")


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def bos_tokenizer() -> CharTokenizer:
    return CharTokenizer(add_bos=True, name_or_path="char-tokenizer-bos")


@pytest.fixture
def real_data(monkeypatch) -> Path:
    """The offline data folder, with the hub switched off."""
    if not (REAL_DATA_DIR / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("QUANTLAB_DATA_DIR does not point at the offline data folder")
    monkeypatch.setenv("QUANTLAB_DATA_DIR", str(REAL_DATA_DIR))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return REAL_DATA_DIR


@pytest.fixture
def fake_data(tmp_path, monkeypatch) -> Path:
    """An empty data folder (fill it with the helpers below), with the hub switched off."""
    monkeypatch.setenv("QUANTLAB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


@pytest.fixture
def put_file(fake_data):
    """put_file(relpath, text): write a (gzipped when .gz) text file into the fake data folder."""

    def put(relpath: str, text: str) -> Path:
        path = fake_data / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".gz":
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    return put


@pytest.fixture
def put_c4(put_file):
    """put_c4(docs): write docs as the local C4 sample (JSON lines, gzipped)."""

    def put(docs: list[str]) -> Path:
        lines = "".join(json.dumps({"text": d, "url": f"u{i}"}) + "\n" for i, d in enumerate(docs))
        return put_file("c4/c4_en_validation_sample_2k.json.gz", lines)

    return put
