"""Saved tiny quantized models to export, made without a run (seconds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from quantlab.experiments.models.quantized import apply_formats, save_quantized_model
from quantlab.experiments.run.cli import load_group_option
from quantlab.experiments.run.schema import model_spec
from quantlab.kernels.uniform import UniformWeight
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import round_to_nearest

Quantize = Callable[[str, torch.Tensor], UniformWeight]


def rtn(bits: int = 4, group_size: int = 32, sym: bool = False, float_zero: bool = False) -> Quantize:
    grid = Grid(bits, sym=sym, zero_in_range=False, float_zero=float_zero)
    return lambda name, weight: round_to_nearest(weight, grid, group_size)


def act_order(bits: int = 4, group_size: int = 32, sym: bool = False, seed: int = 0) -> Quantize:
    """RTN on groups of a random column permutation: g_idx as GPTQ's act-order with dynamic groups
    leaves it (group of column j = its position in the permutation // group_size)."""

    def quantize(name: str, weight: torch.Tensor) -> UniformWeight:
        in_features = weight.shape[1]
        perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        fmt = round_to_nearest(weight[:, perm], Grid(bits, sym=sym, zero_in_range=False), group_size)
        inverse = torch.argsort(perm)
        fmt.codes = fmt.codes[:, inverse].contiguous()
        fmt.g_idx = fmt.g_idx[inverse].contiguous()
        assert fmt.g_idx_layout == "explicit"
        return fmt

    return quantize


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}


def save_tiny(loaded, directory: Path, quantize: Quantize, method: str = "rtn", model_name: str = "tiny-llama") -> dict:
    """Quantize every decoder linear of `loaded` (a LoadedModel) with `quantize`, save the folder as
    a run would, and return the formats."""
    formats = {name: quantize(name, linear.weight) for name, linear in decoder_linears(loaded.model).items()}
    spec = model_spec(load_group_option("model", model_name))
    tokenizer_spec = model_spec(load_group_option("model", spec.tokenizer)) if spec.tokenizer else None
    description = {
        "base_model": {"spec": asdict(spec), "fingerprint": loaded.fingerprint,
                       "tokenizer_spec": asdict(tokenizer_spec) if tokenizer_spec else None},
        "method": method, "method_config": {},
    }
    save_quantized_model(loaded.model, formats, directory, loaded.tokenizer, description)
    return formats


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def fake_quant_copy(loaded, formats) -> nn.Module:
    """The run's fake-quant model: each linear's dequantized weight (fp32 scales) in place."""
    import copy

    model = copy.deepcopy(loaded.model)
    apply_formats(model, formats, "fake")
    return model


def stored_copy(loaded, formats) -> nn.Module:
    """The weights as stored (fp16 scales and float zeros) in plain linears."""
    import copy

    model = copy.deepcopy(loaded.model)
    apply_formats(model, {name: fmt.rounded_to_storage() for name, fmt in formats.items()}, "fake")
    return model


@pytest.fixture
def token_ids():
    return torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
