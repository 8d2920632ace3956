"""CodebookWeight (VPTQ): reconstruction, round trips and exact bit accounting."""

import json
from dataclasses import fields

import pytest
import torch

from quantlab.kernels import FORMATS, CodebookPartition, CodebookWeight, format_from_packed
from quantlab.kernels.codebook import index_bits, nearest_centroid
from quantlab.kernels.packing import packed_words


def random_weight(
    out=30, inp=40, parts=((0, 8, 2, 16, 0), (8, 24, 4, 256, 16), (24, 40, 4, 300, 0)),
    perm=True, norm=True, seed=0,
):
    """Random codebooks and indices; `parts` lists (start, end, v, k, k_res) of each partition."""
    gen = torch.Generator().manual_seed(seed)
    partitions = []
    for start, end, v, k, k_res in parts:
        rows = -(-out // v)
        partitions.append(
            CodebookPartition(
                start, end, torch.randn(k, v, generator=gen),
                torch.randint(0, k, (rows, end - start), generator=gen, dtype=torch.int64),
                torch.randn(k_res, v, generator=gen) * 0.1 if k_res else None,
                torch.randint(0, k_res, (rows, end - start), generator=gen) if k_res else None,
            )
        )
    return CodebookWeight(
        out, inp, partitions,
        perm=torch.randperm(inp, generator=gen) if perm else None,
        col_scale=torch.rand(inp, generator=gen) + 0.5 if norm else None,
        col_bias=torch.randn(inp, generator=gen) if norm else None,
        info={"method": "test"},
    )


def dense_oracle(w: CodebookWeight) -> torch.Tensor:
    """Element by element from the docstring: original column j sits at permuted position p with
    perm[p] = j; row r is element r % v of vector (r // v, p - start)."""
    out, inp = w.shape
    position = {int(j): p for p, j in enumerate(w.perm.tolist())} if w.perm is not None else {j: j for j in range(inp)}
    expected = torch.empty(out, inp)
    for j in range(inp):
        p = position[j]
        part = next(q for q in w.partitions if q.start <= p < q.end)
        v = part.vector_len
        for r in range(out):
            value = part.centroids.float()[int(part.indices[r // v, p - part.start]), r % v]
            if part.residual_centroids is not None:
                value = value + part.residual_centroids.float()[int(part.residual_indices[r // v, p - part.start]), r % v]
            if w.col_scale is not None:
                value = value * w.col_scale.float()[j]
            if w.col_bias is not None:
                value = value + w.col_bias.float()[j]
            expected[r, j] = value
    return expected


def assert_same(a: CodebookWeight, b: CodebookWeight) -> None:
    def same(x, y, name):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert x is not None and y is not None and x.dtype == y.dtype and torch.equal(x, y), name
        else:
            assert x == y, name

    for f in fields(CodebookWeight):
        if f.name != "partitions":
            same(getattr(a, f.name), getattr(b, f.name), f.name)
    assert len(a.partitions) == len(b.partitions)
    for p, q in zip(a.partitions, b.partitions):
        for f in fields(CodebookPartition):
            same(getattr(p, f.name), getattr(q, f.name), f.name)


def check_round_trip(w: CodebookWeight) -> CodebookWeight:
    tensors = w.pack()
    assert all(t.is_contiguous() for t in tensors.values())
    back = format_from_packed(tensors, json.loads(json.dumps(w.meta())))
    stored = w.rounded_to_storage()
    assert_same(back, stored)
    assert torch.equal(back.dequantize(), stored.dequantize())
    assert w.packed_bits() - w.storage_bits() == w.padding_bits()
    return back


@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_dequantize_matches_the_element_oracle(perm, norm):
    w = random_weight(perm=perm, norm=norm, seed=perm + 2 * norm)
    assert torch.equal(w.dequantize(), dense_oracle(w))


@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_round_trip(perm, norm, residual):
    parts = ((0, 5, 3, 8, 4 if residual else 0), (5, 40, 6, 1000, 256 if residual else 0))
    w = random_weight(out=31, inp=40, parts=parts, perm=perm, norm=norm, seed=3)  # 31 rows: v = 3, 6 pad
    back = check_round_trip(w)
    assert back.partitions[1].indices.dtype == torch.int32
    assert torch.allclose(back.dequantize(), w.dequantize(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    ("k", "container"), [(2, "packed"), (16, "packed"), (200, "packed"), (256, "packed"), (257, torch.int16),
                         (4096, torch.int16), (65536, torch.int16), (65537, torch.int32)],
)
def test_index_containers_and_exact_bit_accounting(k, container):
    out, inp, v = 10, 7, 2
    rows = 5
    w = random_weight(out=out, inp=inp, parts=((0, inp, v, k, 0),), perm=True, norm=True, seed=k % 97)
    w.partitions[0].indices[0, 0] = k - 1  # the largest index survives its container
    b = index_bits(k)
    assert w.storage_bits() == rows * inp * b + 16 * k * v + 32 * inp + 2 * 16 * inp
    stored = w.pack()["partition0.indices"]
    if container == "packed":
        assert stored.dtype == torch.int32 and stored.shape == (rows, packed_words(inp, b))
        assert w.padding_bits() == rows * (packed_words(inp, b) * 32 - inp * b)
    else:
        assert stored.dtype == container and stored.shape == (rows, inp)
        assert w.padding_bits() == rows * inp * ((16 if container == torch.int16 else 32) - b)
    back = check_round_trip(w)
    assert int(back.partitions[0].indices[0, 0]) == k - 1


def test_index_bits():
    assert [index_bits(k) for k in (2, 3, 4, 5, 256, 257, 4096, 65536)] == [1, 2, 2, 3, 8, 9, 12, 16]


def test_vptq_like_storage_of_a_4096_square_v8_k256():
    # methods.md §8: 4096^2 with v8 k256 costs 1.002 bits (indices + codebook)
    out = inp = 4096
    part = CodebookPartition(0, inp, torch.zeros(256, 8), torch.zeros(out // 8, inp, dtype=torch.int32))
    w = CodebookWeight(out, inp, [part])
    assert w.bits_per_weight() == pytest.approx(1 + 16 * 8 * 256 / 4096**2)
    assert w.padding_bits() == 0


def test_from_dense_assigns_nearest_centroids_and_recovers_a_codebook_weight():
    source = random_weight(out=21, inp=12, parts=((0, 3, 3, 8, 0), (3, 12, 3, 64, 0)), perm=True, norm=False, seed=7)
    dense = source.dequantize()
    rebuilt = CodebookWeight.from_dense(
        dense, [(0, 3), (3, 12)], [p.centroids for p in source.partitions], perm=source.perm
    )
    assert torch.equal(rebuilt.dequantize(), dense)
    # and on an arbitrary weight, each vector gets a centroid at least as close as any other
    gen = torch.Generator().manual_seed(8)
    weight, book = torch.randn(22, 6, generator=gen), torch.randn(32, 4, generator=gen)
    got = CodebookWeight.from_dense(weight, [(0, 6)], [book])
    padded = torch.nn.functional.pad(weight, (0, 0, 0, 2))  # 22 rows: 6 vectors of 4, 2 zero rows
    vectors = padded.reshape(6, 4, 6).permute(0, 2, 1).reshape(-1, 4)  # vector (r, c) at r * 6 + c
    dist = torch.cdist(vectors.double(), book.double())
    chosen = dist.gather(1, got.partitions[0].indices.reshape(-1, 1).long())
    assert torch.all(chosen[:, 0] <= dist.min(dim=1).values + 1e-9)


def test_from_dense_with_residual_and_normalization():
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(16, 10, generator=gen) * 3 + 1
    book, res = torch.rand(16, 4, generator=gen), torch.randn(8, 4, generator=gen) * 0.05
    w = CodebookWeight.from_dense(weight, [(0, 10)], [book], [res], perm=torch.randperm(10, generator=gen), normalize=True)
    assert w.col_scale.dtype == torch.float16 and w.partitions[0].has_residual
    main_only = CodebookWeight.from_dense(weight, [(0, 10)], [book], perm=w.perm, normalize=True)
    assert torch.equal(w.partitions[0].indices, main_only.partitions[0].indices)  # greedy: main first
    err = (w.dequantize() - weight).norm()
    assert err <= (main_only.dequantize() - weight).norm() + 1e-6
    check_round_trip(w)
    lo, span = weight.min(dim=0).values, weight.max(dim=0).values - weight.min(dim=0).values
    assert torch.equal(w.col_bias, lo.half()) and torch.equal(w.col_scale, span.half())


def test_nearest_centroid_chunks_agree():
    gen = torch.Generator().manual_seed(10)
    vectors, book = torch.randn(500, 3, generator=gen), torch.randn(40, 3, generator=gen)
    assert torch.equal(nearest_centroid(vectors, book, chunk=100), nearest_centroid(vectors, book))


def test_matmul_is_x_times_dequantized_weight():
    w = random_weight(seed=11)
    x = torch.randn(4, 40)
    assert torch.equal(w.matmul(x), x @ w.dequantize().T)


def test_safetensors_round_trip_and_registry():
    from safetensors.torch import load, save

    w = random_weight(seed=12)
    assert FORMATS["codebook"] is CodebookWeight and w.meta()["format_name"] == "codebook"
    back = format_from_packed(load(save(w.pack())), json.loads(json.dumps(w.meta())))
    assert_same(back, w.rounded_to_storage())
    assert back.info == {"method": "test"}


def test_inconsistent_layouts_are_refused():
    w = random_weight(seed=13)
    with pytest.raises(ValueError, match="tile"):
        CodebookWeight(30, 40, [w.partitions[1], w.partitions[2]])
    with pytest.raises(ValueError, match="cover"):
        CodebookWeight(30, 41, w.partitions)
    with pytest.raises(ValueError, match="indices of partition"):
        CodebookWeight(31, 40, w.partitions)  # v = 4: 31 rows need 8 vector rows, as 30 do; v = 2 needs 16
    with pytest.raises(ValueError, match="permutation"):
        CodebookWeight(30, 40, w.partitions, perm=torch.zeros(40, dtype=torch.int64))
    w.partitions[0].indices[0, 0] = 16
    with pytest.raises(ValueError, match="16-entry codebook"):
        w.pack()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip_matches_cpu():
    w = random_weight(seed=14)
    tensors = {k: v.cuda() for k, v in w.pack().items()}
    back = format_from_packed(tensors, w.meta())
    assert torch.equal(back.dequantize().cpu(), w.rounded_to_storage().dequantize())
    assert all(torch.equal(back.pack()[k].cpu(), w.pack()[k]) for k in tensors)
