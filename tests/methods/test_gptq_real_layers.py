"""GPTQ on real SmolLM2-135M layers: measured on the calibration inputs themselves, its layer-output
error ||X W^T - X Q^T|| is below round-to-nearest's with the same grid, at 2, 3 and 4 bits, for
g128 and per channel, with and without act-order."""

import itertools

import pytest
import torch

from quantlab.experiments.data.calibration import CalibrationSpec, calibration_samples
from quantlab.experiments.run.pipeline import DecoderBlockView, capture_block_inputs
from quantlab.methods.gptq import gptq_quantize
from quantlab.methods.hessian import HessianAccumulator
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import round_to_nearest

pytestmark = pytest.mark.slow
LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def real_layers(smollm2, data_dir):
    """Weights and calibration inputs of four linears in blocks 0 and 3 (FP-propagated)."""
    ids = calibration_samples(CalibrationSpec("c4", nsamples=16, seqlen=256, seed=0), smollm2.tokenizer)
    arch = smollm2.architecture
    inputs = capture_block_inputs(smollm2.model, arch, ids, torch.device("cpu"), batch_size=8)
    layers = {}
    for index, block in enumerate(arch.block_list(smollm2.model)[:4]):
        view = DecoderBlockView(index, f"block{index}", block, arch, inputs)
        if index in (0, 3):
            seen: dict[str, list] = {name: [] for name in LAYERS}
            view.run({name: seen[name].append for name in LAYERS})
            for name in LAYERS:
                layers[f"block{index}.{name}"] = (view.linears[name].weight.detach().clone(), torch.cat(seen[name]))
        view.advance_in_place()
    return layers


@pytest.mark.parametrize(("bits", "group_size", "act_order"), list(itertools.product((2, 3, 4), (128, -1), (False, True))))
def test_gptq_output_error_is_below_rtn_on_real_layers(real_layers, bits, group_size, act_order):
    grid = Grid(bits)  # GPTQ's min-max grid, asymmetric: RTN uses exactly the same one
    for name, (weight, x) in real_layers.items():
        acc = HessianAccumulator(x.shape[-1])
        acc.add(x)
        gptq, _ = gptq_quantize(weight, acc.hessian, grid, group_size, act_order=act_order)
        rtn = round_to_nearest(weight, grid, group_size)
        flat = x.reshape(-1, x.shape[-1])
        error_gptq = torch.linalg.norm(flat @ (weight - gptq.dequantize()).T)
        error_rtn = torch.linalg.norm(flat @ (weight - rtn.dequantize()).T)
        assert error_gptq < error_rtn, f"{name}: GPTQ {error_gptq:.4g} >= RTN {error_rtn:.4g}"
