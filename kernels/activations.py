"""Activation fake-quant: what a quantized linear's input looks like on an integer grid.

`ActivationQuantizer` is the config (bits, granularity, sym, mode); `ActivationFakeQuant` is the
module that sits in front of a linear (`y = linear(fake_quant(x))`) and holds the fixed range of
static mode. Both use the grids of kernels/grid.py, so the codes are the ones an integer kernel
would see (kernels/int8.py multiplies exactly these codes):

- sym (`Grid(bits, sym=True, zero_in_range=False)`, the absmax grid of SmoothQuant / LLM.int8):
  scale = max(|lo|, |hi|) / (2^(b-1) - 1), signed levels k in [-2^(b-1), 2^(b-1) - 1] (codes
  k + 2^(b-1) in [0, 2^b - 1]), x_hat = scale * clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1).
  Dynamically |x| <= absmax, so the level -2^(b-1) is only reached by static ranges' clipping.
- asym (`Grid(bits, sym=False, zero_in_range=True)`, PyTorch's affine rule): the range is widened to
  hold 0, scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale), x_hat = scale * (clamp(round(x /
  scale) + zero, 0, 2^b - 1) - zero); 0 is exactly representable. An all-zero range becomes (-1, 1).

Granularity: `per_token` fits one (scale, zero) per row of x.reshape(-1, in) (each token alone, at
run time: dynamic only); `per_tensor` fits one for the whole tensor. Mode: `dynamic` takes [lo, hi]
from the tensor being quantized; `static` takes them from calibration (an observer's `range()`,
methods/observers.py) and keeps (scale, zero) fixed: `static_params(lo, hi)` is that conversion,
the same rule as the dynamic one. bits = 16 is off: the input passes through untouched.

In a model, `attach_input_quantizer(linear, fake_quant)` puts the module in front of any linear
(nn.Linear holding fake-quant weights, or a kernels/linear.py QuantLinear): a child module named
`input_quantizer` (so `.to()` and `state_dict` carry its range) and a forward pre-hook that
replaces the input, so one mechanism serves both evaluation backends.

Values are computed in fp32 and returned in x's dtype: in bf16 / fp16 each value scale * k is
rounded once more, to that dtype (the grid itself is fp32, as the integer kernel's rescale is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from quantlab.kernels import grid as grids

Granularity = Literal["per_tensor", "per_token"]
Mode = Literal["dynamic", "static"]
OFF_BITS = 16


@dataclass(frozen=True)
class ActivationQuantizer:
    bits: int = OFF_BITS  # 16: off; 2..8: the integer grid's width
    granularity: Granularity = "per_token"
    sym: bool = True
    mode: Mode = "dynamic"

    def __post_init__(self) -> None:
        if self.bits != OFF_BITS and not 2 <= self.bits <= 8:
            raise ValueError(f"act.bits must be 16 (off) or 2..8, got {self.bits}")
        if self.granularity not in ("per_tensor", "per_token"):
            raise ValueError(f"act.granularity must be per_tensor or per_token, got {self.granularity!r}")
        if self.mode not in ("dynamic", "static"):
            raise ValueError(f"act.mode must be dynamic or static, got {self.mode!r}")
        if self.mode == "static" and self.granularity == "per_token":
            raise ValueError("act.mode=static fixes one range before the tokens exist: use act.granularity=per_tensor")

    @property
    def enabled(self) -> bool:
        return self.bits != OFF_BITS

    def grid(self) -> grids.Grid:
        return grids.Grid(self.bits, sym=self.sym, zero_in_range=not self.sym)

    def static_params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of a calibrated range [lo, hi] (0-d tensors): fixed for static mode."""
        return grids.range_params(torch.as_tensor(lo), torch.as_tensor(hi), self.grid())

    def dynamic_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) from x itself: [tokens, 1] per token (x as [tokens, in]), 0-d per tensor."""
        rows = x.reshape(-1, x.shape[-1]).float()
        if self.granularity == "per_token":
            lo, hi = (v[:, None] for v in grids.row_range(rows))
        else:
            lo, hi = torch.aminmax(rows)
        return grids.range_params(lo, hi, self.grid())

    def fake_quantize(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [..., in] on the grid. Static mode needs the fixed (scale, zero); dynamic ignores them."""
        if not self.enabled:
            return x
        if self.mode == "static":
            if scale is None or zero is None:
                raise ValueError("static activation quantization needs a calibrated (scale, zero)")
        else:
            scale, zero = self.dynamic_params(x)
        rows = x.reshape(-1, x.shape[-1]).float()
        out = grids.fake_quantize(rows, scale, zero, self.grid().maxq)
        return out.reshape(x.shape).to(x.dtype)


class ActivationFakeQuant(nn.Module):
    """Fake-quantizes its input; put it in front of a linear. Static mode holds (scale, zero) as
    buffers, set once from a calibrated range with `calibrate(lo, hi)`."""

    def __init__(self, config: ActivationQuantizer) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)

    def calibrate(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.config.mode != "static":
            raise ValueError("only act.mode=static takes a calibrated range")
        lo, hi = torch.as_tensor(lo).float(), torch.as_tensor(hi).float()
        if lo.dim() or hi.dim():
            raise ValueError(f"a static per-tensor range is two scalars, got shapes {tuple(lo.shape)}, {tuple(hi.shape)}")
        self.scale, self.zero = self.config.static_params(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.fake_quantize(x, self.scale, self.zero)

    def extra_repr(self) -> str:
        c = self.config
        return f"bits={c.bits}, granularity={c.granularity}, sym={c.sym}, mode={c.mode}"


INPUT_QUANTIZER = "input_quantizer"  # the child module's name on its linear


def attach_input_quantizer(linear: nn.Module, fake_quant: ActivationFakeQuant) -> None:
    """y = linear(fake_quant(x)) from now on (see the module docstring); a linear takes one."""
    if hasattr(linear, INPUT_QUANTIZER):
        raise ValueError(f"{type(linear).__name__} already has an {INPUT_QUANTIZER}")
    linear.add_module(INPUT_QUANTIZER, fake_quant)
    linear.register_forward_pre_hook(lambda module, args: (module.input_quantizer(args[0]), *args[1:]))
