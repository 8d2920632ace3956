"""QuantLinear: an nn.Linear whose weight is a quantized format, run by a reference or a fast path.

    qlinear = QuantLinear.from_format(fmt, bias, backend="auto", dtype=torch.float32)
    y = qlinear(x)                       # x [..., in] -> [..., out], in x's dtype
    consistency_check(qlinear)           # the chosen path against x @ dequantize().T
    quantize_linears(model, {"model.layers.0.self_attn.q_proj": fmt, ...}, backend="auto")
    model_weight_bytes(model)            # real bytes of parameters + buffers, shared storage once

What a QuantLinear holds (registered buffers, so `.to(device)` and `state_dict` carry them; it
caches nothing big):
- kernel "reference": the format's own packed tensors (`fmt.pack()`, e.g. bit-packed codes and
  fp16 scales) and its `meta()`. Every forward unpacks them, dequantizes and runs F.linear. Any
  format runs here: act-order g_idx, mixed widths, codebooks, OWQ's fp16 columns (dequantize()
  writes them into their columns, which is y = dense_part(x) + x[:, idx] @ outlier_values.T).
- a fast kernel (kernels/fastpaths.py: int4_cpu, int8_cpu, int4_cuda): the op's own layout of
  the codes, which replaces the packed codes (not a second copy), plus the format's stored
  scales / zeros (small), so that `to_format()` rebuilds the format exactly (the codes are read
  back through the op) and `dequantize()` is the reference weight.
The weight held is the format as stored (`rounded_to_storage()`: fp16 scales, ...), what a saved
model holds; `dequantize()` returns that weight.

`backend`: "auto" takes the first fast path that can run the format on its device (int4 before
int8) and else the reference path; the reasons each fast path refused are in `kernel_reasons`.
Naming a fast path that cannot take the format raises `UnsupportedFormat` with every reason
(bits, groups, outliers, act-order g_idx, mixed widths, shapes, device).

Devices and dtypes. A layout belongs to a device type: moving an int4_cpu module to CUDA (or an
int4_cuda one to the CPU) re-lays the weight out for the int4 op there, or for the reference
path where that op cannot take it (`kernel` says which runs). A dtype cast of the model (e.g.
`model.to(torch.bfloat16)`) changes the bias and `dtype`, never the stored tensors: the layouts
keep the dtypes their ops need and the scales keep their stored precision. The output is in x's
dtype. The int4_cpu nibble order depends on the CPU's capability: its state_dict is for this
machine; the portable artifact is `to_format().pack()` (experiments/models/quantized.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.kernels.fastpaths import FAST_PATHS, UnsupportedFormat, choose_fast_path
from quantlab.kernels.format import WeightFormat

BACKENDS = ("auto", "reference", *FAST_PATHS)
_PACKED_PREFIX = "packed_"
_FORMAT_PREFIX = "format_"

# consistency_check's default tolerance on max|y - y_ref| / max|y_ref|, by the dtype the path
# computes in. bf16 (the fast paths): x, the (scale, zero) table and the output are each rounded
# to bf16 (unit roundoff u = 2^-9). Measured: 2-3 u on random 4-bit and 8-bit weights
# (tests/kernels/test_linear.py); on SmolLM2-135M's linears (RTN) up to 4.2 u at W4 g128 and
# 7.7 u at W8 per channel, where rows skewed by outliers have zero-points up to 86 levels from
# 128, so the op's bf16-rounded output carries a large s * (q - 128) term that the fp32 offset
# cancels. 16 u = 0.031 leaves 2x headroom there and still fails every layout bug we could make
# (a wrong zero-point convention or nibble order errs by O(0.1 - 1)).
# fp16: 16 u as well. fp32 (the reference path): only the summation order differs, ~1e-6.
CHECK_TOLERANCE = {torch.bfloat16: 16 * 2.0**-9, torch.float16: 16 * 2.0**-11, torch.float32: 1e-5}


class KernelMismatch(RuntimeError):
    """consistency_check found the chosen path too far from x @ dequantize().T."""


def _format_device(fmt: WeightFormat) -> torch.device:
    """Where a format's tensors are (its packed tensors' device)."""
    for field in dataclasses.fields(fmt) if dataclasses.is_dataclass(fmt) else ():
        value = getattr(fmt, field.name)
        if isinstance(value, torch.Tensor):
            return value.device
    return next(iter(fmt.pack().values())).device


def _implicit_zeros(bits: int, out_features: int, n_groups: int, device: torch.device) -> torch.Tensor:
    return torch.full((out_features, n_groups), float(2 ** (bits - 1)), device=device)


class QuantLinear(nn.Module):
    """y = x @ W.T + bias with W a quantized format (see the module docstring)."""

    def __init__(
        self,
        fmt: WeightFormat,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not valid; choose one of: {', '.join(BACKENDS)}")
        self.out_features, self.in_features = (int(n) for n in fmt.shape)
        self.dtype = dtype
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            bias = nn.Parameter(bias.detach().to(dtype=dtype, device=device), requires_grad=False)
        self.bias = bias
        self._weight_buffers: list[str] = []
        self.kernel = "reference"
        self.kernel_reasons: dict[str, list[str]] = {}
        stored = fmt.rounded_to_storage()
        target = torch.device(device) if device is not None else _format_device(stored)
        self._install(stored.to(target), backend)

    @classmethod
    def from_format(
        cls,
        fmt: Any,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """A QuantLinear running `fmt` on `device` (default: where fmt's tensors are); `dtype` is
        the activation dtype it serves (its bias, its probes)."""
        return cls(fmt, bias, backend, dtype, device)

    # ---- the weight --------------------------------------------------------------------------

    def _install(self, fmt: Any, backend: str) -> None:
        """Lay `fmt` (as stored, on its target device) out for `backend` and register the buffers."""
        device = _format_device(fmt)
        if backend == "auto":
            kernel, self.kernel_reasons = choose_fast_path(fmt, device)
            kernel = kernel or "reference"
        elif backend == "reference":
            kernel, self.kernel_reasons = "reference", {}
        else:
            reasons = FAST_PATHS[backend].blockers(fmt, device)
            if reasons:
                raise UnsupportedFormat(
                    f"backend {backend!r} cannot run this {type(fmt).__name__} "
                    f"[{self.out_features} x {self.in_features}]: "
                    + "; ".join(reasons)
                    + ". backend='reference' runs any format; 'auto' picks a fast path where one fits."
                )
            kernel, self.kernel_reasons = backend, {}
        self._format_cls = type(fmt)
        self.format_name = getattr(fmt, "format_name", type(fmt).__name__)
        self.bits = getattr(fmt, "bits", None)
        self.group_size = getattr(fmt, "group_size", None)
        if kernel == "reference":
            tensors, self._format_meta = fmt.pack(), fmt.meta()
            self._packed_keys = {_PACKED_PREFIX + key.replace(".", "__"): key for key in tensors}
            buffers = {name: tensors[key] for name, key in self._packed_keys.items()}
        else:
            buffers, self._kernel_config = FAST_PATHS[kernel].layout(fmt)
            self._format_meta = {
                "bits": fmt.bits,
                "group_size": fmt.group_size,
                "zero_format": fmt.zero_format,
                "scale_bits": getattr(fmt, "scale_bits", 16),
                "per_tensor": getattr(fmt, "per_tensor", False),
                "info": dict(getattr(fmt, "info", {}) or {}),
            }
            buffers[_FORMAT_PREFIX + "scales"] = fmt.scales.clone()
            if fmt.zero_format == "int":  # integers in [0, 2^bits - 1]: exact in uint8 (bits <= 8 here)
                buffers[_FORMAT_PREFIX + "zeros"] = fmt.zeros.round().to(torch.uint8)
            elif fmt.zero_format == "float":
                buffers[_FORMAT_PREFIX + "zeros"] = fmt.zeros.clone()
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        self._weight_buffers = list(buffers)
        self.kernel = kernel

    def _clear_weight(self) -> None:
        for name in self._weight_buffers:
            del self._buffers[name]
        self._weight_buffers = []

    def to_format(self) -> Any:
        """The format this module runs, as stored (exactly: fast layouts give their codes back)."""
        if self.kernel == "reference":
            return self._format_cls.unpack(
                {key: getattr(self, name) for name, key in self._packed_keys.items()}, self._format_meta
            )
        from quantlab.kernels.groups import contiguous_g_idx

        meta = self._format_meta
        buffers = {name: getattr(self, name) for name in self._weight_buffers}
        codes = FAST_PATHS[self.kernel].codes(buffers, self._kernel_config)
        scales = buffers[_FORMAT_PREFIX + "scales"]
        if meta["zero_format"] == "none":
            zeros = _implicit_zeros(meta["bits"], self.out_features, scales.shape[1], scales.device)
        else:
            zeros = buffers[_FORMAT_PREFIX + "zeros"]
            zeros = zeros.float() if meta["zero_format"] == "int" else zeros
        return self._format_cls(
            codes=codes,
            scales=scales,
            zeros=zeros,
            g_idx=contiguous_g_idx(self.in_features, meta["group_size"]).to(codes.device),
            bits=meta["bits"],
            group_size=meta["group_size"],
            zero_format=meta["zero_format"],
            scale_bits=meta["scale_bits"],
            per_tensor=meta["per_tensor"],
            info=dict(meta["info"]),
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] weight this module represents (the reference every path must match)."""
        return self.to_format().dequantize(dtype)

    # ---- running -----------------------------------------------------------------------------

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T (no bias) on the chosen path; x [..., in] -> [..., out] in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        if self.kernel == "reference":
            return F.linear(x, self.to_format().dequantize(torch.float32).to(x.dtype))
        path = FAST_PATHS[self.kernel]
        if path.device_type in ("cpu", "cuda") and x.device.type != path.device_type:
            raise RuntimeError(
                f"kernel {self.kernel!r} runs on {path.device_type}, the input is on {x.device.type}; "
                f"move the module with .to() (it re-lays its weight out for the new device)"
            )
        buffers = {name: getattr(self, name) for name in self._weight_buffers}
        y = path.matmul(x.reshape(-1, self.in_features), buffers, self._kernel_config)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202  (nn.Module's signature)
        """Move the weight by device only (see the module docstring); re-lay a device-bound layout
        out for the new device type."""
        weight = {name: self._buffers[name] for name in self._weight_buffers}
        source = next(iter(weight.values()), None)
        if source is None:
            return super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.dtype, device=source.device))
        target = probe.device
        path = FAST_PATHS.get(self.kernel)
        relayout = (
            path is not None
            and path.device_type in ("cpu", "cuda")
            and target.type in ("cpu", "cuda")
            and target.type != path.device_type
        )
        fmt = self.to_format() if relayout else None
        for name in weight:  # hidden from fn: a dtype cast must not touch layouts or stored precision
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in weight.items():
                self._buffers[name] = tensor
        if probe.is_floating_point():
            self.dtype = probe.dtype
        if relayout:
            self._clear_weight()
            equivalent = "int4_cuda" if target.type == "cuda" else "int4_cpu"
            moved = fmt.to(target)
            self._install(
                moved, equivalent if not FAST_PATHS[equivalent].blockers(moved, target) else "reference"
            )
        else:
            for name, tensor in weight.items():
                self._buffers[name] = tensor.to(target)
        return self

    def extra_repr(self) -> str:
        grid = f", {self.bits}-bit g{self.group_size}" if self.bits is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format_name}{grid}, kernel={self.kernel}"
        )


def compute_dtype(qlinear: QuantLinear) -> torch.dtype:
    """The dtype the chosen path multiplies in: bf16 for the fast paths, else the module's dtype."""
    return torch.bfloat16 if qlinear.kernel in FAST_PATHS else qlinear.dtype


@torch.no_grad()
def consistency_check(
    qlinear: QuantLinear, n_probe: int = 8, seed: int = 0, tolerance: float | None = None, name: str = ""
) -> float:
    """Max relative error max|y - y_ref| / max|y_ref| of the chosen path (no bias) against
    y_ref = x @ dequantize().T in fp32, on a seeded standard-normal probe x [n_probe, in] in the
    module's dtype. Raises KernelMismatch above `tolerance` (default: CHECK_TOLERANCE of the
    path's compute dtype; see there why)."""
    tol = CHECK_TOLERANCE.get(compute_dtype(qlinear), 1e-5) if tolerance is None else tolerance
    weight = qlinear.dequantize(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_probe, qlinear.in_features, generator=generator).to(
        device=weight.device, dtype=qlinear.dtype
    )
    reference = x.float() @ weight.T
    error = float(
        (qlinear.matmul(x).float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)
    )
    if not error <= tol:
        label = f"{name} " if name else ""
        raise KernelMismatch(
            f"{label}[{qlinear.out_features} x {qlinear.in_features}] kernel {qlinear.kernel!r}: max relative "
            f"error {error:.3e} against x @ dequantize().T exceeds {tol:.3e}"
        )
    return error


def quantize_linears(model: nn.Module, formats: dict[str, Any], backend: str = "auto") -> None:
    """Replace each nn.Linear named in `formats` (full module names, e.g.
    "model.layers.0.self_attn.q_proj") by a QuantLinear of its format on the linear's device and
    dtype, keeping its bias. Names, types, shapes and an explicit backend's fit are checked for
    every linear before any is replaced."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of: {', '.join(BACKENDS)}")
    targets = []
    for name, fmt in formats.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
        except AttributeError as error:
            raise KeyError(f"the model has no module {name!r}") from error
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        if tuple(fmt.shape) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"{name}: format shape {tuple(fmt.shape)} != linear ({linear.out_features}, {linear.in_features})"
            )
        if backend in FAST_PATHS:
            reasons = FAST_PATHS[backend].blockers(fmt, linear.weight.device)
            if reasons:
                raise UnsupportedFormat(f"{name}: backend {backend!r} cannot run it: " + "; ".join(reasons))
        targets.append((parent, child, linear, fmt))
    for parent, child, linear, fmt in targets:
        qlinear = QuantLinear.from_format(
            fmt, linear.bias, backend, dtype=linear.weight.dtype, device=linear.weight.device
        )
        setattr(parent, child, qlinear)


def model_weight_bytes(model: nn.Module | Iterable[nn.Module]) -> int:
    """Real bytes of the parameters and buffers of a module (or of several, counted together):
    each storage once (tied weights, views), by its device and data pointer. Meta tensors count 0."""
    modules = [model] if isinstance(model, nn.Module) else list(model)
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in itertools.chain.from_iterable(
        itertools.chain(m.parameters(), m.buffers()) for m in modules
    ):
        if tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
