"""ONNX Runtime INT8 (`method=onnx_int8`, methods/onnx_int8.py): export, quantize, evaluate in ORT.

1. Export: the full-precision model, as a module input_ids [1, L] -> logits [1, L, V], through
   torch's ONNX exporter (`dynamo=True`; the TorchScript exporter cannot export transformers'
   llama mask code, `aten::diff`), with a dynamic sequence length, so calibration windows and
   evaluation windows may differ in length. Cached per model fingerprint and library versions.
2. Which MatMul is which linear: the exporter records each node's module path
   (`pkg.torch.onnx.name_scopes`); every decoder-block linear must map to one MatMul whose
   constant B is exactly its weight transposed (checked), and only those nodes are quantized.
3. Quantize with ONNX Runtime's own tool: `quantize_dynamic` (int8 weights, uint8 activations
   quantized at run time) or `quantize_static` (QDQ format, activation ranges calibrated on the
   run's calibration windows, one window per ORT run).
4. Evaluate the quantized graph in an onnxruntime CPU session on the same windows as the baseline:
   each window alone, mean next-token NLL of positions 1..L-1, PPL = exp(mean over windows), as
   experiments/evaluation/perplexity.py does, with its interval and the paired delta to the baseline.

Bits are read off the quantized graph: per linear the int8 weight (8 bits each) plus the fp32
scale(s) and int8 zero-point(s) ORT stores beside it. Activation scales (static) are per-tensor
constants of the graph, not weight storage; the record lists their count.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.experiments.evaluation.perplexity import LOGIT_SLICE, summarize
from quantlab.experiments.evaluation.statistics import paired_delta
from quantlab.experiments.run.pipeline import LayerRecord
from quantlab.experiments.store.cache import build_dir_once, key_hash

EXPORT_FILE = "model.onnx"
REQUIRED = ("onnxruntime", "onnx", "onnxscript")  # onnxscript: torch's dynamo ONNX exporter


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's graph passes and ORT's quantizer log a line per initializer and per tensor at
    INFO on the root logger (thousands on a 30-block model): keep warnings only while they run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


class _Logits(nn.Module):
    """input_ids -> logits, no cache: the graph ORT runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, use_cache=False).logits


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def export(model: nn.Module, path: Path, example_len: int = 16) -> None:
    """Export `model` (on the CPU, fp32) to `path` with a dynamic sequence length."""
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    ids = torch.zeros(1, min(example_len, max_len), dtype=torch.long)
    seq = torch.export.Dim("seq", min=2, max=max_len)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            _Logits(model).eval(), (ids,), input_names=["input_ids"], output_names=["logits"], dynamo=True,
            dynamic_shapes={"input_ids": {1: seq}}, verbose=False,
        )
    program.save(str(path))


def cached_export(model: nn.Module, fingerprint: str, cache_path: Path) -> Path:
    key = {"model": fingerprint, "dtype": str(next(model.parameters()).dtype), **_versions()}
    root = cache_path / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    folder = build_dir_once(
        root / key_hash(key), lambda staging: export(model, staging / EXPORT_FILE),
        lambda target: (target / EXPORT_FILE).is_file(), "onnx_export", cache_path,
    )
    return folder / EXPORT_FILE


def block_linears(model: nn.Module, arch: Any) -> dict[str, nn.Linear]:
    """Every decoder-block linear by its full module name: what every method quantizes."""
    out = {}
    for index, block in enumerate(arch.block_list(model)):
        for name, linear in arch.block_linears(block).items():
            out[f"{arch.blocks}.{index}.{name}"] = linear
    return out


def map_linears(graph: Any, linears: dict[str, nn.Linear]) -> dict[str, tuple[str, str]]:
    """{linear name: (MatMul node name, its weight initializer name)}; checks each weight."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    found: dict[str, tuple[str, str]] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes is None:
            continue
        path = ast.literal_eval(scopes)
        module = path[-2].removeprefix("inner.") if len(path) >= 2 else ""
        if module in linears and node.input[1] in initializers:
            found[module] = (node.name, node.input[1])
    missing = sorted(set(linears) - set(found))
    if missing:
        raise RuntimeError(
            f"the exported graph has no MatMul with a constant weight for {len(missing)} linear(s), e.g. "
            f"{missing[:3]}: this exporter ({torch.__version__}) lays the graph out differently than expected"
        )
    for name, (_, weight_name) in found.items():
        stored = torch.from_numpy(numpy_helper.to_array(initializers[weight_name]).copy())
        if not torch.equal(stored, linears[name].weight.detach().float().cpu().T):
            raise RuntimeError(f"the MatMul mapped to {name} does not hold its weight (transposed)")
    return found


def _calibration_reader(ids: torch.Tensor) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Windows(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(ids.split(1))

        def get_next(self) -> dict[str, Any] | None:
            row = next(self.rows, None)
            return None if row is None else {"input_ids": row.to(torch.int64).numpy()}

    return Windows()


def quantize(source: Path, target: Path, config: Any, nodes: list[str], calib_ids: torch.Tensor | None) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    common = {"op_types_to_quantize": ["MatMul"], "nodes_to_quantize": nodes, "per_channel": config.per_channel,
              "reduce_range": config.reduce_range, "weight_type": QuantType.QInt8}
    if config.mode == "dynamic":
        with _quiet():
            quantize_dynamic(source, target, **common)
        return
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with _quiet():
        quantize_static(
            source, target, _calibration_reader(calib_ids), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
            calibrate_method=methods[config.calibrate_method], extra_options={"MatMulConstBOnly": True}, **common,
        )


def weight_records(graph: Any, mapping: dict[str, tuple[str, str]], linears: dict[str, nn.Linear],
                   seconds: float) -> list[LayerRecord]:
    """Per linear, its exact bits and weight error, read off the quantized graph."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    records = []
    for name, (_, weight_name) in mapping.items():
        try:
            q, scale, zero = (numpy_helper.to_array(initializers[f"{weight_name}{suffix}"]).copy()
                              for suffix in ("_quantized", "_scale", "_zero_point"))
        except KeyError:
            raise RuntimeError(f"ONNX Runtime did not quantize the weight of {name} ({weight_name})") from None
        q, scale, zero = torch.from_numpy(q), torch.from_numpy(scale).float(), torch.from_numpy(zero)
        storage = 8 * q.numel() + 32 * scale.numel() + 8 * zero.numel()
        dequantized = (q.float() - zero.float()) * scale  # [in, out]; per channel along out
        original = linears[name].weight.detach().float().cpu().T
        error = (torch.linalg.norm(original - dequantized) / torch.linalg.norm(original).clamp(min=1e-12)).item()
        out_features, in_features = linears[name].weight.shape
        records.append(LayerRecord(
            name=name, shape=(out_features, in_features), bits=8, storage_bits=storage,
            bits_per_weight=storage / q.numel(), rel_weight_error=error, seconds=seconds / len(mapping),
            info={"scales": scale.numel(), "weight_type": str(q.dtype).removeprefix("torch.")},
        ))
    return records


@torch.no_grad()
def window_nll(session: Any, window: torch.Tensor) -> float:
    """Mean next-token NLL of one window [L] from the session's logits (fp32, summed in fp64)."""
    logits = torch.from_numpy(session.run(["logits"], {"input_ids": window[None].to(torch.int64).numpy()})[0])[0]
    n_positions = window.numel() - 1
    total = 0.0
    for start in range(0, n_positions, LOGIT_SLICE):
        end = min(start + LOGIT_SLICE, n_positions)
        nll = F.cross_entropy(logits[start:end].float(), window[start + 1 : end + 1].long(), reduction="sum")
        total += float(nll.double())
    return total / n_positions


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_and_evaluate(loaded: Any, method: Any, run: Any, sets: dict[str, Any], baseline: dict[str, dict],
                          calibration: Any) -> dict[str, Any]:
    """The record fields of one onnx_int8 method entry (the shape `_quantize_and_evaluate` of
    experiments/run/flow.py returns)."""
    import onnx
    import onnxruntime

    config = method.config
    model, arch = loaded.model, loaded.architecture
    model.to("cpu")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    exported = cached_export(model, loaded.fingerprint, run.paths.cache_path)
    timings["export_s"] = time.perf_counter() - start
    linears = block_linears(model, arch)
    mapping = map_linears(onnx.load(str(exported)).graph, linears)
    calib_ids = calibration.get() if method.needs_calibration else None
    workdir = Path(tempfile.mkdtemp(prefix="quantlab-onnx-int8-"))
    try:
        target = workdir / "model.int8.onnx"
        start = time.perf_counter()
        quantize(exported, target, config, [node for node, _ in mapping.values()], calib_ids)
        timings["quantize_s"] = time.perf_counter() - start
        graph = onnx.load(str(target)).graph
        records = weight_records(graph, mapping, linears, timings["quantize_s"])
        ops: dict[str, int] = {}
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        activation_scales = sum(1 for init in graph.initializer if init.name.endswith("_scale")) - len(records)
        artifact_bytes = target.stat().st_size
        session = _session(target)
        start = time.perf_counter()
        metrics: dict[str, dict] = {}
        for dataset, windows in sets.items():
            began = time.perf_counter()
            nll = [window_nll(session, window) for window in windows.input_ids]
            metrics[dataset] = summarize(nll, windows.input_ids.shape[1], time.perf_counter() - began).as_dict()
            metrics[dataset]["vs_baseline"] = paired_delta(nll, baseline[dataset]["window_nll"])
        timings["eval_s"] = time.perf_counter() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    quantized_numel = sum(r.shape[0] * r.shape[1] for r in records)
    quantized_bits = sum(r.storage_bits for r in records)
    total_numel = sum(p.numel() for p in model.parameters())
    return {
        "quantized_model": {
            "source": "onnxruntime", "artifact_bytes": artifact_bytes,
            "eval_backend": {
                "backend": "onnxruntime", "provider": "CPUExecutionProvider", "mode": config.mode,
                "versions": {**_versions(), "onnxruntime": onnxruntime.__version__},
                "ops": dict(sorted(ops.items())), "quantized_matmuls": len(records),
                "activation_scales": max(activation_scales, 0),
            },
        },
        "layers": [r.as_dict() for r in records],
        "avg_bits": quantized_bits / quantized_numel,
        "model_bytes": (quantized_bits + 16 * (total_numel - quantized_numel)) // 8,
        "fp16_model_bytes": 16 * total_numel // 8,
        "metrics": {"ppl": metrics},
        "timings": timings,
        "_items": None,
    }
