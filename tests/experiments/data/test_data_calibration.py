"""Calibration samples: GPTQ draws, seeds, the c4 `>` rule, disjointness from evaluation."""

from __future__ import annotations

import random

import pytest
import torch

from quantlab.experiments.data.calibration import (
    CalibrationSpec,
    calibration_fingerprint,
    calibration_samples,
)
from quantlab.experiments.data.sources import dataset_variant, load_rows


def test_private_random_gives_the_same_draws_as_seeding_the_module():
    saved = random.getstate()
    try:
        random.seed(0)
        module_draws = [random.randint(0, n) for n in (10, 1_000_000, 3, 2**40, 7) * 20]
    finally:
        random.setstate(saved)
    rng = random.Random(0)
    assert [rng.randint(0, n) for n in (10, 1_000_000, 3, 2**40, 7) * 20] == module_draws


def test_stream_windows_follow_the_gptq_draws(fake_data, put_file, tokenizer):
    put_file("ptb/ptb.train.txt.gz", "".join(f" sentence number {i} \n" for i in range(300)))
    samples = calibration_samples(CalibrationSpec("ptb", nsamples=16, seqlen=64, seed=3), tokenizer)
    ids = tokenizer("\n\n".join(load_rows("ptb", "train")))["input_ids"][0]
    rng = random.Random(3)
    expected = []
    for _ in range(16):
        i = rng.randint(0, ids.numel() - 64 - 1)
        expected.append(ids[i : i + 64])
    assert samples.dtype == torch.long
    assert torch.equal(samples, torch.stack(expected))


def test_ptb_new_calibration_joins_with_spaces(fake_data, put_file, tokenizer):
    put_file("ptb/ptb.train.txt.gz", "".join(f" s{i} \n" for i in range(200)))
    samples = calibration_samples(CalibrationSpec("ptb-new", nsamples=8, seqlen=16), tokenizer)
    text = " ".join(load_rows("ptb", "train"))
    assert all(tokenizer.decode(w) in text for w in samples)
    assert "\n" not in "".join(tokenizer.decode(w) for w in samples)


def test_reproducible_by_seed_and_different_across_seeds(monkeypatch, tokenizer):
    monkeypatch.setenv("QUANTLAB_DATA_DIR", "/nonexistent")  # pydocs needs no files
    before = random.getstate()
    a = calibration_samples(CalibrationSpec("pydocs", nsamples=32, seqlen=256, seed=0), tokenizer)
    b = calibration_samples(CalibrationSpec("pydocs", nsamples=32, seqlen=256, seed=0), tokenizer)
    c = calibration_samples(CalibrationSpec("pydocs", nsamples=32, seqlen=256, seed=1), tokenizer)
    assert random.getstate() == before  # the global generator is left alone
    assert a.shape == (32, 256)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def assert_windows_drawn_from(samples, tokenizer, calibration_text: str, evaluation_text: str) -> None:
    for window in samples:
        text = tokenizer.decode(window)
        assert text in calibration_text and text not in evaluation_text


def test_pydocs_calibration_never_sees_evaluation_text(monkeypatch, tokenizer):
    monkeypatch.setenv("QUANTLAB_DATA_DIR", "/nonexistent")
    samples = calibration_samples(CalibrationSpec("pydocs", nsamples=64, seqlen=512), tokenizer)
    assert_windows_drawn_from(
        samples, tokenizer, "\n\n".join(load_rows("pydocs", "train")), "\n\n".join(load_rows("pydocs", "test"))
    )


def test_c4_accepts_only_docs_longer_than_seqlen(fake_data, put_c4, tokenizer):
    # Train half = the last 4 docs. The doc of exactly seqlen tokens must never be used (GPTQ's
    # train loop uses `>`), and every window comes from the one longer doc at a reference start.
    long_doc = "".join(chr(ord("A") + k) for k in range(40))
    train = ["q" * 32, "a" * 20, long_doc, "b" * 5]
    put_c4(["e0", "e1", "e2", "e3", *train])
    samples = calibration_samples(CalibrationSpec("c4", nsamples=20, seqlen=32, seed=5), tokenizer)
    rng, expected = random.Random(5), []
    for _ in range(20):  # the reference loop, written out
        while True:
            doc = train[rng.randint(0, len(train) - 1)]
            if len(doc) > 32:
                break
        i = rng.randint(0, len(doc) - 32 - 1)
        expected.append(doc[i : i + 32])
    assert [tokenizer.decode(w) for w in samples] == expected
    assert len(set(expected)) > 1  # the starts do vary, so the comparison is not vacuous


def test_c4_calibration_matches_the_reference_loop_on_varied_docs(fake_data, put_c4, tokenizer):
    rng = random.Random(11)
    docs = [f"<{i}>" + "".join(rng.choice("xyz ") for _ in range(rng.randint(10, 90))) for i in range(200)]
    put_c4(docs)
    train = docs[100:]
    samples = calibration_samples(CalibrationSpec("c4", nsamples=24, seqlen=48, seed=2), tokenizer)
    draw, expected = random.Random(2), []
    for _ in range(24):
        while True:
            ids = tokenizer(train[draw.randint(0, len(train) - 1)])["input_ids"][0]
            if ids.numel() > 48:
                break
        i = draw.randint(0, ids.numel() - 48 - 1)
        expected.append(ids[i : i + 48])
    assert torch.equal(samples, torch.stack(expected))


def test_local_c4_calibration_uses_only_the_second_half(real_data, tokenizer):
    samples = calibration_samples(CalibrationSpec("c4", nsamples=16, seqlen=512), tokenizer)
    assert_windows_drawn_from(
        samples, tokenizer, "\x00".join(load_rows("c4", "train")), "\x00".join(load_rows("c4", "validation"))
    )


def test_not_enough_text_names_dataset_seqlen_and_length(fake_data, put_file, put_c4, tokenizer):
    put_file("ptb/ptb.train.txt.gz", " tiny \n")
    with pytest.raises(ValueError, match=r"ptb: .*seqlen=64.*only 4 tokens"):
        calibration_samples(CalibrationSpec("ptb", nsamples=1, seqlen=64), tokenizer)
    put_c4(["e", "f", "a" * 9, "b" * 30])
    with pytest.raises(ValueError, match=r"c4: no document has > seqlen=30 tokens .*longest.*30 tokens"):
        calibration_samples(CalibrationSpec("c4", nsamples=1, seqlen=30), tokenizer)


def test_wikitext2_train_is_missing_offline(real_data, tokenizer):
    from quantlab.experiments.data.sources import DatasetNotFound

    with pytest.raises(DatasetNotFound, match="wiki.train.raw"):
        calibration_samples(CalibrationSpec("wikitext2"), tokenizer)


def test_spec_rejects_unknown_datasets_and_bad_sizes():
    with pytest.raises(ValueError, match="c4, wikitext2, ptb, ptb-new, pydocs, pile"):
        CalibrationSpec("openwebtext")
    with pytest.raises(ValueError, match="sampling 'smooth'.*gptq, awq"):
        CalibrationSpec("c4", sampling="smooth")
    with pytest.raises(ValueError):
        CalibrationSpec("c4", nsamples=0)


def test_fingerprint_holds_everything_that_determines_the_tensor(monkeypatch, tokenizer):
    monkeypatch.setenv("QUANTLAB_DATA_DIR", "/nonexistent")
    spec = CalibrationSpec("pydocs", nsamples=4, seqlen=128, seed=9)
    fingerprint = calibration_fingerprint(spec, tokenizer=tokenizer)
    assert fingerprint["variant"] == dataset_variant("pydocs", "train")
    assert {k: fingerprint[k] for k in ("dataset", "nsamples", "seqlen", "seed", "split", "join")} == {
        "dataset": "pydocs",
        "nsamples": 4,
        "seqlen": 128,
        "seed": 9,
        "split": "train",
        "join": "\n\n",
    }
    assert fingerprint["tokenizer"] == "char-tokenizer"
    assert calibration_fingerprint(spec, "v1") != calibration_fingerprint(spec, "v2")
    assert calibration_fingerprint(spec, "v1") != calibration_fingerprint(
        CalibrationSpec("pydocs", 4, 128, 8), "v1"
    )
    assert calibration_fingerprint(CalibrationSpec("c4"), "v")["join"] is None


def test_calibration_set_equals_samples_and_fingerprint_from_one_read(monkeypatch, tokenizer):
    from quantlab.experiments.data.calibration import calibration_fingerprint, calibration_set

    monkeypatch.setenv("QUANTLAB_DATA_DIR", "/nonexistent")
    spec = CalibrationSpec("pydocs", nsamples=8, seqlen=128, seed=3)
    samples, fingerprint = calibration_set(spec, tokenizer)
    assert torch.equal(samples, calibration_samples(spec, tokenizer))
    assert fingerprint == calibration_fingerprint(spec, tokenizer=tokenizer)
