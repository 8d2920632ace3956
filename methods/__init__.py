"""Quantization algorithms: pure tensor math on weights and calibration statistics.

No file I/O, no Hydra, no transformers imports. Importing this package registers every method.
"""

from quantlab.methods import (  # noqa: F401  (registration side effects)
    awq,
    fp16,
    gguf,
    gptq,
    hqq,
    nf4,
    onnx_int8,
    owq,
    qat,
    rtn,
    slim_llm,
    smoothquant,
    vptq,
)
from quantlab.methods.base import REGISTRY, ConfigError, Method, MethodConfig, get_method_class, register

__all__ = ["REGISTRY", "ConfigError", "Method", "MethodConfig", "get_method_class", "register"]
