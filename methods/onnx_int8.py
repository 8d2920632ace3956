"""ONNX Runtime's INT8 quantization as a baseline: `method=onnx_int8` (`method.mode=dynamic|static`).

This is a method whose work another runtime does (`runtime = "onnxruntime"`, methods/base.py): the
model is exported to ONNX, ONNX Runtime's quantization tool rewrites the graph, and the rewritten
graph is evaluated in ONNX Runtime (experiments/evaluation/onnx_runtime.py). It is a method rather than an
`eval.backend` because it decides the weights (and, static, the activations): records, sweeps and
reports key off the method and its exact bits; and it cannot be a `quantize_block` plug-in, since
what it produces is a graph with integer ops, not a weight format per linear.

- `dynamic` (`quantize_dynamic`): weights int8 ahead of time; each input activation of those
  MatMuls is quantized to uint8 at run time from its own range (DynamicQuantizeLinear ->
  MatMulInteger). Data-free.
- `static` (`quantize_static`, QDQ format): weights int8, and the activations around them with
  scales fixed from calibration (`calibrate_method`, MinMax by default) on the run's calibration
  set (`calib` group).

Only the MatMuls of the decoder blocks' linears are quantized (`nodes_to_quantize`), the same
linears every other method quantizes; embeddings, norms, attention products and the head stay
fp32. Weights are symmetric int8 per tensor (`per_channel=false`, ORT's default) or per output
channel; bits are counted from the quantized graph: 8 per weight plus each fp32 scale and int8
zero-point ORT stores beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView

MODES = ("dynamic", "static")
ACTIVATION_TYPES = ("uint8", "int8")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class OnnxInt8Config(MethodConfig):
    bits: int = 8
    group_size: int = -1  # ORT has no groups: per tensor, or per channel with per_channel=true
    mode: str = "dynamic"
    per_channel: bool = False
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI (ORT's advice)
    activation_type: str = "uint8"  # static only (dynamic is always uint8)
    calibrate_method: str = "minmax"  # static only

    supported_bits: ClassVar[tuple[int, ...]] = (8,)

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.group_size != -1:
            raise ConfigError(
                f"method {method_name!r}: group_size={self.group_size}, but ONNX Runtime's INT8 has no groups "
                "(per tensor, or method.per_channel=true): leave method.group_size=-1"
            )
        for knob, value, valid in (("mode", self.mode, MODES), ("activation_type", self.activation_type, ACTIVATION_TYPES),
                                   ("calibrate_method", self.calibrate_method, CALIBRATE_METHODS)):
            if value not in valid:
                raise ConfigError(f"method {method_name!r}: {knob}={value!r} is not valid; choose one of: {', '.join(valid)}")
        if self.mode == "dynamic" and (self.activation_type != "uint8" or self.calibrate_method != "minmax"):
            raise ConfigError(
                f"method {method_name!r}: activation_type and calibrate_method apply to mode=static only "
                "(dynamic quantizes activations to uint8 at run time): drop them or set method.mode=static"
            )


@register("onnx_int8")
class OnnxInt8(Method):
    config_class = OnnxInt8Config
    needs_calibration = False
    runtime = "onnxruntime"

    def __init__(self, config: OnnxInt8Config) -> None:
        super().__init__(config)
        self.needs_calibration = config.mode == "static"  # static calibrates the activation ranges

    def quantize_block(self, block: BlockView) -> None:
        raise NotImplementedError(
            "onnx_int8 quantizes the exported ONNX graph of the whole model (experiments/evaluation/onnx_runtime.py), "
            "not block by block"
        )
