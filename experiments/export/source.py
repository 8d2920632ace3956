"""The saved quantized model an export reads: found from a run directory or the folder itself."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantlab.experiments.export.layout import ExportRefused, Layout, layout_of
from quantlab.experiments.models.quantized import (
    QUANT_CONFIG_FILE,
    WEIGHTS_FILE,
    NotAQuantizedModel,
    files_are_intact,
    load_formats,
    read_quant_config,
)
from quantlab.experiments.store.artifacts import SAVED_DIR
from quantlab.kernels.format import WeightFormat

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def find_saved_model(path: Path) -> Path:
    """The saved folder itself, a run directory holding `quantized_model/`, or a run directory
    whose result.json points at the shared cache's copy."""
    path = Path(path).expanduser()
    if (path / QUANT_CONFIG_FILE).is_file():
        return path
    if (path / SAVED_DIR / QUANT_CONFIG_FILE).is_file():
        return path / SAVED_DIR
    result = path / "result.json"
    if result.is_file():
        artifact = (json.loads(result.read_text()).get("quantized_model") or {}).get("artifact")
        if artifact and (Path(artifact) / QUANT_CONFIG_FILE).is_file():
            return Path(artifact)
    raise ExportRefused(
        f"{path} holds no saved quantized model (no {QUANT_CONFIG_FILE} in it or in {SAVED_DIR}/, and no "
        "result.json naming one): run with save_model=true, or with export=... to write the export directly"
    )


@dataclass
class SavedModel:
    directory: Path
    quantization: dict[str, Any]  # quantization.json
    hf_config: dict[str, Any]  # config.json
    formats: dict[str, WeightFormat]  # every quantized linear, with the fp32 values the method computed
    dense: dict[str, torch.Tensor]  # every other tensor of the model, biases of quantized linears included
    tied: dict[str, str]  # tensor -> the tensor it shares storage with (an untied copy is not stored)

    @property
    def layouts(self) -> dict[str, Layout]:
        return {name: layout_of(fmt) for name, fmt in self.formats.items()}

    @property
    def method(self) -> str:
        return str(self.quantization.get("method"))

    def copy_tokenizer(self, out: Path) -> list[str]:
        copied = []
        for name in TOKENIZER_FILES:
            if (self.directory / name).is_file():
                shutil.copy2(self.directory / name, out / name)
                copied.append(name)
        return copied


def read_saved_model(path: Path) -> SavedModel:
    from safetensors import safe_open

    directory = find_saved_model(path)
    try:
        quantization = read_quant_config(directory)
    except NotAQuantizedModel as error:
        raise ExportRefused(str(error)) from None
    if not files_are_intact(directory):
        raise ExportRefused(f"{directory}: its tensor files do not match the sizes and sha256 in {QUANT_CONFIG_FILE}")
    formats = load_formats(directory, exact=True)  # float zero-points need their fp32 values (GGUF's m)
    prefixes = tuple(f"{name}." for name in formats)
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as handle:
        dense = {
            key: handle.get_tensor(key)
            for key in handle.keys()  # noqa: SIM118
            if not key.startswith(prefixes) or key.removesuffix(".bias") in formats
        }
    hf_config = json.loads((directory / "config.json").read_text())
    return SavedModel(directory, quantization, hf_config, formats, dense, dict(quantization.get("tied") or {}))
