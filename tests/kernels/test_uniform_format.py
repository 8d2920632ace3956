"""UniformWeight as a WeightFormat: packing, round trips, exact bit accounting, per-group widths."""

import json
from dataclasses import fields

import pytest
import torch

from quantlab.kernels import FORMATS, QuantizedWeight, UniformWeight, WeightFormat, format_from_packed
from quantlab.kernels.groups import contiguous_g_idx, contiguous_g_idx_skipping, num_groups
from quantlab.kernels.packing import packed_words


def make(
    out=24, inp=576, bits=4, group_size=128, zero_format="int", act_order=False, n_outliers=0,
    widths=None, outliers_skip_groups=True, seed=0,
):
    """A valid random weight. act_order: GPTQ's g_idx (column j's group is its position in a random
    order // group_size); outliers: OWQ-style fp16 columns, grouped around (outliers_skip_groups)
    or inside the contiguous groups; widths: a list of choices for per-group widths."""
    gen = torch.Generator().manual_seed(seed)
    outlier_idx = torch.randperm(inp, generator=gen)[:n_outliers].to(torch.int32) if n_outliers else None
    if act_order:
        perm = torch.randperm(inp, generator=gen)
        g_idx = (torch.argsort(perm) // (inp if group_size == -1 else group_size)).to(torch.int32)
    elif outlier_idx is not None and outliers_skip_groups:
        g_idx = contiguous_g_idx_skipping(inp, group_size, outlier_idx)
    else:
        g_idx = contiguous_g_idx(inp, group_size)
    n_groups = int(g_idx.max()) + 1
    group_bits = None
    group_widths = torch.full((n_groups,), bits)
    if widths is not None:
        group_widths = torch.tensor(widths)[torch.randint(0, len(widths), (n_groups,), generator=gen)]
        group_bits = group_widths.to(torch.int32)
    maxq = (2**group_widths - 1)[g_idx.long()]
    codes = (torch.rand(out, inp, generator=gen) * (maxq + 1)).floor().clamp(max=maxq).to(torch.uint8)
    scales = torch.rand(out, n_groups, generator=gen) * 0.1 + 1e-3  # not fp16-exact
    if zero_format == "int":
        zeros = (torch.rand(out, n_groups, generator=gen) * 2**group_widths).floor()
    elif zero_format == "none":
        zeros = (2.0 ** (group_widths - 1)).expand(out, -1).clone()
    else:
        zeros = torch.rand(out, n_groups, generator=gen) * 2**group_widths
    outlier_values = torch.randn(out, n_outliers, generator=gen) if n_outliers else None
    return UniformWeight(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits, group_size=group_size,
        zero_format=zero_format, outlier_idx=outlier_idx, outlier_values=outlier_values,
        group_bits=group_bits, info={"method": "test"},
    )


def assert_same(a: UniformWeight, b: UniformWeight) -> None:
    for f in fields(UniformWeight):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert x is not None and y is not None, f.name
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def round_trip(w: WeightFormat) -> WeightFormat:
    tensors, meta = w.pack(), json.loads(json.dumps(w.meta()))
    for t in tensors.values():
        assert t.is_contiguous()
    return format_from_packed(tensors, meta)


def check_round_trip(w: UniformWeight) -> UniformWeight:
    back = round_trip(w)
    stored = w.rounded_to_storage()
    assert_same(back, stored)
    assert torch.equal(back.dequantize(), stored.dequantize())
    assert back.storage_bits() == w.storage_bits()
    assert w.packed_bits() - w.storage_bits() == w.padding_bits()
    return back


@pytest.mark.parametrize("zero_format", ["int", "float", "none"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_every_width_group_and_zero_format(bits, group_size, zero_format):
    w = make(bits=bits, group_size=group_size, zero_format=zero_format, seed=bits * 7 + group_size)
    back = check_round_trip(w)
    assert back.g_idx_layout == "contiguous" and "g_idx" not in w.pack()
    # only the scales (and float zeros) change in storage: fp16 rounding, nothing else
    # fp16 keeps 11 significant bits: each of scale and zero moves by at most 2^-11 of itself
    bound = 2**-10 * float(w.scales.max()) * 2**bits
    assert float((back.dequantize() - w.dequantize()).abs().max()) <= bound
    if zero_format != "float":
        assert torch.equal(back.codes, w.codes) and torch.equal(back.zeros, w.zeros.float())


def test_576_columns_at_w4_g128_keep_their_numbers():
    w = make(out=8, inp=576, bits=4, group_size=128)
    assert w.scales.shape == (8, 5)
    assert w.storage_bits() == 8 * 576 * 4 + 8 * 5 * (16 + 4)
    assert w.bits_per_weight() == pytest.approx(4 + 5 * 20 / 576)
    packed = w.pack()
    assert packed["codes"].shape == (8, 72)  # 576 * 4 bits = 72 words exactly
    assert packed["zeros"].shape == (8, 1)  # 5 zeros * 4 bits = 20 bits in one word
    assert w.padding_bits() == 8 * 12
    check_round_trip(w)


@pytest.mark.parametrize("zero_format", ["int", "float", "none"])
def test_act_order_g_idx_is_stored_and_paid_for(zero_format):
    w = make(bits=3, group_size=64, zero_format=zero_format, act_order=True, seed=3)
    assert w.g_idx_layout == "explicit"
    assert w.storage_bits() == make(bits=3, group_size=64, zero_format=zero_format).storage_bits() + 32 * 576
    assert w.pack()["g_idx"].dtype == torch.int32
    check_round_trip(w)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("zero_format", ["int", "float", "none"])
def test_owq_outlier_columns(act_order, zero_format):
    w = make(out=16, inp=200, bits=3, group_size=32, zero_format=zero_format, act_order=act_order, n_outliers=5, seed=5)
    assert w.g_idx_layout == ("explicit" if act_order else "contiguous_skipping_outliers")
    n_q = 195
    expected = 16 * n_q * 3 + 16 * w.n_groups * (16 + {"int": 3, "float": 16, "none": 0}[zero_format])
    expected += 5 * (16 * 16 + 32) + (32 * 200 if act_order else 0)
    assert w.storage_bits() == expected
    assert w.pack()["codes"].shape == (16, packed_words(n_q, 3))
    back = check_round_trip(w)
    cols = w.outlier_idx.long()
    assert torch.equal(back.dequantize()[:, cols], w.outlier_values.half().float())
    # outlier columns store no codes: they come back as their group's zero (int, none) or 0 (float)
    if zero_format == "float":
        assert torch.all(back.codes[:, cols] == 0)
    else:
        assert torch.equal(back.codes[:, cols].float(), back.zeros[:, back.g_idx.long()[cols]])
    if not act_order:
        assert torch.all(back.g_idx[cols] == 0)


def test_outliers_inside_contiguous_groups_keep_the_full_g_idx():
    w = make(out=8, inp=100, bits=4, group_size=32, n_outliers=3, outliers_skip_groups=False, seed=9)
    assert w.g_idx_layout == "contiguous"
    back = check_round_trip(w)
    assert torch.equal(back.g_idx, contiguous_g_idx(100, 32))


@pytest.mark.parametrize("zero_format", ["int", "float", "none"])
@pytest.mark.parametrize("widths", [[2, 3, 4], [1, 2, 3], [1], [3]])
def test_per_group_widths(widths, zero_format):
    w = make(out=12, inp=576, bits=widths[len(widths) // 2], group_size=64, zero_format=zero_format, widths=widths, seed=11)
    group_widths = w.group_bits.long()
    sizes = torch.bincount(w.g_idx.long(), minlength=w.n_groups)
    zero_bits = {"int": int(group_widths.sum()), "float": 16 * w.n_groups, "none": 0}[zero_format]
    expected = 12 * int((group_widths * sizes).sum()) + 12 * w.n_groups * 16 + 12 * zero_bits + 8 * w.n_groups
    assert w.storage_bits() == expected
    packed = w.pack()
    assert packed["group_bits"].dtype == torch.uint8
    for b in sorted(set(group_widths.tolist())):
        n_cols = int(sizes[group_widths == b].sum())
        assert packed[f"codes.{b}bit"].shape == (12, packed_words(n_cols, b))
        if zero_format == "int":
            assert packed[f"zeros.{b}bit"].shape == (12, packed_words(int((group_widths == b).sum()), b))
    check_round_trip(w)


def test_per_group_widths_with_outliers_and_act_order():
    for act_order in (False, True):
        w = make(out=10, inp=300, bits=3, group_size=32, widths=[2, 3, 4], n_outliers=4, act_order=act_order, seed=13)
        check_round_trip(w)


def test_mixed_width_dequantize_against_a_loop():
    w = make(out=3, inp=40, bits=3, group_size=8, widths=[1, 2, 3, 4], seed=17)
    expected = torch.empty(3, 40)
    for r in range(3):
        for c in range(40):
            g = int(w.g_idx[c])
            expected[r, c] = w.scales[r, g] * (float(w.codes[r, c]) - w.zeros[r, g])
    assert torch.allclose(w.dequantize(), expected)
    assert int(w.codes.max()) <= 15


def test_uniform_widths_table_costs_eight_bits_per_group():
    plain = make(out=8, inp=256, bits=4, group_size=64)
    tabled = make(out=8, inp=256, bits=4, group_size=64, widths=[4])
    assert tabled.storage_bits() == plain.storage_bits() + 8 * 4


def test_codes_outside_their_group_width_are_refused():
    w = make(out=4, inp=64, bits=3, group_size=16, widths=[2, 3], seed=1)
    narrow = int(torch.nonzero(w.group_bits == 2)[0])
    w.codes[0, narrow * 16] = 4  # fits 3 bits, not this 2-bit group
    with pytest.raises(ValueError, match="width"):
        w.pack()
    with pytest.raises(ValueError, match="width"):
        w.rounded_to_storage()


def test_zero_points_that_cannot_be_stored_are_refused():
    w = make(out=4, inp=64, bits=3, group_size=16, zero_format="none")
    w.zeros[0, 0] = 0.0
    with pytest.raises(ValueError, match="symmetric"):
        w.pack()
    w = make(out=4, inp=64, bits=3, group_size=16)
    w.zeros[0, 0] = 2.5
    with pytest.raises(ValueError, match="integer"):
        w.pack()
    with pytest.raises(ValueError, match="group_bits"):
        UniformWeight(
            codes=torch.zeros(2, 4, dtype=torch.uint8), scales=torch.ones(2, 2), zeros=torch.zeros(2, 2),
            g_idx=contiguous_g_idx(4, 2), bits=4, group_size=2, group_bits=torch.tensor([4]),
        )


def test_fp32_scales_are_stored_at_32_bits():
    w = make(out=4, inp=128, bits=4, group_size=32)
    w.scale_bits = 32
    assert w.pack()["scales"].dtype == torch.float32
    back = check_round_trip(w)
    assert torch.equal(back.dequantize(), w.dequantize())


def test_pack_hands_out_fresh_contiguous_tensors_and_safetensors_round_trip():
    from safetensors.torch import load, save

    w = make(out=8, inp=128, bits=3, group_size=32, act_order=True, n_outliers=2, zero_format="float")
    w.scales = w.scales.half()  # a field already in its storage dtype must still be copied
    packed = w.pack()
    pointers = {t.data_ptr() for t in packed.values() if t.numel()}
    fields_pointers = {getattr(w, f.name).data_ptr() for f in fields(w) if isinstance(getattr(w, f.name), torch.Tensor)}
    assert len(pointers) == sum(1 for t in packed.values() if t.numel()) and not pointers & fields_pointers
    back = format_from_packed(load(save(packed)), json.loads(json.dumps(w.meta())))
    assert_same(back, w.rounded_to_storage())


def test_matmul_is_x_times_dequantized_weight():
    w = make(out=16, inp=96, bits=4, group_size=32, n_outliers=2)
    x = torch.randn(5, 96)
    assert torch.equal(w.matmul(x), x @ w.dequantize().T)
    xb = x.to(torch.bfloat16)
    assert torch.equal(w.matmul(xb), xb @ w.dequantize(torch.bfloat16).T)


def test_registry_and_old_names():
    assert FORMATS["uniform"] is UniformWeight and QuantizedWeight is UniformWeight
    w = make(out=4, inp=64, bits=2, group_size=32)
    assert w.meta()["format_name"] == "uniform" and w.meta()["info"] == {"method": "test"}
    with pytest.raises(ValueError, match="unknown weight format"):
        format_from_packed(w.pack(), {**w.meta(), "format_name": "nope"})
    assert num_groups(64, 32) == w.n_groups


def test_rounded_to_storage_is_idempotent():
    w = make(out=6, inp=200, bits=3, group_size=64, widths=[2, 3, 4], n_outliers=3, zero_format="float", seed=21)
    once = w.rounded_to_storage()
    assert_same(once.rounded_to_storage(), once)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pack_and_unpack_match_cpu():
    from dataclasses import replace

    w = make(out=16, inp=300, bits=3, group_size=64, widths=[2, 3, 4], n_outliers=3, act_order=True, seed=23)
    on_gpu = replace(w, **{f.name: getattr(w, f.name).cuda() for f in fields(w) if isinstance(getattr(w, f.name), torch.Tensor)})
    packed_gpu, packed = on_gpu.pack(), w.pack()
    assert packed_gpu.keys() == packed.keys()
    assert all(packed_gpu[k].is_cuda and torch.equal(packed_gpu[k].cpu(), packed[k]) for k in packed)
    back = format_from_packed(packed_gpu, on_gpu.meta())
    assert torch.equal(back.dequantize().cpu(), w.rounded_to_storage().dequantize())
