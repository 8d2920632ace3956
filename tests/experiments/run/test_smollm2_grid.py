"""SmolLM2-135M's weights come from a Q4_1 GGUF: every run of 32 weights is {min + k*step}, k in
0..15. A 4-bit group-32 raw min-max grid with a floating zero-point must therefore reproduce the
model exactly: a real check of the grids, the group indexing and the driver on a real model."""

import pytest
import torch

from quantlab.experiments.data.protocols import eval_windows
from quantlab.experiments.evaluation.perplexity import perplexity
from quantlab.experiments.run.pipeline import quantize_model
from quantlab.methods.rtn import RTN, RTNConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def windows(data_dir, smollm2):
    return eval_windows("wikitext2", smollm2.tokenizer, seqlen=512, max_windows=6).input_ids


def test_q4_1_grid_is_lossless_and_preserves_perplexity(fresh_smollm2, smollm2, windows):
    baseline = perplexity(smollm2.model, smollm2.architecture, windows, batch_size=2)
    config = RTNConfig(bits=4, group_size=32, zero_in_range=False, float_zero=True)
    report = quantize_model(fresh_smollm2.model, fresh_smollm2.architecture, RTN(config), None, torch.device("cpu"))
    assert len(report.layers) == 30 * 7
    assert max(r.rel_weight_error for r in report.layers) < 1e-6
    quantized = perplexity(fresh_smollm2.model, fresh_smollm2.architecture, windows, batch_size=2)
    assert quantized.value == pytest.approx(baseline.value, rel=1e-5)
    # 4 bits + (fp16 scale + fp16 zero) / 32
    assert report.avg_bits == pytest.approx(4 + 32 / 32)


def test_integer_zero_point_grid_is_not_lossless(fresh_smollm2):
    """The same grid with a rounded (integer) zero-point cannot hit Q4_1's arbitrary minima."""
    config = RTNConfig(bits=4, group_size=32, zero_in_range=False)
    report = quantize_model(fresh_smollm2.model, fresh_smollm2.architecture, RTN(config), None, torch.device("cpu"))
    assert min(r.rel_weight_error for r in report.layers) > 1e-3
