"""The method contract, small enough to read in one docstring.

A method is a config dataclass plus one class registered by name:

    @dataclass
    class RTNConfig(MethodConfig):
        sym: bool = False

    @register("rtn")
    class RTN(Method):
        config_class = RTNConfig
        def quantize_block(self, block: BlockView) -> None:
            for name, linear in block.linears.items():
                block.commit(name, round_to_nearest(linear.weight, ...), seconds=...)

The driver (experiments/run/pipeline.py) hands `quantize_block` one decoder block at a time, already
holding that block's calibration inputs; the method reads weights, runs the block with hooks to
collect statistics, and commits a `QuantizedWeight` for every linear. Class attributes tell the
driver what the method needs:
- `needs_calibration`: False for methods that never run the block (RTN, fp16), so no data loads;
- `quantizes_weights`: False only for the fp16 baseline; otherwise every linear must be committed;
- `propagation`: "quantized" (next block sees the quantized block's outputs: GPTQ, OWQ, SliM-LLM)
  or "float" (next block sees full-precision outputs: AWQ, VPTQ; reference/methods.md §1.1);
- `runtime`: None for every method above. A method that another runtime carries out on the whole
  model names it (ONNX Runtime's INT8, `methods/onnx_int8.py`: it quantizes an exported graph,
  activations included, and is evaluated in that runtime): the run hands the model to
  experiments/ instead of calling `quantize_block`, which such a method never implements.
- `sequences_per_forward`: None (the driver's calibration batch) or a number of sequences per block
  forward, where the summation order matters (GPTQ's `reference_numerics`: 1, as the reference).
- `fine_tunes`: True for a method that also trains the whole model once every block is committed
  (QAT, methods/qat.py): the driver then calls its `fine_tune(linears, formats, others, loss_fn,
  sequences)` with the model's quantized linears, their formats and a next-token loss on the
  calibration sequences (experiments/run/finetune.py), and keeps the formats it returns;
- `run_wide_knobs`: config knobs that hold for the whole run (QAT's training settings): per-module
  rules may not set them;
- `folds_scales`: True for methods that rescale a scaling group's linears and the op before them
  together (AWQ, SmoothQuant): per-module rules may not split such a group.
- `final_inputs_on_passes`: True for a method whose every `block.run` sees a linear's input as the
  finished block will, once the linears before it are committed: it changes no norm, bias or
  committed weight afterwards (GPTQ, OWQ, SliM-LLM, VPTQ; not AWQ or SmoothQuant, whose passes come
  before their rescaling). Static activation observers then ride on those passes instead of an
  extra forward of the whole block (experiments/run/activations.py).

Per-module rules (experiments/run/module_rules.py) hand a method a view of part of a block (some
of its linears, the groups cut to them): a method quantizes what `block.linears` holds, no more.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

from quantlab.methods.block import BlockView


class ConfigError(ValueError):
    """A configuration a method cannot run; the message names the knob and its valid values."""


@dataclass
class MethodConfig:
    bits: int = 4
    group_size: int = 128

    # Subclasses narrow these; validate() checks them before any model loads.
    supported_bits: ClassVar[tuple[int, ...]] = tuple(range(2, 9))

    def validate(self, method_name: str) -> None:
        if self.bits not in self.supported_bits:
            raise ConfigError(
                f"method {method_name!r} cannot quantize to bits={self.bits}; "
                f"valid: {', '.join(map(str, self.supported_bits))}"
            )
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(
                f"method {method_name!r}: group_size={self.group_size} is invalid; use -1 (one group per "
                "row) or a positive number of input columns (32, 64, 128, ...)"
            )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Method(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs_calibration: ClassVar[bool] = True
    quantizes_weights: ClassVar[bool] = True
    propagation: ClassVar[Literal["quantized", "float"]] = "quantized"
    runtime: ClassVar[str | None] = None
    sequences_per_forward: int | None = None
    folds_scales: ClassVar[bool] = False
    fine_tunes: ClassVar[bool] = False
    final_inputs_on_passes: ClassVar[bool] = False
    run_wide_knobs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @abstractmethod
    def quantize_block(self, block: BlockView) -> None:
        """Commit a quantized weight for every linear of `block` (see the module docstring)."""


REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def decorate(cls: type[Method]) -> type[Method]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return decorate


def get_method_class(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(sorted(REGISTRY))}") from None
