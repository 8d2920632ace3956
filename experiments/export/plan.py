"""`export=` on a run, checked before anything loads: the format, the output folder, and whether the
weights the run will produce can be written in that format (experiments/export/layout.py's table,
on the layout the method's config implies, or on a saved model's quantization.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quantlab.experiments.export.layout import GGUF_ARCHITECTURES as ARCHITECTURES
from quantlab.experiments.export.layout import Layout, layout_of_meta, predicted_layout, refusal
from quantlab.methods.base import ConfigError


def export_path(run: Any, run_dir: Path) -> Path:
    return Path(run.export.path).expanduser() if run.export.path else run_dir / f"export-{run.export.format}"


def _layouts(run: Any) -> dict[str, Layout]:
    if run.model.source == "quantized":
        from quantlab.experiments.models.quantized import read_quant_config

        layers = read_quant_config(Path(run.model.path).expanduser())["layers"]
        return {name: layout_of_meta(meta) for name, meta in layers.items()}
    configs = {f"method={run.method_name}": run.method}
    configs.update({f"modules[{r.index}]": r.config for r in getattr(run, "modules", []) if not r.skip})
    layouts = {name: predicted_layout(run.method_name, config) for name, config in configs.items()}
    return {name: layout for name, layout in layouts.items() if layout is not None}


def _model_type(spec: Any) -> str | None:
    if spec.source == "random":
        return (spec.random_config or {}).get("model_type")
    if spec.source == "package_gguf":
        return "llama"
    if spec.source == "local" and spec.path and (Path(spec.path).expanduser() / "config.json").is_file():
        return json.loads((Path(spec.path).expanduser() / "config.json").read_text()).get("model_type")
    return None  # known once the model loads; the export refuses it then


def _check_gguf(run: Any) -> None:
    base, tokenizer = run.model, run.tokenizer_model
    if run.model.source == "quantized":
        from quantlab.experiments.models.quantized import read_quant_config

        saved = read_quant_config(Path(run.model.path).expanduser()).get("base_model") or {}
        base_spec, tokenizer_spec = saved.get("spec") or {}, saved.get("tokenizer_spec") or {}
        sources = {base_spec.get("source"), tokenizer_spec.get("source")}
        model_type = None
    else:
        sources = {base.source, tokenizer.source if tokenizer else None}
        model_type = _model_type(base)
    if model_type is not None and model_type not in ARCHITECTURES:
        raise ConfigError(
            f"export=gguf maps the tensors and metadata of {', '.join(ARCHITECTURES)} models; model "
            f"{run.model.name!r} is {model_type!r}: export compressed-tensors or gptq"
        )
    if not sources & {"gguf", "package_gguf"}:
        raise ConfigError(
            f"export=gguf copies the tokenizer from the GGUF file the model (or its tokenizer) is read from; "
            f"model {run.model.name!r} has none (source {run.model.source}): export compressed-tensors or gptq"
        )


def _writable(path: Path) -> None:
    from quantlab.experiments.export import replaceable

    try:
        replaceable(path)
    except ConfigError as error:
        raise ConfigError(f"export.path={path}: {error}") from None
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"export.path={path} cannot be written ({existing} is not a writable folder)")


def check_export(run: Any) -> None:
    """Raise ConfigError naming `export` when the run's export cannot be written."""
    export = run.export
    if export.format is None:
        if export.path is not None:
            raise ConfigError(f"export.path={export.path} is set but no format: add export=<format> "
                              "(compressed-tensors, gptq, awq, gguf)")
        return
    if getattr(run, "modules", None) and export.format != "gguf":
        raise ConfigError(
            f"export={export.format}: the modules rules give linears different schemes or leave some in full "
            "precision, and this format is written here with one scheme for every linear: export gguf (a type "
            "per tensor) or drop modules")
    for name, layout in _layouts(run).items():
        why = refusal(export.format, layout)
        if why is not None:
            raise ConfigError(f"export={export.format} ({name}): {why}")
    if export.format == "gguf":
        _check_gguf(run)
    if export.path is not None:
        _writable(Path(export.path).expanduser())
