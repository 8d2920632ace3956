"""The block-by-block calibration driver (DESIGN.md, reference/methods.md §1.1).

Capture the inputs of block 0 (hidden states and the kwargs the block receives: masks, position
embeddings), then for each block hand the method a `DecoderBlockView` over the block and its inputs,
and recompute the outputs, which become the next block's inputs. Only one block's activations
live in memory at a time, and only the current block visits the compute device; the rest of the
model stays where it was loaded, so a model larger than the GPU can be quantized.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from quantlab.experiments.models.adapters import Architecture, check_method_fits
from quantlab.experiments.run.activations import BlockObservers, StaticCalibration
from quantlab.experiments.run.module_rules import RUN_WIDE, SKIPPED_BITS, ModuleRule, segments
from quantlab.kernels import QuantizedWeight
from quantlab.kernels.format import WeightFormat
from quantlab.methods.base import Method
from quantlab.methods.block import LinearHook, ModuleCall, ScalingGroup

log = logging.getLogger(__name__)

class _StopForward(Exception):
    """Raised from a hook to end a forward pass early once what is needed has been seen."""


def _both(first: LinearHook, second: LinearHook) -> LinearHook:
    def hook(x: torch.Tensor) -> None:
        first(x)
        second(x)
    return hook


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    bits: int | None  # the format's nominal width; None for formats without one (codebooks)
    storage_bits: int
    bits_per_weight: float
    rel_weight_error: float
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    group_size: int | None = None  # as configured
    group_size_effective: int | None = None  # -1 where the group is wider than the layer (per channel)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name, "shape": list(self.shape), "bits": self.bits,
            "storage_bits": self.storage_bits, "bits_per_weight": self.bits_per_weight,
            "rel_weight_error": self.rel_weight_error, "seconds": self.seconds, "info": self.info,
        }
        if self.group_size_effective is not None and self.group_size_effective != self.group_size:
            out.update(group_size=self.group_size, group_size_effective=self.group_size_effective)
        return out


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # one tensor per calibration chunk, [batch, seqlen, hidden]
    kwargs: list[dict[str, Any]]  # what block 0 received besides hidden states, per chunk

    @property
    def n_sequences(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def rechunked(self, size: int) -> BlockInputs:
        """The same sequences in chunks of at most `size` (views, no copies). A kwarg tensor whose
        leading dimension is the chunk's batch (a 4-D attention mask) is split with it; batch-free
        ones (position embeddings [1, seqlen, d], None masks) are shared by the pieces."""
        hidden, kwargs = [], []
        for chunk, chunk_kwargs in zip(self.hidden, self.kwargs):
            batch = chunk.shape[0]
            for start in range(0, batch, size):
                piece = slice(start, start + size)
                hidden.append(chunk[piece])
                kwargs.append({k: _batch_slice(v, batch, piece) for k, v in chunk_kwargs.items()})
        return BlockInputs(hidden, kwargs)


def _batch_slice(value: Any, batch: int, piece: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[piece] if batch > 1 and value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_batch_slice(v, batch, piece) for v in value)
    return value


@dataclass
class QuantizationReport:
    layers: list[LayerRecord]
    seconds: dict[str, float]
    # Every committed weight format by full module name, on the CPU: what saving, reloading and the
    # packed evaluation backend are made of (kernels/).
    formats: dict[str, WeightFormat] = field(default_factory=dict)

    skipped: dict[str, tuple[int, int]] = field(default_factory=dict)  # linears a module rule left alone: shape
    # static activation ranges by full linear name (experiments/run/activations.py), when calibrated
    act_ranges: dict[str, dict[str, Any]] = field(default_factory=dict)
    method: str | None = None  # what produced it: the method's name and its whole config
    method_config: dict[str, Any] = field(default_factory=dict)
    # a whole-model stage's record (experiments/run/finetune.py: QAT's loss curve, steps, seconds)
    fine_tune: dict[str, Any] | None = None

    @property
    def avg_bits(self) -> float | None:
        """Storage bits per weight over every decoder linear, a skipped one at 16 bits (fp16)."""
        skipped = sum(rows * cols for rows, cols in self.skipped.values())
        numel = sum(r.shape[0] * r.shape[1] for r in self.layers) + skipped
        return (sum(r.storage_bits for r in self.layers) + SKIPPED_BITS * skipped) / numel if numel else None


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _on_device(modules: list[nn.Module], device: torch.device):
    """Move modules to the compute device for the duration, then back where each one was."""
    homes = []
    for module in modules:
        tensor = next(module.parameters(), None)
        if tensor is None:
            tensor = next(module.buffers(), None)
        homes.append(tensor.device if tensor is not None else None)
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            if home is not None:
                module.to(home)


def _existing_modules(model: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
    found = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # e.g. OPT's project_in is None when embedding and hidden sizes agree
        if isinstance(module, nn.Module):
            found.append(module)
    return found


def check_one_mask_serves_all(model: nn.Module, seqlen: int) -> None:
    """Every block is replayed with the attention mask block 0 received. Where layers attend
    differently (Gemma 2: sliding and full, `config.layer_types`), the masks agree only while the
    sequence fits the sliding window; refuse longer calibration windows."""
    layer_types = set(getattr(model.config, "layer_types", None) or ())
    window = getattr(model.config, "sliding_window", None)
    if len(layer_types) > 1 and window is not None and seqlen > window:
        raise ValueError(
            f"{model.config.model_type}: its layers attend in different ways ({', '.join(sorted(layer_types))}; "
            f"sliding window {window}) and the calibration windows have {seqlen} tokens: block 0's attention "
            f"mask, which the driver replays for every block, would be wrong for the others. Set "
            f"calib.seqlen <= {window}."
        )


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, arch: Architecture, calib_ids: torch.Tensor, device: torch.device, batch_size: int
) -> BlockInputs:
    check_one_mask_serves_all(model, calib_ids.shape[1])
    blocks = arch.block_list(model)
    backbone = model.get_submodule(arch.backbone)
    captured: BlockInputs = BlockInputs([], [])

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    modules = _existing_modules(model, arch.pre_block_modules) + [blocks[0]]
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with _on_device(modules, device):
            for chunk in calib_ids.split(batch_size):
                try:
                    backbone(input_ids=chunk.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured.hidden) != len(calib_ids.split(batch_size)):
        raise RuntimeError("block 0 was not reached for every calibration chunk; is the architecture table right?")
    return captured


class DecoderBlockView:
    """`quantlab.methods.block.BlockView` over one decoder block on the compute device."""

    def __init__(self, index: int, name: str, block: nn.Module, arch: Architecture, inputs: BlockInputs | None):
        self.index = index
        self.name = name
        self.block = block
        self.family = arch.family
        self.linears = arch.block_linears(block)
        self.sequential_groups = arch.sequential_groups
        self.true_sequential_default = arch.true_sequential_default
        self.scaling_groups = arch.scaling_groups
        self.input_groups = arch.input_groups
        self.inputs = inputs
        self.n_sequences = inputs.n_sequences if inputs else 0
        self.n_tokens = inputs.n_tokens if inputs else 0
        self.records: list[LayerRecord] = []
        self.formats: dict[str, WeightFormat] = {}
        self.arch = arch
        self.consumed = False  # a last_pass run replaced the inputs by mid-block residuals
        # static-range observers of this block. With `ride_observers` (the method's
        # final_inputs_on_passes) an input is observed on the first pass that reaches it once
        # every linear before it is settled (committed, or skipped by a module rule). While an
        # input is unobserved, last_pass keeps the inputs: the output pass must run the whole block.
        self.observers: BlockObservers | None = None
        self.ride_observers = False
        self.settled: set[str] = set()

    def _require_inputs(self) -> BlockInputs:
        if self.inputs is None:
            raise RuntimeError(
                "this method runs the block, but the driver got no calibration data: set needs_calibration=True"
            )
        if self.consumed:
            raise RuntimeError(f"{self.name}: a last_pass run already replaced the block inputs by residuals")
        return self.inputs

    @torch.no_grad()
    def run(
        self, hooks: Mapping[str, LinearHook] | None = None, stop_after: str | None = None, last_pass: bool = False
    ) -> None:
        inputs = self._require_inputs()
        hooks = dict(hooks or {})
        if stop_after is not None and stop_after not in self.linears:
            raise KeyError(f"stop_after={stop_after!r} is not a linear of this block")
        riding = self._ready_observers(stop_after)
        for source, observe in riding.items():
            method_hook = hooks.get(source)
            hooks[source] = observe if method_hook is None else _both(method_hook, observe)
        handles = []
        for name, linear in self.linears.items():
            hook = hooks.get(name)
            if hook is None and name != stop_after:
                continue

            def pre_hook(module: nn.Module, args: tuple, _hook=hook, _stop=(name == stop_after)) -> None:
                if _hook is not None:
                    _hook(args[0])
                if _stop:
                    raise _StopForward

            handles.append(linear.register_forward_pre_hook(pre_hook))
        residuals: list[torch.Tensor] = []
        keep_residual = (last_pass and self.arch.residual_checkpoint is not None and self.arch.finish_supported(self.block)
                         and not (self.observers is not None and set(self.observers.unfed()) - set(riding)))
        if keep_residual:
            checkpoint = self.block.get_submodule(self.arch.residual_checkpoint)
            handles.append(checkpoint.register_forward_pre_hook(lambda _m, args: residuals.append(args[0])))
        try:
            for i, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
                residuals.clear()
                try:
                    self.block(hidden, **kwargs)
                except _StopForward:
                    pass
                if keep_residual and not residuals:
                    keep_residual = False  # the pass stopped before the checkpoint: keep h
                if keep_residual:
                    # h is not needed any more: r takes its place, so memory stays one activation set
                    inputs.hidden[i] = residuals[0].reshape(hidden.shape)
                    self.consumed = True
        finally:
            for handle in handles:
                handle.remove()
        if riding:
            self.observers.mark_fed(list(riding), len(inputs.hidden), on="method_pass")

    def _ready_observers(self, stop_after: str | None) -> dict[str, LinearHook]:
        """The observer hooks this pass can carry: those of the unobserved inputs that the pass
        reaches and that no unsettled linear runs before (execution order: `linears`)."""
        if self.observers is None or not self.ride_observers:
            return {}
        order = list(self.linears)
        reach = len(order) if stop_after is None else order.index(stop_after) + 1
        ready = [s for s in self.observers.unfed()
                 if order.index(s) < reach and set(order[:order.index(s)]) <= self.settled]
        return self.observers.hooks(ready)

    def submodule(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    @torch.no_grad()
    def capture(self, names: Sequence[str]) -> dict[str, list[ModuleCall]]:
        """Each named sub-module's calls during one pass over the calibration chunks (the block's
        output is discarded). Keyword arguments are copied shallowly: tensors are shared."""
        inputs = self._require_inputs()
        calls: dict[str, list[ModuleCall]] = {name: [] for name in names}
        handles = []
        for name in names:
            def pre_hook(_module: nn.Module, args: tuple, kwargs: dict, _calls=calls[name]) -> None:
                _calls.append(ModuleCall(tuple(args), dict(kwargs)))

            handles.append(self.block.get_submodule(name).register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
                self.block(hidden, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        inputs = self._require_inputs()
        return [_block_output(self.block(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]

    @torch.no_grad()
    def advance_in_place(self, hooks: Mapping[str, LinearHook] | None = None) -> None:
        """Replace each input chunk by the block's output, one chunk at a time, so that inputs and
        outputs never both live in memory in full. `hooks` see the linears' inputs on the way
        (the block runs whole: not after a last_pass)."""
        if hooks:
            assert not self.consumed, "hooks need the whole block: attach the observers before the last pass"
            handles = [self.linears[name].register_forward_pre_hook(lambda _m, args, _h=hook: _h(args[0]))
                       for name, hook in hooks.items()]
            try:
                self.advance_in_place()
            finally:
                for handle in handles:
                    handle.remove()
            return
        if self.consumed:
            assert self.inputs is not None and self.arch.finish_block is not None
            for i, residual in enumerate(self.inputs.hidden):
                self.inputs.hidden[i] = self.arch.finish_block(self.block, residual)
            self.consumed = False
            return
        inputs = self._require_inputs()
        for i, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            inputs.hidden[i] = _block_output(self.block(hidden, **kwargs))

    @torch.no_grad()
    def commit(self, name: str, qweight: QuantizedWeight, seconds: float, **info: Any) -> None:
        if self.observers is not None and name in self.settled and self.observers.fed:
            raise RuntimeError(
                f"{self.name}.{name} is committed twice, after static-range observers rode on a pass that took it "
                "as final: a method that re-commits must keep final_inputs_on_passes = False")
        self.settled.add(name)
        linear = self.linears[name]
        original = linear.weight.detach().float()
        dequantized = qweight.dequantize(torch.float32).to(original.device)
        if dequantized.shape != original.shape:
            raise ValueError(f"{self.name}.{name}: quantized shape {tuple(dequantized.shape)} != {tuple(original.shape)}")
        rel_error = (torch.linalg.norm(original - dequantized) / torch.linalg.norm(original).clamp(min=1e-12)).item()
        linear.weight.data.copy_(dequantized.to(linear.weight.dtype))
        self.formats[f"{self.name}.{name}"] = qweight.to("cpu")
        self.records.append(
            LayerRecord(
                name=f"{self.name}.{name}", shape=qweight.shape, bits=getattr(qweight, "bits", None),
                storage_bits=qweight.storage_bits(), bits_per_weight=qweight.bits_per_weight(),
                rel_weight_error=rel_error, seconds=seconds, info=dict(info),
                group_size=getattr(qweight, "group_size", None),  # formats without groups have none
                group_size_effective=clamped_group_size(getattr(qweight, "group_size", None), qweight.shape[1]),
            )
        )


class SegmentView:
    """A block seen through one segment of the module rules (experiments/run/module_rules.py): only
    the segment's linears, the sequential and scaling groups cut to them; a pass of any segment but
    the block's last quantized one never ends the block's passes (`last_pass` is dropped)."""

    def __init__(self, view: DecoderBlockView, names: list[str], last: bool) -> None:
        self._view, self._last = view, last
        self.linears = {name: view.linears[name] for name in names}
        groups = [[n for n in group if n in self.linears] for group in view.sequential_groups]
        self.sequential_groups = [g for g in groups if g]
        self.scaling_groups = [
            ScalingGroup(g.prev_op, tuple(n for n in g.linears if n in self.linears), g.inspect)
            for g in view.scaling_groups if any(n in self.linears for n in g.linears)
        ]
        self.input_groups = [tuple(n for n in g if n in self.linears) for g in view.input_groups]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._view, attr)

    def run(self, hooks: Mapping[str, LinearHook] | None = None, stop_after: str | None = None,
            last_pass: bool = False) -> None:
        self._view.run(hooks, stop_after, last_pass and self._last)


def _quantize_segments(view: DecoderBlockView, method: Method, rules: list[ModuleRule],
                       methods: dict[int, Method], skipped: dict[str, tuple[int, int]]) -> None:
    """Quantize `view` segment by segment, each by its rule's method, in execution order."""
    cut = segments(rules, view.name, list(view.linears))
    quantized = [i for i, (rule, _) in enumerate(cut) if rule is None or not rule.skip]
    for i, (rule, names) in enumerate(cut):
        if rule is not None and rule.skip:
            for name in names:
                skipped[f"{view.name}.{name}"] = tuple(view.linears[name].weight.shape)
                view.settled.add(name)
            continue
        before = len(view.records)
        (method if rule is None else methods[rule.index]).quantize_block(
            SegmentView(view, names, last=i == quantized[-1]))
        for record in view.records[before:]:
            record.info["rule"] = None if rule is None else rule.index


def clamped_group_size(group_size: int | None, in_features: int) -> int | None:
    """A group wider than the layer is one group per row: per channel (-1), recorded as such."""
    return -1 if group_size is not None and group_size != -1 and group_size > in_features else group_size


def _progress(total: int, desc: str, enabled: bool):
    """range(total) under a tqdm bar (when enabled); log lines meanwhile go through tqdm.write, so
    the bar stays one line below them."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not enabled:
        yield from range(total)
        return
    with logging_redirect_tqdm():
        yield from tqdm(range(total), desc=desc)


def block_summary(seconds: float, records: Sequence[LayerRecord]) -> str:
    """A block's line: its seconds, and its linears' mean loss as the method reports it (the
    solvers' `loss`: GPTQ, OWQ, SliM-LLM), else their mean relative weight error."""
    losses = [r.info["loss"] for r in records if isinstance(r.info.get("loss"), (int, float))]
    what, values = ("mean loss", losses) if records and len(losses) == len(records) else (
        "mean rel. weight error", [r.rel_weight_error for r in records])
    if not values:
        return f"{seconds:.1f} s, no linear quantized"
    return f"{seconds:.1f} s, {what} {sum(values) / len(values):.4g} over {len(values)} linears"


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    arch: Architecture,
    method: Method,
    calib_ids: torch.Tensor | None,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    block_inputs: BlockInputs | None = None,
    rules: list[ModuleRule] | None = None,
    activations: StaticCalibration | None = None,
) -> QuantizationReport:
    """Quantize every decoder-block linear of `model` in place with `method`. `block_inputs`:
    block 0's inputs captured beforehand (from the cache); they are consumed (overwritten).
    `rules`: the run's module rules (experiments/run/module_rules.py), each with its own config of
    the same method; linears no rule matches get `method`, skipped ones stay as they are.
    `activations`: calibrate static activation ranges of the quantized linears' inputs on the
    way (experiments/run/activations.py says which inputs the observers see); they land in
    `act_ranges`. Then even a data-free method's run propagates the calibration inputs.
    A method that `fine_tunes` (QAT) then trains the whole committed model (experiments/run/finetune.py)."""

    check_method_fits(arch, method)
    seconds: dict[str, float] = {}
    blocks = arch.block_list(model)
    needs_inputs = method.needs_calibration or activations is not None
    inputs: BlockInputs | None = block_inputs if needs_inputs else None
    if method.fine_tunes and calib_ids is None:
        raise ValueError(f"method {method.name!r} trains on the calibration sequences: pass calib_ids")
    if needs_inputs and inputs is None:
        if calib_ids is None:
            raise ValueError(f"method {method.name!r} needs calibration data (or static activation ranges do)")
        start = time.perf_counter()
        inputs = capture_block_inputs(model, arch, calib_ids, device, batch_size)
        seconds["capture_s"] = time.perf_counter() - start
    if inputs is not None and method.sequences_per_forward is not None:
        inputs = inputs.rechunked(method.sequences_per_forward)
    records: list[LayerRecord] = []
    formats: dict[str, WeightFormat] = {}
    skipped: dict[str, tuple[int, int]] = {}
    rules = rules or []
    methods = {rule.index: type(method)(rule.config) for rule in rules if not rule.skip}
    for rule_index, other in methods.items():  # parse_rules refuses these before the model loads
        assert all(getattr(other, a) == getattr(method, a) for a in RUN_WIDE), f"modules[{rule_index}]"
    act_ranges: dict[str, dict[str, Any]] = {}
    method_s = forward_s = 0.0
    for index in _progress(len(blocks), f"{method.name}: blocks", progress):
        block, block_start, first_record = blocks[index], time.perf_counter(), len(records)
        with _on_device([block], device):
            view = DecoderBlockView(index, f"{arch.blocks}.{index}", block, arch, inputs)
            observers = None
            if activations is not None:
                skip_here = {name for rule, names in segments(rules, view.name, list(view.linears))
                             if rule is not None and rule.skip for name in names} if rules else set()
                observers = BlockObservers(view, [n for n in view.linears if n not in skip_here], activations)
                view.observers, view.ride_observers = observers, method.final_inputs_on_passes
            start = time.perf_counter()
            float_outputs = view.outputs() if inputs is not None and method.propagation == "float" else None
            forward_s += time.perf_counter() - start
            start = time.perf_counter()
            if rules:
                _quantize_segments(view, method, rules, methods, skipped)
            else:
                method.quantize_block(view)
            method_s += time.perf_counter() - start
            missing = set(view.linears) - {r.name.removeprefix(view.name + ".") for r in view.records}
            missing -= {name.removeprefix(view.name + ".") for name in skipped}
            if method.quantizes_weights and missing:
                raise RuntimeError(f"method {method.name!r} left {sorted(missing)} of {view.name} unquantized")
            view.observers = None  # the inputs still unobserved see the output pass
            unobserved = observers.unfed() if observers is not None else []
            start = time.perf_counter()
            if float_outputs is not None:
                if unobserved:  # the float forward ran before the method: one more, quantized
                    view.run(hooks=observers.hooks(unobserved))
                    observers.mark_fed(unobserved, len(inputs.hidden), on="extra_forward")
                inputs.hidden = float_outputs
            elif inputs is not None:
                view.advance_in_place(observers.hooks(unobserved) if unobserved else None)
                if unobserved:
                    observers.mark_fed(unobserved, len(inputs.hidden), on="output_pass")
            forward_s += time.perf_counter() - start
            if observers is not None:
                act_ranges.update(observers.ranges(view.name))
            records.extend(view.records)
            formats.update(view.formats)
            log.info("%s: block %d/%d (%s): %s", method.name, index + 1, len(blocks), view.name,
                     block_summary(time.perf_counter() - block_start, records[first_record:]))
    seconds["method_s"] = method_s
    seconds["block_forward_s"] = forward_s  # observer updates included
    if activations is not None:
        seconds["observer_s"] = sum(r["observer_seconds"] for r in {r["input_of"]: r for r in act_ranges.values()}.values())
    clamped = sorted({(r.group_size, r.shape[1]) for r in records if r.group_size_effective != r.group_size})
    if clamped:
        log.warning(
            "group_size=%s is wider than %d linears (input widths %s): they are quantized per channel, and "
            "their layer records say group_size_effective=-1", clamped[0][0],
            sum(r.group_size_effective != r.group_size for r in records), sorted({w for _, w in clamped}),
        )
    report = QuantizationReport(records, seconds, formats, skipped, act_ranges, method.name, asdict(method.config))
    if method.fine_tunes:  # the whole-model stage (QAT) on the committed model
        from quantlab.experiments.run.finetune import fine_tune_model

        inputs = None  # the last block's outputs: not needed any more
        fine_tune_model(model, arch, method, report, calib_ids, device)
    return report
