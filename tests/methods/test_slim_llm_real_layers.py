"""SliM-LLM on real SmolLM2-135M layers against the literal reference transcriptions of
tests/methods/test_slim_llm.py: SBA salience, the KL search per calibration sample and the whole
layer (allocation, SQC, solver) agree bit for bit on block 0's q_proj (576 inputs: 4.5 groups of
128, a short last group; its one candidate k = 1 is taken without scoring, the reference's
argmin all the same) and down_proj (1536 inputs: 12 groups)."""

import pytest
import torch

from quantlab.experiments.data.calibration import CalibrationSpec, calibration_samples
from quantlab.experiments.run.pipeline import DecoderBlockView, capture_block_inputs
from quantlab.methods.hessian import HessianAccumulator
from quantlab.methods.slim_llm import (
    KLSearch,
    SliMLLMConfig,
    chol_inverse_upper,
    group_salience,
    salience_hessian,
    slim_quantize,
)
from tests.methods.test_slim_llm import (
    literal_activation_aware_search,
    literal_fasterquant,
    literal_get_salience,
)

pytestmark = pytest.mark.slow
LAYERS = ("self_attn.q_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def real_layers(smollm2, data_dir):
    """Weights, biases and calibration inputs of two linears of block 0 (4 c4 windows of 128)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = calibration_samples(CalibrationSpec("c4", nsamples=4, seqlen=128, seed=0), smollm2.tokenizer)
    arch = smollm2.architecture
    inputs = capture_block_inputs(smollm2.model, arch, ids, torch.device("cpu"), batch_size=4)
    view = DecoderBlockView(0, "block0", arch.block_list(smollm2.model)[0], arch, inputs)
    seen: dict[str, list] = {name: [] for name in LAYERS}
    view.run({name: seen[name].append for name in LAYERS})
    yield {name: (view.linears[name], torch.cat(seen[name])) for name in LAYERS}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("name", LAYERS)
def test_search_and_layer_match_the_reference_on_real_layers(real_layers, name, bits):
    linear, x = real_layers[name]
    weight = linear.weight.detach().float()
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    H_search = salience_hessian(acc.hessian)
    salience = group_salience(weight, chol_inverse_upper(H_search), 128)
    assert salience.tolist() == literal_get_salience(acc.hessian.clone(), weight, 128)

    search = KLSearch(linear, salience, bits, 128)
    search.add(x)
    expected = [
        literal_activation_aware_search(salience.tolist(), weight, 128, bits, seq, linear(seq).unsqueeze(0))
        for seq in x
    ]
    if len(search.ks) == 1:  # q_proj's 4.5 groups: k = 1 is the only candidate, taken unscored
        assert search.errors == [] and all(len(errors) == 1 for errors in expected)
    else:  # the same candidates, the products built incrementally: float32 rounding apart
        torch.testing.assert_close(torch.tensor(search.errors), torch.tensor(expected), rtol=1e-4, atol=1e-6)
    mean = torch.tensor(expected, dtype=torch.float64).mean(0).tolist()
    k = search.best_k()
    assert k == mean.index(min(mean)) + 1  # the reference's argmin

    ours, info = slim_quantize(weight, H_search, SliMLLMConfig(bits=bits, group_size=128), k)
    ref, ref_widths = literal_fasterquant(weight, H_search, k, bits, 128)
    assert info["allocation"] == ref_widths and sum(ref_widths) == bits * len(ref_widths)
    assert torch.equal(ours.dequantize(), ref)
