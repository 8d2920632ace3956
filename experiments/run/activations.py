"""Activation quantization of a run (README, "Weight + activation quantization"): the static
ranges the block driver calibrates (`StaticCalibration`, `BlockObservers`), the input quantizers
put into the evaluated model (`attach`), and the record's `act` entry (`record_entry`).

The grid and the fake-quant module are kernels/activations.py's; the observers are
methods/observers.py's. Which inputs the observers see (a choice, stated once here): each block's
linear inputs as the block computes them *after* the method has quantized it, so within the block
they come from its quantized (and, for SmoothQuant / AWQ, rescaled) weights, and the block's
inputs are the ones the driver propagates for the method (quantized propagation: the outputs of
the earlier quantized blocks; float propagation: full-precision ones). The earlier blocks'
activation quantizers are *not* applied on that pass: doing so needs each block's ranges before
its own outputs are computed, i.e. one more block forward per block.

Where those inputs are computed (the cost): a method whose passes see final inputs
(`final_inputs_on_passes`: GPTQ, OWQ, SliM-LLM, VPTQ) carries each observer on its first pass that
reaches the input once every linear before it is committed. Under GPTQ's true-sequential passes
that is every input (q/k/v on the first pass, o on the second, ...), so observing costs no forward
at all and the output pass keeps its mid-block shortcut. Inputs no such pass reached (the rest,
and every input of AWQ / SmoothQuant / RTN) are observed on the output pass, which then runs the
whole block (quantized propagation), or on one extra forward of the quantized block (float
propagation, whose output pass ran before the method). Each range records which (`observed_on`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantlab.experiments.run.schema import ActConfig, ObserverConfig
from quantlab.kernels.activations import ActivationFakeQuant, attach_input_quantizer
from quantlab.methods.block import LinearHook
from quantlab.methods.hessian import input_representatives


@dataclass
class StaticCalibration:
    """What the driver needs to fix static ranges: the grid (act) and the statistic (observer)."""

    act: ActConfig
    observer: ObserverConfig


class BlockObservers:
    """One observer per distinct input of a block's quantized linears (q/k/v share one), fed by
    hooks on the first linear that receives it (methods/hessian.py `input_representatives`), each
    on exactly one pass over the calibration chunks (`mark_fed` checks it saw every chunk and says
    which pass it was: a method's own pass, the output pass or an extra forward)."""

    def __init__(self, view: Any, targets: list[str], calibration: StaticCalibration) -> None:
        representative = input_representatives(view)
        self.calibration = calibration
        self.source = {name: representative[name] for name in targets}
        self.observers = {s: calibration.observer.make(calibration.act) for s in dict.fromkeys(self.source.values())}
        self.seconds = dict.fromkeys(self.observers, 0.0)
        self.calls = dict.fromkeys(self.observers, 0)
        self.fed: dict[str, str] = {}  # source -> the pass it was observed on

    def unfed(self) -> list[str]:
        return [source for source in self.observers if source not in self.fed]

    def hooks(self, sources: list[str] | None = None) -> dict[str, LinearHook]:
        """Hooks feeding the observers of `sources` (default: every one not fed yet)."""
        def timed(source: str) -> LinearHook:
            observer = self.observers[source]

            def hook(x: torch.Tensor) -> None:
                start = time.perf_counter()
                observer.update(x)
                self.calls[source] += 1
                self.seconds[source] += time.perf_counter() - start
            return hook

        return {source: timed(source) for source in (self.unfed() if sources is None else sources)}

    def mark_fed(self, sources: list[str], chunks: int, on: str) -> None:
        for source in sources:
            if self.calls[source] != chunks or source in self.fed:
                raise RuntimeError(f"the observer of {source}'s input saw {self.calls[source]} calls for "
                                   f"{chunks} calibration chunks (already fed on: {self.fed.get(source)})")
            self.fed[source] = on

    def ranges(self, prefix: str) -> dict[str, dict[str, Any]]:
        """{full linear name: the record of its input's range}; the observer's search timed too."""
        quantizer = self.calibration.act.quantizer()
        per_source = {}
        for source, observer in self.observers.items():
            start = time.perf_counter()
            lo, hi = observer.range()
            scale, zero = quantizer.static_params(lo, hi)
            clipped = observer.clipped_fraction()
            self.seconds[source] += time.perf_counter() - start
            per_source[source] = {
                "observer": self.calibration.observer.name, "input_of": f"{prefix}.{source}",
                "lo": float(lo), "hi": float(hi), "scale": float(scale), "zero": float(zero),
                "clipped_fraction": clipped, "observer_seconds": self.seconds[source],
                "observed_on": self.fed.get(source),
            }
        return {f"{prefix}.{name}": dict(per_source[source]) for name, source in self.source.items()}


def int8_matmul_applies(act: ActConfig, backend: str, kernel: str, device: torch.device) -> bool:
    """Whether the packed evaluation routes eligible linears to the integer W8A8 matmul
    (kernels/int8.py): dynamic symmetric 8-bit activations per token, eval.backend=packed with the
    automatic kernel choice, on the CPU (CUDA's torch._int_mm needs more than 16 rows and
    multiples of 8, which short inputs break). `eval.kernel=reference` (or a named weight-only
    path) keeps fake-quant inputs in front of the packed weights."""
    quantizer = act.quantizer()
    return (backend == "packed" and kernel == "auto" and torch.device(device).type == "cpu"
            and quantizer.bits == 8 and quantizer.sym
            and quantizer.granularity == "per_token" and quantizer.mode == "dynamic")


def attach(model: nn.Module, arch: Any, act: ActConfig, skipped: dict[str, Any], ranges: dict[str, dict],
           int8_matmul: bool = False) -> dict[str, int]:
    """An input fake-quant in front of every decoder linear but the skipped ones (static: at its
    calibrated range); works on nn.Linear (eval.backend=fake) and QuantLinear (packed) alike. With
    `int8_matmul` (int8_matmul_applies), a packed linear whose weight the integer matmul holds
    exactly (8-bit symmetric, per output row: kernels/int8.py w8a8_blockers) is replaced by an
    Int8Linear instead, which quantizes its input itself on the same grid. Returns how many linears
    got each: {"fake_quant": n, "int8_int_mm": m}."""
    from quantlab.kernels.int8 import Int8Linear, w8a8_blockers
    from quantlab.kernels.linear import QuantLinear

    quantizer = act.quantizer()
    counts = {"fake_quant": 0, "int8_int_mm": 0}
    if not quantizer.enabled:
        return counts
    for index, block in enumerate(arch.block_list(model)):
        for name, linear in arch.block_linears(block).items():
            full = f"{arch.blocks}.{index}.{name}"
            if full in skipped:
                continue
            if int8_matmul and isinstance(linear, QuantLinear) and not w8a8_blockers(fmt := linear.to_format()):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, Int8Linear.from_format(fmt, linear.bias))
                counts["int8_int_mm"] += 1
                continue
            fake_quant = ActivationFakeQuant(quantizer)
            if act.static:
                fake_quant.calibrate(torch.tensor(ranges[full]["lo"]), torch.tensor(ranges[full]["hi"]))
            device = next(itertools.chain(linear.parameters(), linear.buffers())).device
            attach_input_quantizer(linear, fake_quant.to(device))
            counts["fake_quant"] += 1
    return counts


def record_entry(act: ActConfig, observer: ObserverConfig, ranges: dict[str, dict], counts: dict[str, int]) -> dict[str, Any]:
    """The record's `act`: the settings, how many linears were quantized (and by which path:
    `kernels`), and for static ranges the observer with each linear's range (`layers`, beside
    the weight records' `layers`)."""
    entry: dict[str, Any] = asdict(act)
    entry["quantized_linears"] = sum(counts.values())
    entry["kernels"] = {path: n for path, n in counts.items() if n}
    if act.static:
        entry["observer"] = {"name": observer.name, **observer.options()}
        entry["layers"] = ranges
    return entry
