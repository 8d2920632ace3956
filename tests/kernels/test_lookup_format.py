"""LookupWeight (bitsandbytes' NF4 / FP4 layout): values, exact bits, packing, the protocol."""

import json

import pytest
import torch

from quantlab.kernels import FORMATS, LookupWeight, format_from_packed
from quantlab.kernels.linear import QuantLinear
from quantlab.kernels.lookup import TABLES, dynamic_map, lookup_table


def random_weight(out=6, inp=40, blocksize=16, table="nf4", double_quant=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    blocks = -(-out * inp // blocksize)
    if not double_quant:
        return LookupWeight(codes=codes, table=table, blocksize=blocksize, absmax=torch.rand(blocks, generator=g) + 0.1)
    groups = -(-blocks // 4)
    return LookupWeight(
        codes=codes, table=table, blocksize=blocksize,
        absmax_codes=torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8),
        absmax_scales=torch.rand(groups, generator=g), absmax_offset=torch.tensor([0.3]), absmax_blocksize=4,
    )


def element_oracle(w: LookupWeight) -> torch.Tensor:
    """One weight at a time: its flat position, its block, the block's absmax, the table value."""
    out_features, in_features = w.shape
    table = TABLES[w.table]
    code8 = dynamic_map().tolist()
    expected = torch.empty(out_features, in_features)
    for r in range(out_features):
        for c in range(in_features):
            block = (r * in_features + c) // w.blocksize
            if w.absmax is not None:
                absmax = float(w.absmax[block])
            else:
                group = block // w.absmax_blocksize
                absmax = float(torch.tensor(code8[int(w.absmax_codes[block])]) * w.absmax_scales[group]
                               + w.absmax_offset[0])
            expected[r, c] = torch.tensor(table[int(w.codes[r, c])]) * torch.tensor(absmax)
    return expected


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("table", ["nf4", "fp4"])
def test_dequantize_matches_the_element_oracle(table, double_quant):
    # in=40 with blocks of 16: blocks straddle rows, as bnb's flattened blocks do
    w = random_weight(table=table, double_quant=double_quant)
    assert torch.allclose(w.dequantize(), element_oracle(w), rtol=0, atol=1e-7)


def test_tables_are_bitsandbytes_published_values():
    nf4 = lookup_table("nf4")
    assert nf4.tolist()[:3] == pytest.approx([-1.0, -0.6961928009986877, -0.5250730514526367], abs=0)
    assert nf4[7] == 0 and nf4[15] == 1 and bool((nf4[1:] > nf4[:-1]).all())  # sorted, 0 exactly
    fp4 = lookup_table("fp4") * 12  # e2m1, bias 2, in bit-pattern order: sign is bit 3
    assert fp4.tolist() == [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]
    code = dynamic_map()
    assert code.numel() == 256 and code[-1] == 1 and bool((code[1:] >= code[:-1]).all())
    assert code[0].item() == pytest.approx(-0.992968738079071, abs=0) and int((code == 0).sum()) == 1


@pytest.mark.parametrize(("double_quant", "expected"), [(False, 4 + 32 / 64), (True, None)])
def test_storage_bits_are_exact(double_quant, expected):
    w = random_weight(out=576, inp=576, blocksize=64, double_quant=double_quant)
    if double_quant:
        # 5184 blocks: 8-bit codes, 21 fp32 second-level scales (the last group short), one fp32 offset
        w = LookupWeight(codes=w.codes, table="nf4", blocksize=64, absmax_codes=torch.zeros(5184, dtype=torch.uint8),
                         absmax_scales=torch.ones(21), absmax_offset=torch.zeros(1))
        assert w.storage_bits() == 4 * 576 * 576 + 8 * 5184 + 32 * 21 + 32
        assert w.bits_per_weight() == pytest.approx(4.1271, abs=1e-4)
    else:
        assert w.bits_per_weight() == expected
    assert w.bits == 4 and w.group_size == 64


@pytest.mark.parametrize("inp", [40, 64, 7])
@pytest.mark.parametrize("double_quant", [False, True])
def test_packed_bits_are_storage_plus_padding_and_the_round_trip_is_exact(inp, double_quant):
    w = random_weight(inp=inp, double_quant=double_quant)
    assert w.packed_bits() == w.storage_bits() + w.padding_bits()
    back = format_from_packed(w.pack(), json.loads(json.dumps(w.meta())))
    stored = w.rounded_to_storage()
    assert isinstance(back, LookupWeight) and back.double_quant == double_quant
    assert torch.equal(back.codes, stored.codes) and torch.equal(back.dequantize(), w.dequantize())
    for name in ("absmax", "absmax_codes", "absmax_scales", "absmax_offset"):
        a, b = getattr(back, name), getattr(stored, name)
        assert (a is None and b is None) or torch.equal(a, b)


def test_registry_safetensors_and_pack_does_not_share_storage():
    from safetensors.torch import load, save

    w = random_weight(double_quant=True)
    assert FORMATS["lookup"] is LookupWeight and w.meta()["format_name"] == "lookup"
    packed = w.pack()
    back = format_from_packed(load(save(packed)), w.meta())
    assert torch.equal(back.dequantize(), w.dequantize())
    assert all(t.data_ptr() != getattr(w, n, torch.empty(0)).data_ptr() for n, t in packed.items() if t.numel())


def test_quantlinear_runs_it_on_the_reference_path():
    w = random_weight(out=8, inp=32)
    layer = QuantLinear.from_format(w, backend="auto")
    x = torch.randn(3, 32)
    assert layer.kernel == "reference" and any("not a uniform" in r for rs in layer.kernel_reasons.values() for r in rs)
    assert torch.allclose(layer(x), x @ w.dequantize().T, atol=1e-6)


def test_inconsistent_layouts_are_refused():
    w = random_weight()
    with pytest.raises(ValueError, match="absmax has shape"):
        LookupWeight(codes=w.codes, table="nf4", blocksize=8, absmax=w.absmax)
    with pytest.raises(ValueError, match="unknown 4-bit table"):
        LookupWeight(codes=w.codes, table="int4", blocksize=16, absmax=w.absmax)
    with pytest.raises(ValueError, match="either absmax"):
        LookupWeight(codes=w.codes, table="nf4", blocksize=16, absmax=w.absmax, absmax_offset=torch.zeros(1))
    with pytest.raises(ValueError, match="needs absmax"):
        LookupWeight(codes=w.codes, table="nf4", blocksize=16)
    bad = LookupWeight(codes=w.codes.clone(), table="nf4", blocksize=16, absmax=w.absmax)
    bad.codes[0, 0] = 16
    with pytest.raises(ValueError, match="codes must lie"):
        bad.pack()
