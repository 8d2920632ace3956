"""The whole-model seam: a stage after the block-by-block pass, for methods that train the whole
quantized model (`Method.fine_tunes`: QAT, methods/qat.py).

The block pass (experiments/run/pipeline.py) commits every linear with the method's init; this
stage then puts the model on the compute device whole, freezes every parameter (the method
unfreezes what it trains), hands the method the quantized linears, their formats, the parameters
`train=all_linears_and_norms` may also train (every norm's, the quantized linears' biases) and a
next-token loss on the calibration sequences, and replaces the formats and layer records with
what it returns. The method stays free of transformers: it sees modules, tensors and a loss.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.experiments.evaluation.perplexity import input_device, place_for_eval
from quantlab.experiments.models.adapters import Architecture
from quantlab.methods.base import Method


def next_token_loss(model: nn.Module, arch: Architecture, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of positions 1..L-1 of each sequence in fp32: the perplexity's loss
    (experiments/evaluation/perplexity.py), differentiable."""
    ids = ids.to(input_device(model))
    hidden = model.get_submodule(arch.backbone)(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    logits = head(hidden[:, :-1].to(head.weight.device)).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device))


def norm_and_bias_parameters(model: nn.Module, linear_names: list[str]) -> list[nn.Parameter]:
    """Every norm's parameters (modules whose class name ends in Norm: RMSNorm, LayerNorm) and the
    biases of the quantized linears."""
    found = [p for module in model.modules() if type(module).__name__.endswith("Norm")
             for p in module.parameters(recurse=False)]
    found += [model.get_submodule(name).bias for name in linear_names if model.get_submodule(name).bias is not None]
    return found


def fine_tune_model(
    model: nn.Module, arch: Architecture, method: Method, report: Any, calib_ids: torch.Tensor, device: torch.device
) -> None:
    """Run `method.fine_tune` on the quantized `model` and update `report` (its formats, layer
    records, `fine_tune` record and `seconds["fine_tune_s"]`) in place."""
    start = time.perf_counter()
    names = [record.name for record in report.layers]
    linears = {name: model.get_submodule(name) for name in names}
    formats = {name: report.formats[name] for name in names}
    place_for_eval(model, arch, device)
    was_training = model.training
    model.eval()  # no dropout: the loss is the evaluated model's
    trainable = {p: p.requires_grad for p in model.parameters()}
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        final, record = method.fine_tune(
            linears, formats, norm_and_bias_parameters(model, names),
            lambda ids: next_token_loss(model, arch, ids), calib_ids,
        )
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
        model.train(was_training)
    for layer in report.layers:
        layer.info["qat"] = final[layer.name].info.get("qat")  # rel_weight_error stays the init's: W is not kept
        layer.storage_bits = final[layer.name].storage_bits()
        layer.bits_per_weight = final[layer.name].bits_per_weight()
    report.formats.update(final)
    report.fine_tune = record
    report.seconds["fine_tune_s"] = time.perf_counter() - start
