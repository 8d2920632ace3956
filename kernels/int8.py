"""W8A8 on the CPU: dynamic per-token int8 activations times per-channel int8 weights, multiplied
in integers by `torch._int_mm`.

The grids are the symmetric absmax grid of kernels/grid.py (`Grid(8, sym=True, zero_in_range=False)`),
the same codes kernels/activations.py's 8-bit sym per-token fake-quant rounds to:

    x_hat[t, k] = sx[t] * qx[t, k],  sx[t] = max_k |x[t, k]| / 127,  qx = clamp(round(x / sx), -128, 127)
    W_hat[n, k] = sw[n] * qw[n, k],  sw[n] = max_k |W[n, k]| / 127   (qw likewise, per output row)
    y[t, n] = sum_k x_hat[t, k] W_hat[n, k] = sx[t] sw[n] acc[t, n],   acc = qx @ qw^T  (int32)

acc is exact: |acc| <= 128^2 k < 2^31 for k < 2^17 in-features. The rescale is fp32, in place:
y = (float(acc) * sx) * sw, three roundings (acc to fp32 once |acc| > 2^24, then each product), so
|y - y_exact| <= 3 u |y_exact| (u = 2^-24) to first order, where y_exact is the same sum in exact
arithmetic of the same fp32 scales and integer codes (measured: <= 1.94 u at 256 x 1536 -> 576).

torch._int_mm(a int8 [m, k], b int8 [k, n]) -> int32 [m, n]. In this torch (2.13, CPU build) it
takes any m, k, n (checked from m = 1, k = 7, n = 3 up): the CUDA op's constraints (m > 16, k and n
multiples of 8) do not apply on the CPU. b is passed as the transposed view of the [n, k] codes,
which measured faster than a contiguous [k, n] copy (0.023 vs 0.029 s at 2048 x 576 x 576).

In a model: `Int8Linear` is an nn.Module (buffers codes, scales, bias). `Int8Linear.from_format`
takes a stored 8-bit symmetric per-row uniform weight as it is (codes - 128, its scales), so the
evaluated model runs the weight the method chose; `w8a8_blockers` says why a weight cannot be
taken. experiments/run/activations.py `attach` puts it in place of packed linears under dynamic
int8 per-token activations.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.kernels import grid as grids
from quantlab.kernels.activations import ActivationQuantizer
from quantlab.kernels.fastpaths import UnsupportedFormat, is_uniform, uniform_blockers

INT8_GRID = grids.Grid(8, sym=True, zero_in_range=False)
PER_TOKEN_INT8 = ActivationQuantizer(8, "per_token", sym=True)
_SIGNED_OFFSET = 2 ** (INT8_GRID.bits - 1)  # the grid's codes [0, 255] minus its zero 128: [-128, 127]


def _signed_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes clamp(round(x / scale), -128, 127) = the grid's codes minus its zero 128."""
    zero = torch.full_like(scale, _SIGNED_OFFSET)
    return (grids.quantize(x, scale, zero, INT8_GRID.maxq) - _SIGNED_OFFSET).to(torch.int8)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, k] float -> (int8 codes [tokens, k], fp32 scales [tokens, 1])."""
    scale, _ = PER_TOKEN_INT8.dynamic_params(x)
    return _signed_codes(x.float(), scale), scale


def w8a8_blockers(fmt: Any) -> list[str]:
    """Why `Int8Linear.from_format` cannot hold `fmt` exactly (empty: it can): it needs 8-bit
    codes on the symmetric grid (zero-point 128), one scale per output row, no fp16 columns and
    columns in their own order."""
    reasons = uniform_blockers(fmt, INT8_GRID.bits)
    if not is_uniform(fmt):
        return reasons
    if fmt.scales.shape[1] != 1:
        reasons.append(f"{fmt.scales.shape[1]} groups per row (group_size {fmt.group_size}): the integer "
                       "matmul rescales by one scale per output row (group_size=-1)")
    if fmt.zero_format == "float" or not bool((fmt.zeros == _SIGNED_OFFSET).all()):
        reasons.append(f"zero-points other than {_SIGNED_OFFSET}: the int8 codes need the symmetric grid "
                       "(method.sym=true)")
    return reasons


class Int8Linear(nn.Module):
    """A linear layer's weight as per-output-channel int8 codes [out, in] and fp32 scales [out];
    its forward quantizes the input per token (dynamic, symmetric, 8 bits) and multiplies the
    codes in integers (the module docstring)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scales", scales.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        scale, _ = grids.fit(weight, INT8_GRID)
        return cls(_signed_codes(weight.float(), scale[:, None]), scale, bias)

    @classmethod
    def from_format(cls, fmt: Any, bias: torch.Tensor | None = None) -> Int8Linear:
        """The same weight as `fmt.dequantize()` (scale * (code - 128)), held as signed int8 codes;
        raises UnsupportedFormat with `w8a8_blockers`' reasons where it cannot be."""
        if reasons := w8a8_blockers(fmt):
            raise UnsupportedFormat("the W8A8 integer matmul cannot take this weight: " + "; ".join(reasons))
        codes = fmt.codes.to(torch.int16) - _SIGNED_OFFSET
        return cls(codes, fmt.scales[:, 0], bias)

    def dequantize(self) -> torch.Tensor:
        return self.scales[:, None] * self.codes.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])
        codes, scale = quantize_tokens(rows)
        acc = torch._int_mm(codes, self.codes.t())
        y = acc.float().mul_(scale).mul_(self.scales)
        if self.bias is not None:
            y += self.bias.float()
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 torch._int_mm"


def _best_seconds(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `repeats` timed calls after a warm-up. On a shared CPU
    the minimum is the call least disturbed by other processes (timeit's convention); the CPU time
    of the process (all its threads) shows how much of the wall time was ours."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def benchmark(m: int, k: int, n: int, threads: int = 1, repeats: int = 30, seed: int = 0) -> dict[str, float]:
    """Tokens per second (m / best wall time) of y = x W^T for x [m, k], W [n, k]: fp32 F.linear,
    the int8 path (per-token quantization of x and the rescale included) and its integer matmul
    alone, at `threads` threads; `*_cpu_s`: the best process CPU time of each and
    `*_tokens_per_cpu_s` = m / that (at 1 thread: the speed undisturbed by other processes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        x, weight = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
        layer = Int8Linear.from_float(weight)
        codes, _ = quantize_tokens(x)
        calls = {
            "fp32": lambda: F.linear(x, weight),
            "int8": lambda: layer(x),
            "int8_matmul_only": lambda: torch._int_mm(codes, layer.codes.t()),
        }
        result: dict[str, float] = {"threads": threads}
        for name, call in calls.items():
            wall, cpu = _best_seconds(call, repeats)
            result[f"{name}_tokens_per_s"], result[f"{name}_cpu_s"] = m / wall, cpu
            result[f"{name}_tokens_per_cpu_s"] = m / max(cpu, 1e-9)
    finally:
        torch.set_num_threads(previous)
    return result


if __name__ == "__main__":
    # SmolLM2-135M's linear shapes at 2048 tokens: q/o (576 -> 576), gate/up (576 -> 1536), down (1536 -> 576)
    for threads in (1, 2):
        for k, n in ((576, 576), (576, 1536), (1536, 576)):
            r = benchmark(2048, k, n, threads)
            print(
                f"threads {threads}  2048 x {k} -> {n}:  "
                + "  ".join(
                    f"{name} {r[name + '_tokens_per_s']:7.0f} tok/s, {r[name + '_tokens_per_cpu_s']:7.0f} tok/cpu-s"
                    for name in ("fp32", "int8", "int8_matmul_only")
                )
                + f"  int8/fp32 {r['int8_tokens_per_s'] / r['fp32_tokens_per_s']:.2f}x wall,"
                + f" {r['int8_tokens_per_cpu_s'] / r['fp32_tokens_per_cpu_s']:.2f}x cpu"
            )
