"""Observers on synthetic data with known answers (methods/observers.py)."""

from collections import Counter

import numpy as np
import pytest
import torch

from quantlab.kernels import grid as grids
from quantlab.kernels.activations import ActivationQuantizer
from quantlab.methods.observers import OBSERVERS, SignedHistogram, kl_threshold_bin, make_observer


def batches(*shapes, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * scale for shape in shapes]


# ---- min-max, moving average ------------------------------------------------------------------


def test_min_max_is_exact_over_all_batches_per_tensor_and_per_channel():
    xs = batches((2, 7, 16), (3, 5, 16), (1, 9, 16))
    xs[1][0, 2, 3] = -40.0  # a single extreme in one channel of one batch
    flat = torch.cat([x.reshape(-1, 16) for x in xs])
    per_tensor, per_channel = make_observer("min_max"), make_observer("min_max", per_channel=True)
    for x in xs:
        per_tensor.update(x)
        per_channel.update(x)
    lo, hi = per_tensor.range()
    assert lo.shape == () and lo.item() == -40.0 and hi.item() == flat.max().item()
    lo, hi = per_channel.range()
    assert torch.equal(lo, flat.min(dim=0).values) and torch.equal(hi, flat.max(dim=0).values)
    assert lo[3].item() == -40.0 and lo[4].item() > -40.0


def test_moving_average_starts_at_the_first_batch_and_converges_at_rate_one_minus_momentum():
    momentum = 0.1
    obs = make_observer("moving_average", momentum=momentum)
    obs.update(torch.tensor([-8.0, 4.0]))
    assert obs.range()[0].item() == -8.0 and obs.range()[1].item() == 4.0  # initialized, not averaged with 0
    for t in range(1, 31):
        obs.update(torch.tensor([-2.0, 1.0, 0.5]))
        lo, hi = obs.range()
        decay = (1 - momentum) ** t
        assert lo.item() == pytest.approx(-2.0 + (-8.0 + 2.0) * decay, rel=1e-5)
        assert hi.item() == pytest.approx(1.0 + (4.0 - 1.0) * decay, rel=1e-5)


def test_moving_average_per_channel_moves_each_channel_alone():
    obs = make_observer("moving_average", momentum=0.5, per_channel=True)
    obs.update(torch.tensor([[0.0, -4.0], [2.0, 4.0]]))
    obs.update(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    lo, hi = obs.range()
    assert lo.tolist() == [0.5, -2.5] and hi.tolist() == [1.5, 2.5]


# ---- percentile ------------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [99.9, 99.99])
@pytest.mark.parametrize("sym", [False, True])
def test_percentile_equals_torch_quantile_over_everything_seen(percentile, sym):
    xs = batches((4, 50, 64), (2, 30, 64), (7, 64), seed=1)
    xs[0] = xs[0] * 5  # the first batch holds most of the tail: later batches must not evict it
    obs = make_observer("percentile", percentile=percentile, sym=sym, tail_capacity=4096)
    for x in xs:
        obs.update(x)
    data = torch.cat([x.reshape(-1) for x in xs]).double()
    q = percentile / 100
    lo, hi = obs.range()
    if sym:
        expected = torch.quantile(data.abs(), q).float()
        assert hi.item() == expected.item() and lo.item() == -expected.item()
    else:
        assert hi.item() == torch.quantile(data, q).float().item()
        assert lo.item() == torch.quantile(data, 1 - q).float().item()


@pytest.mark.parametrize("sym", [False, True])
def test_percentile_stays_exact_when_batches_dwarf_its_tail(sym):
    # batches of 20000 values into a 256-value tail: the sampled pre-filter runs on the first one;
    # rounded values make ties at every threshold
    xs = [torch.round(x * 8) / 8 for x in batches((20000,), (50, 400), (3, 7), seed=2)]
    obs = make_observer("percentile", percentile=99.5, sym=sym, tail_capacity=256)
    for x in xs:
        obs.update(x)
    data = torch.cat([x.reshape(-1) for x in xs]).double()
    lo, hi = obs.range()
    expected_hi = torch.quantile(data.abs() if sym else data, 0.995).float().item()
    expected_lo = -expected_hi if sym else torch.quantile(data, 0.005).float().item()
    assert (lo.item(), hi.item()) == (expected_lo, expected_hi)


def test_percentile_refuses_when_its_tail_is_too_short_to_be_exact():
    obs = make_observer("percentile", percentile=99.0, tail_capacity=10)
    obs.update(torch.randn(5000))  # the 99th percentile of 5000 values needs the top 51
    with pytest.raises(ValueError, match="tail_capacity"):
        obs.range()


# ---- histogram, entropy ------------------------------------------------------------------------


def test_histogram_counts_every_value_keeps_its_width_and_folds_to_abs():
    hist = SignedHistogram(num_bins=64)
    hist.update(torch.zeros(10))  # zeros alone cannot set the width
    hist.update(torch.tensor([-1.1, 0.55, 2.0]))
    width = hist.width
    assert width == 2.0 / 64 and hist.counts.sum().item() == 13
    hist.update(torch.tensor([-5.1, 3.05]))  # grows on both sides at the same width
    assert hist.width == width and hist.counts.sum().item() == 15
    assert (hist.n_neg, hist.n_pos) == (164, 98)  # ceil(5.1 / w), ceil(3.05 / w)
    folded = hist.abs_counts()
    # |x| in [k w, (k + 1) w): 0 -> 0, 0.55 -> 17, 1.1 -> 35, 3.05 -> 97, 5.1 -> 163; the first
    # batch's max 2.0 = 64 w sits in histc's closed last bin of that batch's range, 63
    expected = {0: 10, 17: 1, 35: 1, 63: 1, 97: 1, 163: 1}
    assert {k: int(v) for k, v in enumerate(folded.tolist()) if v} == expected


def trt_entropy_reference(hist: np.ndarray, num_bits: int, start_bin: int = 128) -> int:
    """TensorRT pytorch-quantization's `_compute_amax_entropy` loop transcribed literally (per
    candidate: np.digitize into levels, a Counter of bins per level, scipy's entropy), returning
    the chosen number of bins instead of the edge."""
    from scipy.stats import entropy

    bins = hist.copy()
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1)
    divergences = []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        density_counts = np.zeros(nbins)
        for idx, d in enumerate(digitized):
            if d != -1:
                density_counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                density_counts[key] /= val
        new_density = np.array([density_counts[d] if d != -1 else 0.0 for d in digitized])
        reference = np.array(bins[:i], dtype=np.float64)
        reference[-1] += np.sum(bins[i:])
        divergences.append(entropy(reference, new_density))
    divergences = np.array(divergences)
    return start_bin + len(divergences) - 1 - int(np.argmin(divergences[::-1]))


@pytest.mark.parametrize("bits", [8, 4])
def test_kl_threshold_matches_the_tensorrt_loop(bits):
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(20000, generator=gen).abs(), 6 + 4 * torch.rand(30, generator=gen)])
    hist = torch.histc(values, bins=300, min=0, max=float(values.max()))
    hist[200:210] = 0  # empty bins inside the range: levels with fewer occupied bins, Q = 0 cases
    assert kl_threshold_bin(hist, bits) == trt_entropy_reference(hist.numpy().astype(np.float64), bits)


def test_entropy_threshold_on_a_gaussian_with_planted_outliers_falls_inside_the_bulk():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(400_000, generator=gen)
    x[:20] = 60 * torch.sign(torch.randn(20, generator=gen))  # 0.005% outliers at 60 sigma
    obs = make_observer("entropy", bits=8)
    for chunk in x.chunk(8):
        obs.update(chunk)
    lo, hi = obs.range()
    assert lo.item() == -hi.item()
    # bulk max is ~4.8 sigma here; the min-max range would be 60
    assert 2.5 < hi.item() < 8.0


def test_entropy_needs_a_symmetric_grid_and_clippers_are_per_tensor():
    with pytest.raises(ValueError, match="symmetric"):
        make_observer("entropy", sym=False)
    for name in ("entropy", "mse", "percentile"):
        with pytest.raises(ValueError, match="per tensor"):
            make_observer(name, per_channel=True)
    with pytest.raises(ValueError, match="valid: min_max"):
        make_observer("kl")


# ---- MSE -------------------------------------------------------------------------------------


def sample_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, quantizer: ActivationQuantizer) -> float:
    scale, zero = quantizer.static_params(lo, hi)
    return ((grids.fake_quantize(x, scale, zero, quantizer.grid().maxq) - x) ** 2).mean().item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_mse_clip_beats_min_max_on_its_own_objective(bits, sym):
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(200_000, generator=gen), 12 + torch.rand(20, generator=gen)])
    x = x[torch.randperm(x.numel(), generator=gen)]
    mse, min_max = make_observer("mse", bits=bits, sym=sym), make_observer("min_max")
    for chunk in x.chunk(5):
        mse.update(chunk)
        min_max.update(chunk)
    quantizer = ActivationQuantizer(bits, "per_tensor", sym, "static")
    clipped, full = sample_mse(x, *mse.range(), quantizer), sample_mse(x, *min_max.range(), quantizer)
    assert mse.range()[1].item() < min_max.range()[1].item()
    assert clipped < full  # on the samples themselves, not only on the histogram it searched
    if bits == 4:  # where clipping matters: the outliers at 12 sigma cost the bulk its resolution
        assert clipped < 0.5 * full


def test_every_registered_observer_takes_the_common_options():
    x = torch.randn(3, 8, 32)
    for name in OBSERVERS:
        obs = make_observer(name, bits=8, sym=True)
        obs.update(x)
        lo, hi = obs.range()
        assert lo.dtype == hi.dtype == torch.float32 and lo.shape == hi.shape == ()
        assert lo.item() < 0 < hi.item() <= x.abs().max().item() * (1 + 1 / 64)
        with pytest.raises(ValueError, match="before any update"):
            make_observer(name).range()


def test_clipped_fraction_counts_the_values_outside_the_range():
    from quantlab.methods.observers import make_observer

    x = torch.arange(1, 10001, dtype=torch.float32)  # 1 .. 10000
    exact = make_observer("min_max", sym=False)
    exact.update(x)
    assert exact.clipped_fraction() == 0.0
    tail = make_observer("percentile", percentile=99.0, sym=False)
    tail.update(x)
    lo, hi = (float(v) for v in tail.range())
    assert tail.clipped_fraction() == ((x < lo).sum() + (x > hi).sum()).item() / x.numel()
    histogram = make_observer("mse", sym=True, bits=4)
    histogram.update(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    lo, hi = (float(v) for v in histogram.range())
    assert 0 <= histogram.clipped_fraction() < 0.05
    assert make_observer("moving_average").clipped_fraction() is None
