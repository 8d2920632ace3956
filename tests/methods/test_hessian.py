import math

import pytest
import torch

from quantlab.methods.hessian import HessianAccumulator


def reference_per_sample(samples: list[torch.Tensor]) -> torch.Tensor:
    """The reference's add_batch called once per sequence (b = 1), written out literally."""
    features = samples[0].shape[-1]
    hessian = torch.zeros(features, features)
    n = 0
    for sample in samples:
        inp = sample.unsqueeze(0) if sample.dim() == 2 else sample
        batch = inp.shape[0]
        inp = inp.reshape(-1, features).t()
        hessian *= n / (n + batch)
        n += batch
        inp = math.sqrt(2 / n) * inp.float()
        hessian += inp.matmul(inp.t())
    return hessian


def test_batched_equals_per_sample_reference_loop():
    gen = torch.Generator().manual_seed(0)
    sequences = torch.randn(10, 24, 48, generator=gen) * torch.exp(torch.randn(48, generator=gen))
    acc = HessianAccumulator(48)
    acc.add(sequences[:7])  # [b, tokens, in]: one matmul for 7 sequences
    acc.add(sequences[7:])
    assert acc.n_sequences == 10
    expected = reference_per_sample(list(sequences))
    torch.testing.assert_close(acc.hessian, expected, rtol=2e-6, atol=1e-6 * expected.abs().max().item())
    flat = sequences.reshape(-1, 48).double()
    exact = 2 / 10 * flat.T @ flat
    torch.testing.assert_close(acc.hessian.double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


def test_counts_sequences_not_tokens():
    x = torch.randn(3, 5, 8)
    two_d = HessianAccumulator(8)
    for sequence in x:
        two_d.add(sequence)  # [tokens, in] is one sequence
    assert two_d.n_sequences == 3
    flattened = HessianAccumulator(8)
    flattened.add(x.reshape(-1, 8), n_sequences=3)
    torch.testing.assert_close(two_d.hessian, flattened.hessian)
    with pytest.raises(ValueError):
        flattened.add(torch.randn(4, 7))


def test_fp16_inputs_are_cast_before_scaling():
    x = (torch.randn(2, 64, 16) * 200).half()  # x x^T sums overflow fp16
    acc = HessianAccumulator(16)
    acc.add(x)
    assert torch.isfinite(acc.hessian).all() and acc.hessian.dtype == torch.float32
    flat = x.reshape(-1, 16).double()
    exact = flat.T @ flat
    torch.testing.assert_close(acc.hessian.double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


def test_lower_triangle_gram_equals_the_full_product():
    from quantlab.methods.hessian import add_gram_

    for width in (100, 256, 576, 1000, 1536):
        x = torch.randn(300, width, dtype=torch.float64)
        target = torch.full((width, width), 0.5, dtype=torch.float64)
        add_gram_(target, x)
        assert torch.allclose(target, 0.5 + x.T @ x, rtol=1e-12, atol=1e-9), width


def test_reference_order_is_the_reference_loop_to_the_bit():
    """One sequence per call, the reference's product: the same bits as its per-sample loop (the
    tiled product and batched calls agree only up to rounding; the README's reference-numerics
    section shows what that rounding does at 3 bits)."""
    gen = torch.Generator().manual_seed(1)
    sequences = torch.randn(5, 300, 320, generator=gen) * torch.exp(torch.randn(320, generator=gen))
    acc = HessianAccumulator(320, reference_order=True)
    for sequence in sequences:
        acc.add(sequence.unsqueeze(0))
    assert torch.equal(acc.hessian, reference_per_sample(list(sequences)))
