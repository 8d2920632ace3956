"""Named datasets: rows of the real files, resolution order, variants and errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from quantlab.experiments.data import hub
from quantlab.experiments.data.sources import DatasetNotFound, data_dir, dataset_variant, load_rows

# --- data directory ---------------------------------------------------------------------


def test_data_dir_from_env_else_data_under_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_DATA_DIR", str(tmp_path / "elsewhere"))
    assert data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("QUANTLAB_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert data_dir() == tmp_path / "data"


# --- real files (rows must equal the HF datasets the reference loads) -------------------


def test_wikitext2_test_rows_match_hf_layout(real_data):
    rows = load_rows("wikitext2", "test")
    assert len(rows) == 4358
    # HF rows: a blank line (" \n") becomes "", other lines keep their spaces and "\n".
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert all(r == "" or (r.endswith("\n") and r.strip()) for r in rows)
    variant = dataset_variant("wikitext2", "test")
    assert variant.startswith("wikitext2:test:local:wiki.test.raw:rows_sha256=")
    assert len(variant.rsplit("=", 1)[1]) == 12


def test_wikitext2_validation_is_flagged_approximate(real_data):
    with pytest.warns(UserWarning, match="approximate"):
        rows = load_rows("wikitext2", "validation")
    assert len(rows) == 3760
    with pytest.warns(UserWarning):
        assert ":local-approx:wiki.valid.approx.raw:" in dataset_variant("wikitext2", "validation")


def test_ptb_rows_are_stripped_lines_of_each_file(real_data):
    counts = {"train": 42068, "validation": 3370, "test": 3761}  # train comes from the .gz
    for split, count in counts.items():
        rows = load_rows("ptb", split)
        assert len(rows) == count
        assert rows[0] == rows[0].strip() and rows[0]
    assert load_rows("ptb", "test")[0] == "no it was n't black monday"
    assert ":ptb.train.txt.gz:" in dataset_variant("ptb", "train")


def test_local_c4_halves_are_disjoint_and_cover_the_sample(real_data):
    with gzip.open(real_data / "c4" / "c4_en_validation_sample_2k.json.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    evaluation, calibration = load_rows("c4", "validation"), load_rows("c4", "train")
    assert evaluation == docs[:1000] and calibration == docs[1000:2000]
    assert not set(evaluation) & set(calibration)
    assert "local-sample" in dataset_variant("c4", "validation")
    assert "[0:1000]" in dataset_variant("c4", "validation")
    assert "[1000:2000]" in dataset_variant("c4", "train")


# --- pydocs -------------------------------------------------------------------------------


def test_pydocs_split_is_disjoint_complete_and_deterministic(monkeypatch):
    monkeypatch.setenv("QUANTLAB_DATA_DIR", "/nonexistent")  # needs no files
    train, test = load_rows("pydocs", "train"), load_rows("pydocs", "test")
    keys = sorted(topics)
    assert test == list(dict.fromkeys(topics[k] for k in keys[::5]))  # every 5th topic, sorted by key
    train_topics = {topics[k] for i, k in enumerate(keys) if i % 5}
    assert 0.8 * sum(map(len, train_topics)) < sum(map(len, train)) <= sum(map(len, train_topics))
    assert not set(train) & set(test)  # even where two topics share one text
    assert len(train) == len(set(train)) and len(test) == len(set(test))
    assert load_rows("pydocs", "test") == test
    # Broad topics repeat narrow ones ("specialnames" holds "customization"): the shared
    # paragraphs are removed from train, so no long span of train text is evaluation text.
    train_text, test_text = "\n\n".join(train), "\n\n".join(test)
    assert not any(train_text[i : i + 512] in test_text for i in range(0, len(train_text) - 512, 64))
    assert dataset_variant("pydocs", "test").startswith("pydocs:test:cpython-")
    assert dataset_variant("pydocs", "test") != dataset_variant("pydocs", "train")


# --- local files and variants ------------------------------------------------------------


def test_wikitext_rows_from_a_fake_file(fake_data, put_file):
    put_file("wikitext2/wiki.test.raw", " \n = A = \n \n Some text . \n")
    assert load_rows("wikitext2", "test") == ["", " = A = \n", "", " Some text . \n"]


def test_canonical_validation_file_is_preferred_over_the_approximation(fake_data, put_file):
    put_file("wikitext2/wiki.valid.approx.raw", " approx \n")
    put_file("wikitext2/wiki.valid.raw", " exact \n")
    assert load_rows("wikitext2", "validation") == [" exact \n"]
    assert ":local:wiki.valid.raw:" in dataset_variant("wikitext2", "validation")


def test_variant_hash_follows_the_content(fake_data, put_file):
    put_file("ptb/ptb.test.txt", " a b \n")
    first = dataset_variant("ptb", "test")
    put_file("ptb/ptb.test.txt", " a c \n")
    second = dataset_variant("ptb", "test")
    assert first != second
    assert first.rsplit(":", 1)[0] == second.rsplit(":", 1)[0] == "ptb:test:local:ptb.test.txt"


def test_c4_halves_of_a_fake_sample(fake_data, put_c4):
    put_c4([f"doc {i}" for i in range(6)])
    assert load_rows("c4", "validation") == ["doc 0", "doc 1", "doc 2"]
    assert load_rows("c4", "train") == ["doc 3", "doc 4", "doc 5"]


# --- errors and the hub -------------------------------------------------------------------


def test_missing_file_offline_names_every_path_and_the_fix(fake_data):
    with pytest.raises(DatasetNotFound) as info:
        load_rows("wikitext2", "train")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(fake_data / "wikitext2" / "wiki.train.raw") in message
    assert str(fake_data / "wikitext2" / "wiki.train.raw.gz") in message
    assert "wikitext/wikitext-2-raw-v1" in message
    assert "HF_DATASETS_OFFLINE=1" in message
    assert "$QUANTLAB_DATA_DIR/wikitext2/wiki.train.raw" in message
    assert info.value.paths_tried == [
        fake_data / "wikitext2/wiki.train.raw",
        fake_data / "wikitext2/wiki.train.raw.gz",
    ]


def test_hub_is_used_only_when_no_local_file(fake_data, put_file, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_hub(name, split):
        calls.append((name, split))
        return ["hub row"]

    monkeypatch.setattr(hub, "load_hub_rows", fake_hub)
    assert load_rows("ptb", "test") == ["hub row"]
    assert dataset_variant("ptb", "test").startswith("hf:ptb_text_only/penn_treebank:test:rows_sha256=")
    put_file("ptb/ptb.test.txt", " local \n")
    calls.clear()
    assert load_rows("ptb", "test") == ["local"]
    assert calls == []


def test_hub_failure_becomes_dataset_not_found(fake_data, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def broken_hub(name, split):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(hub, "load_hub_rows", broken_hub)
    with pytest.raises(DatasetNotFound, match="no route to host") as info:
        load_rows("c4", "train")
    assert "allenai/c4:en/c4-train.00000-of-01024.json.gz" in str(info.value)
    assert str(fake_data / "c4" / "c4_en_validation_sample_2k.json.gz") in str(info.value)


def test_hub_offline_also_honours_hf_hub_offline(fake_data, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "load_hub_rows", lambda name, split: pytest.fail("hub called while offline"))
    with pytest.raises(DatasetNotFound, match="HF_HUB_OFFLINE=1"):
        load_rows("ptb", "validation")


def test_unknown_dataset_and_split_list_the_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="wikitext2, ptb, c4, pydocs"):
        load_rows("wikitext103", "test")
    with pytest.raises(ValueError, match="train, validation"):
        load_rows("c4", "test")


def test_no_data_file_is_inside_the_repository():
    repo = Path(__file__).resolve().parents[3]
    suffixes = {".raw", ".gz", ".jsonl", ".bz2", ".parquet"}
    found = [p for p in (repo / "experiments" / "data").rglob("*") if p.suffix in suffixes]
    assert found == []
