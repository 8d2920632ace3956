"""QuantLinear: every fast path agrees with x @ dequantize().T; refusals name their reason; buffers
move and round-trip; whole models keep their outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.kernels import CodebookPartition, CodebookWeight, UniformWeight
from quantlab.kernels.fastpaths import FAST_PATHS, UnsupportedFormat, cpu_is_vectorized, op_group_size
from quantlab.kernels.groups import contiguous_g_idx
from quantlab.kernels.linear import (
    CHECK_TOLERANCE,
    KernelMismatch,
    QuantLinear,
    consistency_check,
    model_weight_bytes,
    quantize_linears,
)

BF16_TOL = CHECK_TOLERANCE[torch.bfloat16]
needs_fast_cpu = pytest.mark.skipif(
    not cpu_is_vectorized(), reason="no vectorized bf16 low-bit kernels on this CPU"
)


@pytest.fixture(autouse=True)
def one_thread():
    """These matmuls are tiny: on a shared 2-core machine two OpenMP threads next to another busy
    process ran the tiny-Llama test in 4.9 s instead of 0.08 s (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def round_weight(
    weight: torch.Tensor, bits: int, group_size: int, zero: str = "int", act_order: bool = False
) -> UniformWeight:
    """Min-max rounding of `weight` per (row, group) on a `bits`-bit grid: asymmetric with an
    integer ("int") or floating ("float") zero-point, or symmetric ("none", zero 2^(bits-1));
    the last group may be short. `act_order`: the columns' groups are shuffled (GPTQ's act-order
    with static groups), so they are no longer contiguous runs."""
    out_features, in_features = weight.shape
    maxq = 2**bits - 1
    g_idx = contiguous_g_idx(in_features, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(1))]
    n_groups = int(g_idx.max()) + 1
    scales = torch.empty(out_features, n_groups)
    zeros = torch.empty(out_features, n_groups)
    for g in range(n_groups):
        cols = weight[:, g_idx == g]
        lo, hi = cols.min(dim=1).values, cols.max(dim=1).values
        if zero == "none":
            scales[:, g] = cols.abs().amax(dim=1).clamp_min(1e-5) / (2 ** (bits - 1) - 1)
            zeros[:, g] = 2 ** (bits - 1)
        else:
            scales[:, g] = (hi - lo).clamp_min(1e-5) / maxq
            zeros[:, g] = (
                -lo / scales[:, g] if zero == "float" else (-lo / scales[:, g]).round().clamp(0, maxq)
            )
    idx = g_idx.long()
    codes = (weight / scales[:, idx] + zeros[:, idx]).round().clamp(0, maxq)
    return UniformWeight(codes.to(torch.uint8), scales, zeros, g_idx, bits, group_size, zero)


def random_format(out_features, in_features, bits, group_size, zero="int", seed=0, **kwargs) -> UniformWeight:
    gen = torch.Generator().manual_seed(seed)
    return round_weight(
        torch.randn(out_features, in_features, generator=gen), bits, group_size, zero, **kwargs
    )


def reference_output(fmt, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T with W the weight as stored, in fp32."""
    return x.float() @ fmt.rounded_to_storage().dequantize(torch.float32).T


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


# ---- the ops' conventions, derived ---------------------------------------------------------------


@needs_fast_cpu
def test_int4_cpu_op_multiplies_by_q_minus_8_times_s_plus_z():
    """The derivation behind Z = s * (8 - z): the op's weight is (q - 8) * S + Z for every code q."""
    gen = torch.Generator().manual_seed(0)
    n, k, group = 32, 64, 32
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    eye = torch.eye(k, dtype=torch.bfloat16)

    def op_weight(s: float, z: float) -> torch.Tensor:
        table = torch.tensor([s, z], dtype=torch.bfloat16).expand(k // group, n, 2).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group, table).float().T

    assert torch.equal(op_weight(1.0, 0.0), q.float() - 8)  # S = 1, Z = 0: the signed nibble
    assert torch.equal(op_weight(2.0, 3.0), (q.float() - 8) * 2 + 3)
    # ours: s * (q - z) = s * (q - 8) + s * (8 - z)  =>  S = s, Z = s * (8 - z)
    s, z = 0.5, 5.0
    assert torch.equal(op_weight(s, s * (8 - z)), s * (q.float() - z))


def test_int8_offset_identity():
    """s * (q - z) = s * (q - 128) + s * (128 - z): the int8 path's split, on the codes themselves."""
    fmt = random_format(16, 64, 8, -1)
    q, s, z = fmt.codes.float(), fmt.scales.float(), fmt.zeros.float()
    split = s * (q - 128) + s * (128 - z)
    assert torch.allclose(split, fmt.dequantize(), rtol=0, atol=1e-6)
    assert int(fmt.codes.min()) >= 0 and int(fmt.codes.max()) <= 255  # q - 128 fits int8


def test_op_group_size_tiles_short_last_groups():
    assert op_group_size(576, 128) == 64  # 4.5 groups of 128 = 9 op groups of 64
    assert op_group_size(1536, 128) == 128
    assert op_group_size(576, -1) == 64  # per row: any G dividing the width
    assert op_group_size(512, 256) == 256
    assert op_group_size(576, 32) == 32
    assert op_group_size(576, 48) is None
    assert op_group_size(200, 128) is None


# ---- fast paths against the reference ------------------------------------------------------------

INT4_CASES = [
    (64, 256, 32, "int"),
    (64, 256, 64, "float"),
    (32, 256, 128, "int"),
    (48, 576, 128, "int"),  # short last group: 4 x 128 + 64
    (48, 576, 128, "float"),
    (16, 576, 64, "none"),  # symmetric: implicit zero 8
    (32, 192, -1, "int"),  # one group per row
]


@needs_fast_cpu
@pytest.mark.parametrize("out_features,in_features,group_size,zero", INT4_CASES)
def test_int4_cpu_matches_reference(out_features, in_features, group_size, zero):
    fmt = random_format(out_features, in_features, 4, group_size, zero)
    qlinear = QuantLinear.from_format(fmt, backend="auto")
    assert qlinear.kernel == "int4_cpu"
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, in_features), (5, in_features), (2, 3, in_features)]:
        x = torch.randn(*shape, generator=gen)
        y = qlinear(x)
        assert y.shape == (*shape[:-1], out_features) and y.dtype == torch.float32
        assert rel_error(y, reference_output(fmt, x)) < BF16_TOL
    assert consistency_check(qlinear) < BF16_TOL


@needs_fast_cpu
@pytest.mark.parametrize("out_features,in_features", [(48, 576), (40, 256), (7, 64)])
def test_int8_cpu_matches_reference(out_features, in_features):
    fmt = random_format(out_features, in_features, 8, -1)
    qlinear = QuantLinear.from_format(fmt, bias=torch.randn(out_features), backend="auto")
    assert qlinear.kernel == "int8_cpu"
    x = torch.randn(6, in_features, generator=torch.Generator().manual_seed(2))
    assert rel_error(qlinear.matmul(x), reference_output(fmt, x)) < BF16_TOL
    y = qlinear(x)
    assert torch.allclose(y - qlinear.bias, qlinear.matmul(x), atol=1e-5)
    assert consistency_check(qlinear) < BF16_TOL


def test_int8_skewed_rows_keep_the_offset_exact():
    """Rows far from symmetric (z = 0: all weights positive) lean on the offset term."""
    weight = torch.rand(32, 128, generator=torch.Generator().manual_seed(3)) + 0.5
    fmt = round_weight(weight, 8, -1)
    assert int(fmt.zeros.min()) == 0
    qlinear = QuantLinear.from_format(fmt, backend="int8_cpu")
    assert consistency_check(qlinear) < BF16_TOL


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("bits,group_size,zero", [(4, 128, "int"), (4, 64, "float"), (8, -1, "int")])
def test_to_format_gives_the_stored_weight_back_exactly(backend, bits, group_size, zero):
    fmt = random_format(48, 576, bits, group_size, zero)
    stored = fmt.rounded_to_storage()
    back = QuantLinear.from_format(fmt, backend=backend).to_format()
    assert type(back) is UniformWeight
    assert torch.equal(back.codes.to(torch.uint8), stored.codes.to(torch.uint8))
    assert torch.equal(back.scales, stored.scales)
    assert torch.equal(back.zeros.float(), stored.zeros.float())
    assert torch.equal(back.g_idx, stored.g_idx)
    assert (back.bits, back.group_size, back.zero_format) == (bits, group_size, zero)


def test_reference_path_runs_any_format():
    gen = torch.Generator().manual_seed(4)
    act_order = random_format(32, 256, 4, 64, act_order=True)
    outliers = random_format(32, 256, 4, 64)
    outliers.outlier_idx = torch.tensor([3, 100], dtype=torch.int32)
    outliers.outlier_values = torch.randn(32, 2, generator=gen)
    mixed = random_format(32, 256, 4, 64)
    mixed.group_bits = torch.tensor([4, 3, 4, 2], dtype=torch.int32)
    for g, width in enumerate(mixed.group_bits.tolist()):
        mixed.codes[:, g * 64 : (g + 1) * 64].clamp_(max=2**width - 1)
        mixed.zeros[:, g].clamp_(max=2**width - 1)
    three_bit = random_format(32, 576, 3, 128)
    codebook = CodebookWeight(
        32,
        64,
        [
            CodebookPartition(
                0, 64, torch.randn(16, 2, generator=gen), torch.randint(0, 16, (16, 64), generator=gen)
            )
        ],
    )
    x = torch.randn(3, 256, generator=gen)
    for fmt in (act_order, outliers, mixed, three_bit, codebook):
        xi = x[:, : fmt.shape[1]] if fmt.shape[1] <= 256 else torch.randn(3, fmt.shape[1], generator=gen)
        qlinear = QuantLinear.from_format(fmt, backend="auto")
        assert qlinear.kernel == "reference", qlinear.kernel_reasons
        expected = xi @ fmt.rounded_to_storage().dequantize(torch.float32).T
        assert torch.allclose(qlinear(xi), expected, rtol=1e-5, atol=1e-5)
        assert consistency_check(qlinear) < CHECK_TOLERANCE[torch.float32]
    # OWQ's fp16 columns, spelled as dense part + x[:, idx] @ values.T
    dense = outliers.rounded_to_storage()
    w_dense = dense.dequantize()
    w_dense[:, dense.outlier_idx.long()] = 0
    split = x @ w_dense.T + x[:, dense.outlier_idx.long()] @ dense.outlier_values.float().T
    assert torch.allclose(QuantLinear.from_format(outliers)(x), split, rtol=1e-5, atol=1e-5)


# ---- refusals --------------------------------------------------------------------------------------


def _mixed_widths() -> UniformWeight:
    fmt = random_format(32, 256, 4, 64)
    fmt.group_bits = torch.tensor([4, 4, 3, 4], dtype=torch.int32)
    fmt.codes[:, 128:192].clamp_(max=7)
    fmt.zeros[:, 2].clamp_(max=7)
    return fmt


def _with_outliers() -> UniformWeight:
    fmt = random_format(32, 256, 4, 64)
    fmt.outlier_idx = torch.tensor([5], dtype=torch.int32)
    fmt.outlier_values = torch.randn(32, 1)
    return fmt


REFUSALS = [
    ("int4_cpu", lambda: random_format(32, 256, 3, 64), "3-bit"),
    ("int4_cpu", lambda: random_format(32, 256, 4, 64, act_order=True), "act-order"),
    ("int4_cpu", _with_outliers, "outlier"),
    ("int4_cpu", _mixed_widths, "mixed per-group widths"),
    ("int4_cpu", lambda: random_format(32, 576, 4, 48), "group_size 48"),
    ("int4_cpu", lambda: random_format(40, 256, 4, 64), "out_features 40 is not a multiple of 16"),
    ("int8_cpu", lambda: random_format(32, 256, 8, 128), "2 groups per row"),
    ("int8_cpu", lambda: random_format(32, 200, 8, -1), "in_features 200 is not a multiple of 16"),
    ("int8_cpu", lambda: random_format(32, 256, 4, -1), "4-bit"),
    ("int4_cuda", lambda: random_format(32, 256, 4, 64), "CUDA"),
]


@pytest.mark.parametrize("backend,make,reason", REFUSALS)
def test_requested_path_that_cannot_take_the_format_says_why(backend, make, reason):
    with pytest.raises(UnsupportedFormat, match=reason):
        QuantLinear.from_format(make(), backend=backend)


def test_codebook_refused_by_fast_paths_and_unknown_backend():
    gen = torch.Generator().manual_seed(5)
    codebook = CodebookWeight(
        32,
        64,
        [
            CodebookPartition(
                0, 64, torch.randn(4, 2, generator=gen), torch.randint(0, 4, (16, 64), generator=gen)
            )
        ],
    )
    with pytest.raises(UnsupportedFormat, match="not a uniform group-wise weight"):
        QuantLinear.from_format(codebook, backend="int4_cpu")
    with pytest.raises(ValueError, match="choose one of"):
        QuantLinear.from_format(codebook, backend="int3_magic")


def test_auto_records_why_it_fell_back():
    qlinear = QuantLinear.from_format(random_format(32, 576, 4, 48), backend="auto")
    assert qlinear.kernel == "reference"
    assert any("group_size 48" in r for r in qlinear.kernel_reasons["int4_cpu"])


@needs_fast_cpu
def test_consistency_check_catches_a_wrong_layout():
    fmt = random_format(32, 256, 4, 64)
    qlinear = QuantLinear.from_format(fmt, backend="int4_cpu")
    table = qlinear.int4_scales_and_zeros  # (s, s * (8 - z)); the guess Z = -s * z forgets the op's -8
    table[..., 1] = (table[..., 1].float() - 8 * table[..., 0].float()).to(table.dtype)
    with pytest.raises(KernelMismatch, match="int4_cpu"):
        consistency_check(qlinear)


# ---- buffers: .to(), dtype casts, state_dict -------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_buffers_move_with_to_and_keep_their_dtypes(backend):
    fmt = random_format(32, 256, 4, 64)
    qlinear = QuantLinear.from_format(fmt, bias=torch.randn(32), backend=backend)
    dtypes = {name: b.dtype for name, b in qlinear.named_buffers()}
    assert dtypes and all(name in dict(qlinear.state_dict()) for name in dtypes)
    qlinear.to(torch.bfloat16)  # a model-wide cast: bias and dtype follow, stored tensors do not
    assert qlinear.bias.dtype == torch.bfloat16 and qlinear.dtype == torch.bfloat16
    assert {name: b.dtype for name, b in qlinear.named_buffers()} == dtypes
    assert qlinear(torch.randn(2, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16
    qlinear.to("meta")  # a device move takes every buffer and the bias along
    assert all(b.is_meta for b in qlinear.buffers()) and qlinear.bias.is_meta


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, -1)])
def test_state_dict_round_trip(backend, bits, group_size):
    source = QuantLinear.from_format(
        random_format(48, 576, bits, group_size, seed=1), torch.randn(48), backend
    )
    target = QuantLinear.from_format(
        random_format(48, 576, bits, group_size, seed=2), torch.randn(48), backend
    )
    state = source.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors-compatible
    x = torch.randn(4, 576)
    assert not torch.equal(source(x), target(x))
    target.load_state_dict(state)
    assert torch.equal(source(x), target(x))
    assert torch.equal(source.dequantize(), target.dequantize())


# ---- models --------------------------------------------------------------------------------------


def test_quantize_linears_on_a_sequential_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64, bias=False), nn.ReLU(), nn.Linear(64, 48)
    )
    formats = {
        "0": round_weight(model[0].weight.detach(), 4, 64),  # int4
        "2": round_weight(model[2].weight.detach(), 8, -1),  # int8
        "4": round_weight(model[4].weight.detach(), 3, 32),  # reference
    }
    fake = nn.Sequential(
        *[
            nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            if isinstance(m, nn.Linear)
            else m
            for m in model
        ]
    )
    fake.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, fmt in formats.items():
            fake.get_submodule(name).weight.copy_(fmt.rounded_to_storage().dequantize())
    bias0 = model[0].bias
    quantize_linears(model, formats, backend="auto")
    expected = (
        {"0": "int4_cpu", "2": "int8_cpu", "4": "reference"}
        if cpu_is_vectorized()
        else dict.fromkeys(formats, "reference")
    )
    assert {name: model.get_submodule(name).kernel for name in formats} == expected
    assert torch.equal(model[0].bias, bias0) and model[2].bias is None
    x = torch.randn(8, 256)
    with torch.no_grad():
        assert rel_error(model(x), fake(x)) < BF16_TOL
    with pytest.raises(KeyError, match="no module"):
        quantize_linears(model, {"9": formats["0"]})
    with pytest.raises(TypeError, match="not an nn.Linear"):
        quantize_linears(model, {"1": formats["0"]})


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@needs_fast_cpu
def test_quantize_linears_on_a_transformers_model_keeps_its_outputs():
    model = _tiny_llama()
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")
    ]
    formats = {n: round_weight(model.get_submodule(n).weight.detach(), 4, 32, "float") for n in names}
    fake = _tiny_llama()
    with torch.no_grad():
        for name, fmt in formats.items():
            fake.get_submodule(name).weight.copy_(fmt.rounded_to_storage().dequantize())
    fp32_bytes = model_weight_bytes(model)
    quantize_linears(model, formats, backend="int4_cpu")
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits, expected = model(ids).logits, fake(ids).logits
    # two blocks of bf16 matmuls: the per-linear bound compounds once per linear on the path
    assert rel_error(logits, expected) < 4 * BF16_TOL
    tokens = model.generate(ids[:1, :4], do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert tokens.shape == (1, 10)
    # bytes: the embedding is tied to the head (counted once); linears shrink to ~1/7
    quantized_bytes = model_weight_bytes(model)
    linear_fp32 = sum(4 * fmt.numel for fmt in formats.values())
    linears = model_weight_bytes([model.get_submodule(n) for n in names])
    assert linears < 0.2 * linear_fp32
    assert quantized_bytes == fp32_bytes - linear_fp32 + linears


def test_model_weight_bytes_counts_shared_storage_once():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert model_weight_bytes(model) == 100 * 16 * 4
    model.register_buffer("table", torch.zeros(10, dtype=torch.uint8))
    assert model_weight_bytes(model) == 100 * 16 * 4 + 10
    assert model_weight_bytes([emb, head]) == 100 * 16 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("out_features,in_features,group_size", [(64, 256, 64), (48, 576, 128)])
def test_int4_cuda_matches_reference(out_features, in_features, group_size):
    fmt = random_format(out_features, in_features, 4, group_size)
    qlinear = QuantLinear.from_format(fmt, backend="auto", device="cuda")
    assert qlinear.kernel == "int4_cuda"
    assert consistency_check(qlinear) < BF16_TOL
    back = qlinear.to_format()
    assert torch.equal(back.codes.cpu(), fmt.rounded_to_storage().codes)
    assert qlinear.to("cpu").kernel == "int4_cpu"  # re-laid out for the CPU op
    assert FAST_PATHS["int4_cpu"].blockers(fmt, "cpu") == []
