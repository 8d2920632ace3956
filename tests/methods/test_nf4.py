"""NF4 / FP4 against bitsandbytes itself (the library runs on this CPU) and its published values."""

import pytest
import torch

from quantlab.kernels.lookup import dynamic_map, lookup_table
from quantlab.methods.base import ConfigError
from quantlab.methods.nf4 import LookupConfig, blockwise_quantize, quantize_lookup

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (the `baselines` extra)")

SHAPES = [(96, 576), (7, 100)]  # 100 * 7 = 700: a short last block, and blocks that straddle rows


def bnb_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """bnb packs two codes per byte, the first in the high nibble."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:numel]


def test_tables_and_dynamic_map_equal_the_library():
    for name in ("nf4", "fp4"):
        assert torch.equal(lookup_table(name), bnb_functional.get_4bit_type(name, device="cpu"))
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map(signed=True))
    # NF4 is the library's normal map (scipy's normal quantiles): 15 non-zero values and 0
    assert torch.allclose(torch.unique(bnb_functional.create_normal_map()), lookup_table("nf4"), rtol=0, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("table", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 32])
def test_codes_absmax_and_weights_are_bitsandbytes_bit_for_bit(table, shape, blocksize):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    w[0, :3] = 0.0  # exact zeros and a tie-prone value
    ours = quantize_lookup(w, table, blocksize)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=table)
    assert torch.equal(ours.codes.reshape(-1), bnb_codes(packed, w.numel()))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("table", ["nf4", "fp4"])
def test_double_quantization_matches_bitsandbytes(table):
    """Same 4-bit codes, offset and second-level scales; the 8-bit absmax codes agree except where
    bnb's CPU lookup table (65,536 bins) cannot resolve the nearest code, and there ours is nearer."""
    torch.manual_seed(1)
    w = torch.randn(384, 576) * 0.05  # 3456 blocks of 64: 14 groups of 256, the last short
    ours = quantize_lookup(w, table, 64, double_quant=True)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=table, compress_statistics=True)
    assert torch.equal(ours.codes.reshape(-1), bnb_codes(packed, w.numel()))
    assert torch.equal(ours.absmax_offset.reshape(()), state.offset.reshape(()))
    assert torch.equal(ours.absmax_scales, state.state2.absmax)
    plain = quantize_lookup(w, table, 64).absmax
    scaled = (plain - ours.absmax_offset) / ours.absmax_scales.repeat_interleave(256)[: plain.numel()]
    code = dynamic_map()
    differ = ours.absmax_codes.long() != state.absmax.long()
    assert int(differ.sum()) <= 0.01 * plain.numel()
    ours_err = (code[ours.absmax_codes.long()] - scaled).abs()
    bnb_err = (code[state.absmax.long()] - scaled).abs()
    assert bool((ours_err <= bnb_err).all())  # nearest everywhere
    assert bool(((ours_err - bnb_err).abs()[differ] < 2 / 65535).all())  # within bnb's LUT resolution
    # dequantized weights: identical where the codes agree
    reference = bnb_functional.dequantize_4bit(packed, state)
    same_block = ~differ.repeat_interleave(64)[: w.numel()].reshape(w.shape)
    assert torch.equal(ours.dequantize()[same_block], reference[same_block])


def test_blockwise_quantizer_takes_the_nearest_code_ties_to_the_lower():
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    idx, absmax = blockwise_quantize(torch.tensor([-2.0, 0.25, 0.5, 1.5, 0.76, 0.74, 2.0, -0.5]), code, 4)
    # block 0 absmax 2: -1, 0.125, 0.25, 0.75 (a tie between 0.5 and 1.0 goes low)
    assert absmax.tolist() == [2.0, 2.0] and idx.tolist() == [0, 1, 1, 2, 2, 2, 3, 1]


def test_double_quantized_nf4_costs_4_127_bits_on_a_smollm2_shaped_linear():
    q = quantize_lookup(torch.randn(576, 576), "nf4", 64, double_quant=True)
    assert q.storage_bits() == 4 * 576 * 576 + 8 * 5184 + 32 * 21 + 32
    assert quantize_lookup(torch.randn(576, 576), "nf4", 64).bits_per_weight() == 4.5


@pytest.mark.parametrize(
    ("knobs", "message"),
    [({"bits": 3}, "bits=3; valid: 4"), ({"group_size": 100}, "not a bitsandbytes block size"),
     ({"group_size": -1}, "not a bitsandbytes block size")],
)
def test_bad_configs_name_the_fix(knobs, message):
    with pytest.raises(ConfigError, match=message):
        LookupConfig(**knobs).validate("nf4")


@pytest.mark.slow
def test_a_smollm2_linear_is_bitsandbytes_nf4_bit_for_bit(smollm2):
    weight = smollm2.model.model.layers[3].mlp.down_proj.weight.detach()  # [576, 1536]
    ours = quantize_lookup(weight, "nf4", 64)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state))
    assert ours.bits_per_weight() == 4.5
