"""Observers: running statistics of a linear's input that fix a static activation range.

An observer sees every calibration batch of one linear's input, `update(x)` with x [..., channels]
(the driver's hook input [sequences, seqlen, in]), and then gives the range to quantize with,
`range() -> (lo, hi)` as float32 tensors; kernels/activations.py turns it into (scale, zero) with
`ActivationQuantizer.static_params`. Per tensor by default: lo, hi are 0-d. `per_channel=True`
(min_max and moving_average): lo, hi are [channels], one per input channel (x's last dim), the
statistic SmoothQuant needs (max |x_j| = max(-lo_j, hi_j)); the clipping observers are per tensor.

Every observer is built for the grid it serves, `bits` and `sym` (kernels/activations.py's
definitions); the clipping ones (percentile, entropy, mse) search with it. min_max and
moving_average give the raw (lo, hi) whatever the grid: static_params symmetrizes for sym.

- min_max: the exact running min and max.
- moving_average (`momentum`, PyTorch's MovingAverageMinMaxObserver): the first batch sets
  (lo, hi); each later one moves them by lo += momentum * (batch_min - lo), likewise hi. After t
  batches of constant (m_lo, m_hi): lo_t = m_lo + (lo_0 - m_lo) * (1 - momentum)^t.
- percentile (`percentile`, e.g. 99.9, 99.99): q = percentile / 100; asym: (quantile(x, 1 - q),
  quantile(x, q)); sym: -t, t with t = quantile(|x|, q), over ALL values seen in all batches, with
  torch.quantile's linear interpolation at rank q (N - 1), the rank in float64 (torch.quantile of
  the data as float64, to the bit; on float32 data torch rounds the rank to float32). Exact, not a
  histogram estimate: only the top N - floor(q (N - 1)) values of N enter that quantile, so
  keeping the `tail_capacity` largest (and, asym, smallest) values seen is enough while that count
  fits (default 2^19: 99.9 over 524M values); range() raises otherwise.
- entropy (sym only): TensorRT's KL calibration on the |x| histogram (`kl_threshold_bin`).
- mse: of the ranges p * (lo, hi), p = k / 512 (sym: p * (-a, a), a = max |x|), the one whose
  fake-quant of the histogram's bin centers has the lowest count-weighted squared error (`mse_clip`).

entropy and mse share a histogram of x (`SignedHistogram`) with bins [k w, (k + 1) w): w is fixed
by the first batch (max |x| / num_bins, num_bins = 2048) and bins are added on either side when a
later batch reaches past them (TensorRT's growth rule, the width never changes). The |x| histogram
of TensorRT is its fold around 0.

Clipped fraction. `clipped_fraction()` is the share of the values seen outside range() (sym:
outside [-a, a] with a = max(-lo, hi)), from what the observer already keeps, no second look at
the data: min_max 0 by construction; percentile exact (every value past the quantile is in its
kept tail); entropy and mse at bin resolution (bins whose center lies outside); moving_average
None (its range forgets the extremes it moved away from).

Cost. Updates are O(n): aminmax + one histc (+ a filter and a top-k of the few values that enter a
percentile tail); the searches run once, in range(). Measured against one GPTQ calibration pass of
a SmolLM2-135M block (8 x 2048 tokens, forward + the 4 Hessians, 1 thread, CPU time), the updates
on its 4 distinct linear inputs add: min_max 0.3% (per channel 1.3%), moving_average 0.3%, entropy
and mse 10%, percentile 99.9 sym 8% (its first batch 11%), 99.99 asym 12% (first batch 19%).
"""

from __future__ import annotations

import inspect
import math

import torch

from quantlab.kernels import grid as grids
from quantlab.kernels.activations import ActivationQuantizer


class Observer:
    """update(x) with x [..., channels]; range() -> (lo, hi) float32, 0-d or [channels]."""

    per_channel_ok = False  # whether per_channel=True is offered

    def __init__(self, *, bits: int = 8, sym: bool = True, per_channel: bool = False) -> None:
        if per_channel and not self.per_channel_ok:
            raise ValueError(f"{type(self).__name__} is per tensor; per_channel is offered by min_max and moving_average")
        self.quantizer = ActivationQuantizer(bits, "per_tensor", sym, "static")
        self.bits, self.sym, self.per_channel = bits, sym, per_channel

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if self.per_channel:
            return grids.row_range(x.reshape(-1, x.shape[-1]).T)
        return torch.aminmax(x)

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def clipped_fraction(self) -> float | None:
        """Share of the values seen outside range() (module docstring); None where not known."""
        return None

    def _seen(self, state: object) -> None:
        if state is None:
            raise ValueError(f"{type(self).__name__}.range() before any update()")

    def _bounds(self) -> tuple[float, float]:
        """range() as the (lo, hi) floats that clip: sym widens to [-a, a] as static_params does."""
        lo, hi = (float(v) for v in self.range())
        return (-max(-lo, hi), max(-lo, hi)) if self.sym else (lo, hi)


class MinMaxObserver(Observer):
    per_channel_ok = True

    def __init__(self, **grid) -> None:
        super().__init__(**grid)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._seen(self.lo)
        return self.lo, self.hi

    def clipped_fraction(self) -> float | None:
        return 0.0  # the exact extremes: nothing lies outside


class MovingAverageMinMaxObserver(MinMaxObserver):
    def __init__(self, momentum: float = 0.01, **grid) -> None:
        super().__init__(**grid)
        if not 0 < momentum <= 1:
            raise ValueError(f"observer.momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.lo is None:  # the first batch initializes, as PyTorch's observer does
            self.lo, self.hi = lo, hi
            return
        self.lo = self.lo + self.momentum * (lo - self.lo)
        self.hi = self.hi + self.momentum * (hi - self.hi)

    def clipped_fraction(self) -> float | None:
        return None  # the moving range forgot the extremes it moved away from


def _keep_largest(kept: torch.Tensor, values: torch.Tensor, capacity: int) -> torch.Tensor:
    """The `capacity` largest of kept + values (unordered), kept being the largest seen so far.
    Only values above a threshold can enter, found in O(n): kept's smallest once kept is full;
    before that, for a batch of over 4 capacity values, the value that a 1-in-16 sample puts
    ~2 capacity from the top, used only if at least `capacity` values pass it (then the top
    `capacity` all do). The top-k then sorts a few capacity values, not the batch."""
    if kept.numel() >= capacity:
        values = values[values > kept.min()]
    elif values.numel() > 4 * capacity:
        sample = values[::16]
        threshold = torch.kthvalue(sample, sample.numel() - 2 * capacity // 16).values
        above = values[values >= threshold]
        if above.numel() >= capacity:
            values = above
    merged = torch.cat([kept, values])
    if merged.numel() > capacity:
        merged = torch.topk(merged, capacity, sorted=False).values
    return merged


def _upper_quantile(largest: torch.Tensor, count: int, q: float) -> torch.Tensor:
    """torch.quantile(data, q) (linear) of `count` values of which `largest` are the top ones:
    the sorted data's entries floor(q (count - 1)) and the next, interpolated."""
    rank = q * (count - 1)
    below = math.floor(rank)
    needed = count - below  # entries of the top we index: sorted positions below .. count - 1
    if needed > largest.numel():
        raise ValueError(
            f"the {q * 100}th percentile of {count} values needs the top {needed}; this observer kept "
            f"{largest.numel()}: raise observer.tail_capacity"
        )
    top = torch.sort(largest.double(), descending=True).values
    value_below = top[count - 1 - below]
    value_above = top[count - 1 - min(below + 1, count - 1)]
    return torch.lerp(value_below, value_above, torch.tensor(rank - below, dtype=torch.float64)).float()


class PercentileObserver(Observer):
    def __init__(self, percentile: float = 99.99, tail_capacity: int = 1 << 19, **grid) -> None:
        super().__init__(**grid)
        if not 50 < percentile <= 100:
            raise ValueError(f"observer.percentile must be in (50, 100], got {percentile}")
        self.q, self.capacity, self.count = percentile / 100, tail_capacity, 0
        self.top = torch.empty(0)  # the largest values seen (|x| when sym)
        self.bottom = torch.empty(0)  # -(the smallest values seen), asym only

    def update(self, x: torch.Tensor) -> None:
        values = x.detach().reshape(-1).float()
        self.top, self.bottom = self.top.to(values.device), self.bottom.to(values.device)
        self.count += values.numel()
        if self.sym:
            self.top = _keep_largest(self.top, values.abs(), self.capacity)
            return
        self.top = _keep_largest(self.top, values, self.capacity)
        self.bottom = _keep_largest(self.bottom, -values, self.capacity)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._seen(self.count or None)
        hi = _upper_quantile(self.top, self.count, self.q)
        # quantile(x, 1 - q) = -quantile(-x, q): the lower tail is the upper tail of -x
        lo = -hi if self.sym else -_upper_quantile(self.bottom, self.count, self.q)
        return lo, hi

    def clipped_fraction(self) -> float | None:
        lo, hi = self._bounds()
        outside = int((self.top > hi).sum()) + (0 if self.sym else int((self.bottom > -lo).sum()))
        return outside / self.count


class SignedHistogram:
    """Counts of x in the bins [k w, (k + 1) w), k = -n_neg .. n_pos - 1 (see the module docstring).
    A batch of zeros alone cannot set w; its count waits in the bin of 0 until one can."""

    def __init__(self, num_bins: int = 2048) -> None:
        self.num_bins = num_bins
        self.width: float | None = None
        self.n_neg = self.n_pos = 0
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.zeros_waiting = 0
        self.lo = self.hi = 0.0  # exact extremes seen
        self.seen = 0  # values counted

    def update(self, x: torch.Tensor) -> None:
        values = x.detach().reshape(-1).float()
        self.seen += values.numel()
        lo, hi = (v.item() for v in torch.aminmax(values))
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.width is None:
            amax = max(-lo, hi)
            if amax == 0:
                self.zeros_waiting += values.numel()
                return
            self.width = amax / self.num_bins
        # grow to hold [lo, hi]; the float32 edges histc uses still hold them (rounding is monotone)
        n_neg = max(self.n_neg, math.ceil(-lo / self.width))
        n_pos = max(self.n_pos, math.ceil(hi / self.width))
        n_neg += n_neg * self.width < -lo
        n_pos += n_pos * self.width < hi
        self.counts = torch.nn.functional.pad(self.counts.to(values.device), (n_neg - self.n_neg, n_pos - self.n_pos))
        self.n_neg, self.n_pos = n_neg, n_pos
        bins = n_neg + n_pos
        self.counts += torch.histc(values, bins, -n_neg * self.width, n_pos * self.width).double()
        self.counts[n_neg] += self.zeros_waiting
        self.zeros_waiting = 0

    def centers(self) -> torch.Tensor:
        k = torch.arange(-self.n_neg, self.n_pos, dtype=torch.float64, device=self.counts.device)
        return (k + 0.5) * self.width

    def abs_counts(self) -> torch.Tensor:
        """The |x| histogram: bin k = [k w, (k + 1) w) holds bins k and -k - 1 of x."""
        n = max(self.n_neg, self.n_pos)
        positive = torch.nn.functional.pad(self.counts[self.n_neg :], (0, n - self.n_pos))
        negative = torch.nn.functional.pad(self.counts[: self.n_neg].flip(0), (0, n - self.n_neg))
        return positive + negative


def _last_argmin(values: torch.Tensor) -> int:
    """The largest index of the minimum: ties go to the widest range."""
    return len(values) - 1 - int(torch.argmin(values.flip(0)))


def kl_threshold_bin(abs_counts: torch.Tensor, bits: int, start_bin: int = 128, chunk: int = 64) -> int:
    """TensorRT's entropy calibration (pytorch-quantization calib/histogram.py
    `_compute_amax_entropy`): the number i of |x| bins to keep, threshold = i * w.

    h = the |x| histogram with h[0] replaced by h[1] (TensorRT's quirk: ReLU zeros would dominate
    bin 0). For each candidate i = start_bin .. len(h):
      P = h[:i] with the clipped mass sum(h[i:]) added to P[i - 1];
      Q = h[:i] merged into L = 2^(bits-1) levels (bin j in level floor(j L / i)), each level's
          mass spread evenly over its non-empty bins (empty bins stay 0);
      D(i) = KL(P / sum P || Q / sum Q), infinite where Q = 0 < P.
    The largest i of minimal D wins (the reference searches its reversed list). Batched over
    chunks of candidates: a [chunk, i] table per chunk, no loop over bins."""
    h = abs_counts.double().clone()
    h[0] = h[1]
    levels = 2 ** (bits - 1)
    n = h.numel()
    cumulative = torch.cumsum(h, 0)
    total = cumulative[-1]
    divergences = []
    for first in range(start_bin, n + 1, chunk):
        keep = torch.arange(first, min(first + chunk, n + 1), device=h.device)  # candidates i [c]
        j = torch.arange(int(keep[-1]), device=h.device)
        inside = j[None, :] < keep[:, None]  # [c, i_max]: bin j is kept by candidate i
        hist = h[j] * inside
        occupied = (hist > 0).double()
        level = torch.where(inside, j[None, :] * levels // keep[:, None], levels)  # outside -> spare level
        level_mass = torch.zeros(len(keep), levels + 1, dtype=h.dtype, device=h.device).scatter_add_(1, level, hist)
        level_bins = torch.zeros_like(level_mass).scatter_add_(1, level, occupied)
        q = occupied * level_mass.gather(1, level) / level_bins.gather(1, level).clamp(min=1)
        p = hist.clone()
        rows = torch.arange(len(keep), device=h.device)
        p[rows, keep - 1] += total - cumulative[keep - 1]
        p_norm, q_norm = p / total, q / cumulative[keep - 1, None]
        terms = torch.where(p > 0, p_norm * (p_norm.log() - q_norm.log()), torch.zeros_like(p))
        divergences.append(terms.sum(1))
    return start_bin + _last_argmin(torch.cat(divergences))


class _HistogramObserver(Observer):
    """A clip searched on the shared histogram: update() feeds it, range() asks `_clip`."""

    def __init__(self, num_bins: int = 2048, **grid) -> None:
        super().__init__(**grid)
        self.histogram = SignedHistogram(num_bins)

    def update(self, x: torch.Tensor) -> None:
        self.histogram.update(x)

    def _clip(self, hist: SignedHistogram) -> tuple[float, float]:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram
        self._seen(hist.seen or None)
        lo, hi = (0.0, 0.0) if hist.width is None else self._clip(hist)  # no width: only zeros seen
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)

    def clipped_fraction(self) -> float | None:
        hist = self.histogram
        if hist.width is None:
            return 0.0
        lo, hi = self._bounds()
        centers = hist.centers()
        return float(hist.counts[(centers < lo) | (centers > hi)].sum()) / hist.seen


class EntropyObserver(_HistogramObserver):
    def __init__(self, num_bins: int = 2048, start_bin: int = 128, **grid) -> None:
        super().__init__(num_bins, **grid)
        if not self.sym:
            raise ValueError("entropy (TensorRT's KL calibration) is defined for symmetric grids: use act.sym=true")
        if num_bins < start_bin:
            raise ValueError(f"num_bins {num_bins} must be at least start_bin {start_bin}")
        self.start_bin = start_bin

    def _clip(self, hist: SignedHistogram) -> tuple[float, float]:
        t = kl_threshold_bin(hist.abs_counts(), self.bits, self.start_bin) * hist.width
        return -t, t


def mse_clip(
    counts: torch.Tensor, centers: torch.Tensor, lo: float, hi: float, quantizer: ActivationQuantizer,
    num_candidates: int = 512,
) -> float:
    """The fraction p in {k / num_candidates, k = 1 .. num_candidates} whose range p * (lo, hi)
    (sym: p * (-a, a), a = max(-lo, hi)) gives the lowest sum_bins count * (x_hat(c) - c)^2 over
    the bin centers c, x_hat the grid's fake-quant with (scale, zero) from that range. Ties keep the
    larger p. p = 1 is min-max, so the result is never worse than min-max on this objective."""
    if quantizer.sym:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    p = torch.arange(1, num_candidates + 1, dtype=torch.float64, device=counts.device) / num_candidates
    scale, zero = grids.range_params(p * lo, p * hi, quantizer.grid())
    x = centers.float()[None, :]
    chunk = max(1, (1 << 22) // x.shape[1])  # candidates per [chunk, bins] table: ~16 MB
    errors = []
    for first in range(0, num_candidates, chunk):
        s, z = scale[first : first + chunk, None], zero[first : first + chunk, None]
        x_hat = grids.fake_quantize(x, s, z, quantizer.grid().maxq)
        errors.append(((x_hat - x).double() ** 2 * counts[None, :]).sum(1))
    return float(p[_last_argmin(torch.cat(errors))])


class MSEObserver(_HistogramObserver):
    def __init__(self, num_bins: int = 2048, num_candidates: int = 512, **grid) -> None:
        super().__init__(num_bins, **grid)
        self.num_candidates = num_candidates

    def _clip(self, hist: SignedHistogram) -> tuple[float, float]:
        p = mse_clip(hist.counts, hist.centers(), hist.lo, hist.hi, self.quantizer, self.num_candidates)
        lo, hi = (-max(-hist.lo, hist.hi), max(-hist.lo, hist.hi)) if self.sym else (hist.lo, hist.hi)
        return p * lo, p * hi


OBSERVERS: dict[str, type[Observer]] = {
    "min_max": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, **options) -> Observer:
    """An observer by registry name; options: bits, sym, per_channel and the observer's own
    (momentum, percentile, tail_capacity, num_bins, start_bin, num_candidates)."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; valid: {', '.join(OBSERVERS)}") from None
    return cls(**options)


def observer_options(name: str) -> list[str]:
    """The options observer `name` takes beyond the grid (bits, sym, per_channel), from its classes'
    constructors: what a config may set for it."""
    options: list[str] = []
    for cls in OBSERVERS[name].__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            params = inspect.signature(init).parameters.values()
            options += [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in ("self", *options)]
    return options
