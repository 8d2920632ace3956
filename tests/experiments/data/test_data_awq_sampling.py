"""AWQ's calibration sampling: datasets' shuffle order, the 512-token line rule, floor(total / 512) blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlab.experiments.data.awq_sampling import draw_awq_blocks, shuffled_order
from quantlab.experiments.data.calibration import (
    CalibrationSpec,
    calibration_fingerprint,
    calibration_samples,
)


def test_shuffle_order_is_the_datasets_library_order():
    datasets = pytest.importorskip("datasets")
    rows = [str(i) for i in range(500)]
    shuffled = datasets.Dataset.from_dict({"text": rows}).shuffle(seed=42)["text"]
    assert [rows[i] for i in shuffled_order(500, 42)] == shuffled


def test_blocks_are_the_concatenated_short_lines_cut_into_block_size(tokenizer):
    # char tokenizer: a line of n characters is n tokens; the rule counts the stripped line
    lengths = [100, 600, 512, 513, 5, 300, 50, 700, 200, 120]
    rows = [" " + "x" * n + "\n" for n in lengths]
    result = draw_awq_blocks(rows, tokenizer, n_lines=5, block_size=128, seed=7, dataset="test")
    order = shuffled_order(len(rows), 7)
    accepted, skipped = [], 0
    for i in order:
        if 0 < lengths[i] <= 512:
            accepted.append(lengths[i])
            if len(accepted) == 5:
                break
        else:
            skipped += 1
    total = sum(accepted)
    assert result.lines_used == 5 and result.lines_skipped == skipped and result.total_tokens == total
    assert result.blocks.shape == (total // 128, 128)  # floor(total / block); the remainder is dropped
    stream = torch.cat(
        [tokenizer(rows[i].strip())["input_ids"][0] for i in order if 0 < lengths[i] <= 512][:5]
    )
    assert torch.equal(result.blocks.flatten(), stream[: (total // 128) * 128])


def test_lines_over_512_tokens_are_skipped_whatever_the_block_size(tokenizer):
    rows = ["a" * 513, "b" * 512, "c" * 1000]
    result = draw_awq_blocks(rows, tokenizer, n_lines=10, block_size=256, seed=0, dataset="test")
    assert result.lines_used == 1 and result.lines_skipped == 2 and result.blocks.shape == (2, 256)
    assert set(result.blocks.flatten().tolist()) == {ord("b") + 3}
    with pytest.raises(ValueError, match="less than one block of 1024"):
        draw_awq_blocks(rows, tokenizer, n_lines=10, block_size=1024, seed=0, dataset="test")


def test_awq_sampling_through_the_calibration_spec(monkeypatch, tokenizer):
    monkeypatch.setenv("QUANTLAB_DATA_DIR", "/nonexistent")  # pydocs needs no files
    spec = CalibrationSpec("pydocs", nsamples=16, seqlen=128, seed=42, sampling="awq")
    samples = calibration_samples(spec, tokenizer)
    assert samples.shape[1] == 128 and samples.shape[0] >= 1
    assert not torch.equal(
        samples[:1], calibration_samples(CalibrationSpec("pydocs", 16, 128, 0), tokenizer)[:1]
    )
    fingerprint = calibration_fingerprint(spec, tokenizer=tokenizer)
    assert fingerprint["sampling"].startswith("awq:") and fingerprint["seed"] == 42


def test_pile_offline_says_to_use_c4_or_pydocs(monkeypatch, tokenizer):
    from quantlab.experiments.data.calibration import CalibrationDataUnavailable

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CalibrationDataUnavailable, match=r"(?s)pile-val-backup.*calib=c4 or calib=pydocs"):
        calibration_samples(
            CalibrationSpec("pile", nsamples=128, seqlen=512, seed=42, sampling="awq"), tokenizer
        )
    assert np.array_equal(shuffled_order(3, 0), np.random.default_rng(0).permutation(3))
